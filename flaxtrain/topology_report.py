"""The text of `--mode=describe --topology`: what `topology.analyze` measured, per chip.

A step that fits gets the data, slice, batch and model lines, the memory table (the state
and inputs from their shapes, the rest from XLA's memory analysis), the FLOPs and a
roofline estimate of the step time; one that does not is a UserError of one sentence with
the remedies that would shrink it.
"""

import importlib.metadata

from flaxtrain import describe
from flaxtrain.errors import UserError
from flaxtrain.topology import FIT_FRACTION, Analysis, GiB


def report(a: Analysis) -> str:
  """The analysis as text; raises UserError (one sentence) where the step does not fit."""
  if not a.fits:
    raise UserError(_no_fit_sentence(a))
  chip, config = a.topology.chip, a.config
  return "\n".join(
    [
      _data_line(a),
      f"Topology {a.par.describe()}: compiled ahead of time with {_libtpu()}, not run.",
      _batch_line(a),
      f"Model {config.model.name}{_remat(config)}, {config.compute_dtype} compute: "
      f"{a.param_count:,} parameters ({a.param_dtypes}).",
      "",
      _memory_table(a),
      "",
      _flops_lines(a),
      f"Chip {chip.name}: {chip.peak_flops / 1e12:g} TFLOP/s bf16 peak, "
      f"{chip.hbm_bytes / GiB:g} GiB HBM at {chip.hbm_bandwidth / 1e9:g} GB/s per chip "
      f"({chip.source}).",
    ]
  )


def _remat(config) -> str:
  remat = config.model.get("remat")
  return f" (remat {remat})" if remat else ""


def _libtpu() -> str:
  try:
    return f"libtpu {importlib.metadata.version('libtpu')}"
  except importlib.metadata.PackageNotFoundError:
    return "libtpu"


def _data_line(a: Analysis) -> str:
  d = a.data
  shape = "x".join(str(n) for n in d.image_shape)
  if d.num_train:
    sizes = f"{d.num_train:,} train / {d.num_eval:,} eval examples"
  else:
    sizes = "split sizes unknown until the dataset is prepared"
  where = "streamed" if d.source == "stream" else "in memory"
  if d.on_device:
    where += ", on every device"
  elif d.source == "memory" and d.on_device is None:
    where += " (on the devices or not by its size: counted as batches from the host)"
  return (
    f"Dataset {d.name} (TFDS info only, no data read): {sizes}; model input {shape}, "
    f"{d.num_classes} classes; {where}."
  )


def _batch_line(a: Analysis) -> str:
  batch, n = a.config.batch_size, a.par.num_devices
  line = f"Batch {batch:,} = {batch // n:,} per chip"
  if a.config.grad_accum_steps > 1:
    line += f" in {a.config.grad_accum_steps} micro-batches"
  line += f"; {a.plan.steps_per_dispatch} step(s) per dispatch"
  if a.steps_per_epoch:
    epochs = a.plan.total_steps / a.steps_per_epoch
    line += (
      f"; {a.steps_per_epoch:,} steps per epoch, {a.plan.total_steps:,} steps ({epochs:g} epochs)"
    )
  elif a.config.num_train_steps:
    line += f"; {a.plan.total_steps:,} steps"
  return line + "."


def _memory_table(a: Analysis) -> str:
  m, s = a.memory, a.sizes
  what = {
    "parameters": f"{a.param_count:,} x {a.param_dtypes}",
    "optimizer state": a.config.optimizer.name,
    "model state": "e.g. BatchNorm statistics",
    "EMA parameters": f"ema_decay {a.config.ema_decay:g}",
    "input batches": _inputs_text(a),
    "eval split (on device)": "kept there by the in-memory source",
  }
  rows = [(k, v, what[k]) for k, v in s.items() if v]
  rows += [
    ("arguments", m["arguments"], "the train state and the input batches"),
    ("outputs", m["outputs"], f"{_size(m['aliased'])} of it in the donated state's buffers"),
    ("temporaries", m["temporaries"], "activations, gradients, workspace"),
    ("generated code", m["generated code"], ""),
  ]
  chip = a.topology.chip
  lines = [
    "Memory per chip (the state and inputs from their shapes; the rest from XLA's memory "
    "analysis of the compiled step, which includes TPU layout padding):"
  ]
  lines += [f"  {k:<24}{_size(v):>11}   {t}".rstrip() for k, v, t in rows]
  lines.append(
    f"  {'total':<24}{_size(a.total):>11}   {a.total / chip.hbm_bytes:.0%} of "
    f"{_size(chip.hbm_bytes)} HBM: fits, with {1 - FIT_FRACTION:.0%} kept for the runtime "
    f"({_size(a.usable - a.total)} to spare)"
  )
  return "\n".join(lines)


def _inputs_text(a: Analysis) -> str:
  shape = "x".join(str(n) for n in a.data.image_shape)
  per_chip = a.config.batch_size // a.par.num_devices
  if a.data.on_device:
    return f"{a.data.num_train:,} train images of {shape} uint8 on every chip, an epoch's ids"
  return f"{a.plan.steps_per_dispatch} step(s) x {per_chip:,} images of {shape} uint8 + labels"


def _flops_lines(a: Analysis) -> str:
  if a.flops is None:
    return "FLOPs per step: n/a (XLA's cost analysis gave none)."
  chip = a.topology.chip
  compute_s = a.flops / chip.peak_flops
  memory_s = (a.bytes_accessed or 0) / chip.hbm_bandwidth
  step_s = max(compute_s, memory_s)
  model = ""
  if a.model_flops and a.model_flops != a.flops:
    model = f" ({_si(a.model_flops)}FLOP without remat's recomputation, which MFU counts)"
  lines = [
    f"FLOPs per step and chip (XLA cost analysis): {_si(a.flops)}FLOP{model}, "
    f"{_si(a.bytes_accessed)}B of HBM traffic.",
    f"Step time, roofline estimate: >= {_ms(step_s)} "
    f"({'HBM' if memory_s > compute_s else 'compute'}-bound: the FLOPs take "
    f"{_ms(compute_s)} at the peak, the traffic {_ms(memory_s)} at the HBM bandwidth), "
    f"so MFU <= {_percent((a.model_flops or a.flops) / chip.peak_flops / step_s)}, "
    f"<= {a.config.batch_size / step_s:,.0f} examples/s.",
  ]
  if a.steps_per_epoch:
    lines.append(
      f"  -> >= {describe.duration(step_s * a.steps_per_epoch)} per epoch, "
      f">= {describe.duration(step_s * a.plan.total_steps)} for {a.plan.total_steps:,} steps "
      "(train steps only, at the roofline: real steps are slower)."
    )
  return "\n".join(lines)


def _no_fit_sentence(a: Analysis) -> str:
  chip, m = a.topology.chip, a.memory
  parts = {**a.sizes, "temporaries": m["temporaries"]}
  largest = sorted(((v, k) for k, v in parts.items() if v), reverse=True)[:4]
  listed = ", ".join(f"{k} {_size(v)}" for v, k in largest)
  if a.compile_error and not m["temporaries"]:
    listed += ", temporaries unknown"
  needs = "at least " if a.compile_error else ""
  return (
    f"The train step does not fit on {a.topology.name}: it needs {needs}{_size(a.total)} per "
    f"chip ({listed}) of {chip.name}'s {_size(chip.hbm_bytes)} HBM, "
    f"{_size(a.usable)} with {1 - FIT_FRACTION:.0%} kept for the runtime: try "
    f"{_remedies(a)}."
  )


def _remedies(a: Analysis) -> str:
  config = a.config
  out = []
  accum = _grad_accum(a)
  if accum:
    out.append(f"--config.grad_accum_steps={accum}")
  if config.compute_dtype != "bfloat16":
    out.append("--config.compute_dtype=bfloat16")
  if "remat" in config.model and config.model.remat != "block":
    out.append("--config.model.remat=block")
  if a.plan.steps_per_dispatch > 1 and a.sizes["input batches"] > 0.2 * a.usable:
    out.append("--config.steps_per_dispatch=1")  # Each dispatch's batches sit on the chip.
  out.append("a smaller --config.batch_size")
  return ", ".join(out[:-1]) + f" or {out[-1]}" if len(out) > 1 else out[0]


def _grad_accum(a: Analysis) -> int | None:
  """The fewest micro-batches whose temporaries would fit, if they scale with the batch."""
  config, m = a.config, a.memory
  if config.topology_invariant_shards or not m["temporaries"]:
    return None
  rest = a.total - m["temporaries"]
  per_device = config.batch_size // a.par.num_devices
  current = config.grad_accum_steps
  for k in range(2, per_device // current + 1):
    if per_device % (current * k) == 0 and rest + m["temporaries"] / k <= a.usable:
      return current * k
  return None


def _ms(seconds: float) -> str:
  return f"{seconds * 1e3:.3g} ms"


def _percent(x: float) -> str:
  return f"{x:.0%}" if x >= 0.1 else f"{x * 100:.2g}%"


def _size(n: float) -> str:
  for unit, scale in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
    if abs(n) >= scale:
      return f"{n / scale:.3g} {unit}" if n / scale < 100 else f"{n / scale:.0f} {unit}"
  return f"{n:.0f} B"


def _si(value: float | None) -> str:
  if not value:
    return "n/a "
  for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if value >= scale:
      return f"{value / scale:.3g} {unit}"
  return f"{value:.0f} "
