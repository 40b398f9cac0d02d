"""`--mode=describe --topology=v5e-8`: the train step compiled for a TPU slice that is not here.

The program is the one a run on that slice compiles: `steps.make_train_chunk` through
`parallel.DataParallel.compile` (jit + shard_map) on a 1-D mesh over the slice's chips, with
the config's global batch, dtype and steps per dispatch, and inputs laid out as the data
source would feed them. Nothing runs and no data is read: the dataset's spec comes from its
TFDS info. libtpu (`pip install 'jax[tpu]'`, Linux x86-64) compiles for the slice through
`jax.experimental.topologies`, as MaxText's `train_compile.py` does, so XLA's memory and cost
analyses of the real program give, per chip, the bytes it needs against the chip's HBM and
the FLOPs and HBM bytes of a step.
"""

import dataclasses
import glob
import math
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import topologies

from flaxtrain import experiment, models, optimizers, parallel, steps, tasks
from flaxtrain import metrics as metrics_lib
from flaxtrain.data import augment, memory, prepare, sources
from flaxtrain.data.plan import IndexPlan
from flaxtrain.errors import UserError
from flaxtrain.models import analysis

GiB = 1 << 30
# Share of a chip's HBM a step may use: the rest is kept for the runtime (libtpu's own
# buffers, fragmentation), more than the compiler itself reserves (see CHIPS).
FIT_FRACTION = 0.9


@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU generation's per-chip figures, from the Cloud TPU docs (`source`)."""

  name: str  # As in the Cloud TPU accelerator types: v5e-8 (also v5litepod-8), v4-32.
  libtpu_name: str  # The generation in libtpu's topology strings, e.g. 'v5e:2x4'.
  device_kind: str  # What JAX calls the chip.
  cores_per_chip: int  # TensorCores the accelerator type's number counts per chip.
  dims: int  # Of the slice's torus: 2 (v5e, v6e) or 3 (v4, v5p).
  chip_config: str  # 'megacore': a chip's two TensorCores are one JAX device.
  peak_flops: float  # bf16 FLOP/s.
  hbm_bytes: int
  hbm_bandwidth: float  # Bytes/s.
  max_chips: int  # The largest slice.
  source: str
  aliases: tuple[str, ...] = ()


# Per chip, from the Cloud TPU docs of each generation (`source`): peak bf16 compute, HBM
# and its bandwidth, TensorCores per chip, the largest slice. The docs write v5e's, v5p's
# and v6e's HBM in GB; the chips have binary sizes, as the compiler's own limits show
# (libtpu 0.0.50: 15.75 G usable on v5e, 30.75 on v4, 95.73 on v5p, 31.24 on v6e).
CHIPS = {
  c.name: c
  for c in (
    # 275 TFLOP/s, 32 GiB of HBM2 at 1,200 GB/s; 2 TensorCores per chip; 4,096-chip pods.
    Chip("v4", "v4", "TPU v4", 2, 3, "megacore", 275e12, 32 * GiB, 1200e9, 4096,
         "https://cloud.google.com/tpu/docs/v4"),
    # 197 TFLOP/s, 16 GB of HBM2 at 819 GB/s; 1 TensorCore per chip; 256-chip pods.
    Chip("v5e", "v5e", "TPU v5 lite", 1, 2, "default", 197e12, 16 * GiB, 819e9, 256,
         "https://cloud.google.com/tpu/docs/v5e", aliases=("v5litepod",)),
    # 459 TFLOP/s, 95 GB of HBM2e at 2,765 GB/s; 2x2x1 is 8 cores on 4 chips; 8,960-chip pods.
    Chip("v5p", "v5", "TPU v5", 2, 3, "megacore", 459e12, 95 * GiB, 2765e9, 8960,
         "https://cloud.google.com/tpu/docs/v5p"),
    # 918 TFLOP/s, 32 GB of HBM at 1,638 GB/s; 1 TensorCore per chip; 256-chip pods.
    Chip("v6e", "v6e", "TPU v6 lite", 1, 2, "default", 918e12, 32 * GiB, 1638e9, 256,
         "https://cloud.google.com/tpu/docs/v6e"),
  )
}  # fmt: skip

# Slice shapes (chips per dimension) by chip count, as in the docs' topology tables and
# MaxText's accelerator_to_spec_map.py. 3-D slices of 64 chips and more are whole 4x4x4
# cubes (`_cubes`).
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8)}
_SHAPES_2D |= {128: (8, 16), 256: (16, 16)}
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}
# GPU names people may try: compile-only targets exist for TPUs only.
_GPUS = re.compile(r"^(gpu|cuda|rocm|nvidia|[abhlpt]\d+[a-z]*|v100|gb\d+|l40s?|a[34])$")


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice: its chip, its shape in chips, and the hosts (processes) that drive it."""

  name: str  # As given, e.g. 'v4-32'.
  chip: Chip
  shape: tuple[int, ...]  # Chips per dimension, e.g. (2, 2, 4).

  @property
  def num_chips(self) -> int:
    return math.prod(self.shape)

  @property
  def libtpu_name(self) -> str:
    return f"{self.chip.libtpu_name}:{'x'.join(map(str, self.shape))}"

  @property
  def chips_per_host(self) -> tuple[int, int, int]:
    # v5e and v6e slices of up to 8 chips are one host (1, 4 or 8 chips); larger slices,
    # and all v4 and v5p hosts, have 4 chips (2x2).
    if self.chip.dims == 2 and self.num_chips <= 8:
      return (*self.shape, 1)
    return (2, 2, 1) if self.num_chips >= 4 else (*self.shape, 1)

  @property
  def num_hosts(self) -> int:
    return self.num_chips // math.prod(self.chips_per_host)

  @property
  def wrap(self) -> tuple[bool, bool, bool]:
    """Torus wrap-around links per dimension (MaxText's table)."""
    if self.chip.dims == 3:
      return (self.num_chips >= 64,) * 3
    return {128: (False, True, False), 256: (True, True, False)}.get(
      self.num_chips, (False, False, False)
    )

  def describe(self) -> str:
    shape = "x".join(map(str, self.shape))
    return (
      f"{self.name}: {_plural(self.num_chips, self.chip.device_kind + ' chip')} ({shape}), "
      f"{_plural(self.num_hosts, 'host')}"
    )


def parse(name: str) -> Topology:
  """'v5e-8' (or 'v5litepod-8'), 'v4-32', 'v5p-128', 'v6e-16' -> its Topology.

  As in Cloud TPU's accelerator types, the number counts TensorCores: chips for v5e and
  v6e, two per chip for v4 and v5p (v4-32 is 16 chips).
  """
  family, _, number = name.strip().lower().rpartition("-")
  chip = next((c for c in CHIPS.values() if family in (c.name, *c.aliases)), None)
  if chip is None and _GPUS.match(family or number):
    raise UserError(
      f"--topology={name}: compiling ahead of time for GPUs needs the GPU itself (XLA has "
      "no compile-only GPU target), so --topology covers TPUs only: run --mode=describe on "
      "the GPU machine without it."
    )
  shape = None
  if chip is not None and number.isdigit() and int(number) % chip.cores_per_chip == 0:
    shape = _shape(chip, int(number) // chip.cores_per_chip)
  if shape is None:
    raise UserError(f"Unknown TPU topology {name!r}: known are {known_names()}.")
  return Topology(name.strip(), chip, shape)


def _shape(chip: Chip, chips: int) -> tuple[int, ...] | None:
  if chip.dims == 2:
    return _SHAPES_2D.get(chips) if chips <= chip.max_chips else None
  if chips in _SHAPES_3D:
    return _SHAPES_3D[chips]
  if chips % 64 or chips > chip.max_chips:
    return None
  return tuple(4 * n for n in _cubes(chips // 64))


def _cubes(n: int) -> tuple[int, int, int]:
  """n 4x4x4 cubes as (a, b, c) cubes per dimension, a <= b <= c, closest to a cube
  (the smallest a + b + c): 6 -> (1, 2, 3), i.e. v5p-768 is 4x8x12, as in MaxText."""
  shapes = [
    (a, b, n // (a * b))
    for a in range(1, n + 1)
    for b in range(a, n + 1)
    if n % (a * b) == 0 and n // (a * b) >= b
  ]
  return min(shapes, key=sum)


def known_names() -> str:
  parts = []
  for c in CHIPS.values():
    if c.dims == 2:
      names = ", ".join(f"{c.name}-{n * c.cores_per_chip}" for n in sorted(_SHAPES_2D))
      alias = f" (or {c.aliases[0]}-N)" if c.aliases else ""
      parts.append(f"{names}{alias}")
    else:
      small = ", ".join(f"{c.name}-{n * c.cores_per_chip}" for n in sorted(_SHAPES_3D))
      cores = 64 * c.cores_per_chip
      parts.append(
        f"{small}, then multiples of {cores} up to {c.name}-{c.max_chips * c.cores_per_chip}"
      )
  return "; ".join(parts) + " (v4 and v5p count TensorCores, two per chip)"


def prepare_libtpu() -> None:
  """Settings libtpu reads when it loads, i.e. before JAX starts its backends.

  Compiling for a slice does not need a TPU, so libtpu's lock on the local chips
  (/tmp/libtpu_lockfile) is not taken: another JAX process holding it does not stop the
  compilation. Without TPU chips here, libtpu is also told it is one host of no particular
  slice, or it warns that it cannot find its accelerator type and worker hostnames.
  """
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if not _may_have_tpu():
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def _may_have_tpu() -> bool:
  """Whether a Google PCI device is attached (a TPU, or another device of Google's)."""
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      if pathlib.Path(vendor).read_text().strip() == "0x1ae0":
        return True
    except OSError:
      continue
  return False


def devices(topo: Topology) -> list:
  """The slice's compile-only devices, one per chip."""
  try:
    desc = topologies.get_topology_desc(
      topo.libtpu_name,
      "tpu",
      chip_config_name=topo.chip.chip_config,
      chips_per_host_bounds=topo.chips_per_host,
      num_slices=1,
      wrap=topo.wrap,
    )
  except RuntimeError as e:  # Also jax.errors.JaxRuntimeError.
    if "not installed" in str(e):
      raise UserError(
        f"--topology={topo.name} compiles with libtpu, which is not installed: pip install "
        "'jax[tpu]' (Linux x86-64; no TPU needed)."
      ) from e
    raise UserError(
      f"libtpu could not describe {topo.name} as {topo.libtpu_name} "
      f"({_first_line(e)}): check that libtpu matches jax (pip install 'jax[tpu]')."
    ) from e
  return list(desc.devices)


class SliceParallel(parallel.DataParallel):
  """`DataParallel` over a slice's compile-only devices: the mesh a run there builds."""

  def __init__(self, topo: Topology, slice_devices: list):
    super().__init__(slice_devices)
    self.topology = topo
    self.num_processes = len({d.process_index for d in slice_devices})
    self.process_index = 0
    self.local_devices = [d for d in slice_devices if d.process_index == 0]

  def describe(self) -> str:
    return self.topology.describe()


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What the train step needs to know about the dataset, from its TFDS info alone."""

  name: str
  image_shape: tuple  # As the model gets it (after the source's resizing).
  num_classes: int
  num_train: int  # 0: unknown here (TFDS knows split sizes once the data is prepared).
  num_eval: int
  source: str  # 'memory' or 'stream', as sources.choose picks.
  on_device: bool | None  # In-memory source: the splits on every device? None: unknown.


def data_spec(config: ml_collections.ConfigDict) -> DataSpec:
  ds = config.dataset
  builder = prepare.describe(ds.name, data_dir=ds.data_dir)
  for split in (ds.train_split, ds.eval_split):
    prepare.check_split(builder, split)  # Only where TFDS knows the splits.
  splits = builder.info.splits
  num_train = splits[ds.train_split].num_examples if splits else 0
  num_eval = splits[ds.eval_split].num_examples if splits else 0
  stored = tuple(builder.info.features["image"].shape)
  kind = sources.choose(config, sources.Facts(stored, num_train + num_eval))
  shape = stored if kind == "memory" else sources.transforms(stored, config)[0]
  on_device = None
  if kind == "memory" and num_train:
    on_device = memory.on_device(ds.on_device, (num_train + num_eval) * (math.prod(shape) + 4))
  return DataSpec(
    name=ds.name,
    image_shape=shape,
    num_classes=builder.info.features["label"].num_classes,
    num_train=num_train,
    num_eval=num_eval,
    source=kind,
    on_device=on_device,
  )


@dataclasses.dataclass
class Analysis:
  """Per-chip bytes, FLOPs and HBM traffic of the train step compiled for a slice."""

  topology: Topology
  par: SliceParallel
  data: DataSpec
  config: ml_collections.ConfigDict
  plan: experiment.Plan
  steps_per_epoch: int | None  # None: unknown split size.
  param_count: int
  param_dtypes: str
  sizes: dict  # Per chip: parameters, optimizer state, ... (from shapes and shardings).
  memory: dict  # XLA's memory analysis: arguments, outputs, aliased, temporaries, code.
  flops: float | None  # Per chip and step, as compiled (remat's recomputation included).
  bytes_accessed: float | None
  model_flops: float | None = None  # The same without remat's recomputation: for MFU.
  compile_error: str | None = None  # libtpu's out-of-memory message, if it gave up.

  @property
  def total(self) -> int:
    """Bytes per chip: arguments + outputs - donated + temporaries + code (+ eval data)."""
    m = self.memory
    return (
      m["arguments"]
      + m["outputs"]
      - m["aliased"]
      + m["temporaries"]
      + m["generated code"]
      + self.sizes.get("eval split (on device)", 0)
    )

  @property
  def usable(self) -> float:
    return FIT_FRACTION * self.topology.chip.hbm_bytes

  @property
  def fits(self) -> bool:
    return self.compile_error is None and self.total <= self.usable


def analyze(config: ml_collections.ConfigDict, topo: Topology) -> Analysis:
  """Compiles the train step for `topo` (no data read, nothing run) and measures it."""
  par = SliceParallel(topo, devices(topo))
  experiment.validate(config, par)
  data = data_spec(config)
  augment.validate(config.augment, data.image_shape)
  steps_per_epoch = None
  if data.num_train:
    steps_per_epoch = IndexPlan(
      num_train=data.num_train,
      num_eval=data.num_eval,
      batch_size=config.batch_size,
      eval_batch_size=config.eval_batch_size,
      num_devices=par.num_devices,
      seed=config.seed,
    ).steps_per_epoch
  # Unknown epochs only move the learning-rate schedule's boundaries, not the program.
  plan = experiment.make_plan(config, steps_per_epoch or 1, "tpu")
  model_cfg = config.model
  if model_cfg.get("conv") == "auto":  # On accelerators 'auto' is XLA's convolutions.
    model_cfg = ml_collections.ConfigDict({**model_cfg.to_dict(), "conv": "xla"})
  lowered, state, inputs, eval_table = _lower(config, model_cfg, data, plan, par, config.batch_size)
  params = jax.tree.leaves(state.params)
  sizes = {
    "parameters": _bytes(state.params),
    "optimizer state": _bytes(state.opt_state),
    "model state": _bytes(state.model_state),
    "EMA parameters": _bytes(state.ema_params),
    "input batches": _bytes(inputs),
  }
  if eval_table:
    sizes["eval split (on device)"] = eval_table
  analysis = Analysis(
    topology=topo,
    par=par,
    data=data,
    config=config,
    plan=plan,
    steps_per_epoch=steps_per_epoch,
    param_count=sum(math.prod(p.shape) for p in params),
    param_dtypes="/".join(sorted({str(p.dtype) for p in params})),
    sizes=sizes,
    memory={},
    flops=None,
    bytes_accessed=None,
  )
  try:
    compiled = lowered.compile()
  except RuntimeError as e:  # jax.errors.JaxRuntimeError
    if "RESOURCE_EXHAUSTED" not in str(e) and "memory" not in str(e).lower():
      raise
    analysis.compile_error = _first_line(e)
    analysis.memory = _oom_memory(str(e), sizes)
    return analysis
  m = compiled.memory_analysis()
  analysis.memory = {
    "arguments": m.argument_size_in_bytes,
    "outputs": m.output_size_in_bytes,
    "aliased": m.alias_size_in_bytes,
    "temporaries": m.temp_size_in_bytes,
    "generated code": m.generated_code_size_in_bytes,
  }
  cost = _cost(compiled.cost_analysis())
  analysis.flops, analysis.bytes_accessed = cost.get("flops"), cost.get("bytes accessed")
  analysis.model_flops = analysis.flops
  if model_cfg.get("remat", "none") != "none":
    analysis.model_flops = _flops_without_remat(config, model_cfg, data, plan, par)
  return analysis


def _lower(config, model_cfg, data: DataSpec, plan, par, batch: int):
  """The train chunk as a run builds it, lowered for `par`'s mesh from shapes only:
  (lowered, state shapes, input shapes, bytes of an eval split kept on each device)."""
  dtype = steps.DTYPES[config.compute_dtype]
  model = models.get(model_cfg, data.num_classes, dtype, data.image_shape)
  task = tasks.get(config.task, data.num_classes)
  tx, schedule = optimizers.make(
    config.optimizer,
    config.schedule,
    steps_per_epoch=plan.steps_per_epoch,
    total_steps=plan.total_steps,
    params=lambda: analysis.param_shapes(model, data.image_shape),
  )
  chunk = steps.make_train_chunk(
    model,
    tx,
    schedule,
    task,
    config,
    dtype,
    plan.steps_per_dispatch,
    metrics_lib.train_metrics(task.metric_names),
    par.num_devices,
  )
  replicated = par.sharding(parallel.REPLICATED)
  state = jax.eval_shape(
    lambda: steps.init_state(
      model, tx, data.image_shape, config.seed, par, ema=bool(config.ema_decay)
    )
  )
  state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), state)
  inputs, specs, eval_table = _train_inputs(data, par, plan, batch)
  num_steps = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  lowered = par.compile(
    chunk,
    in_specs=(parallel.REPLICATED, specs, parallel.REPLICATED),
    out_specs=parallel.REPLICATED,
    donate_argnums=(0,),
  ).lower(state, inputs, num_steps)
  return lowered, state, inputs, eval_table


def _flops_without_remat(config, model_cfg, data, plan, par) -> float | None:
  """The model's FLOPs per step and chip, which MFU counts: the same step without remat,
  for one CPU device with a chip's share of the batch, lowered (not compiled: quick) for
  XLA's cost analysis."""
  plain = ml_collections.ConfigDict({**model_cfg.to_dict(), "remat": "none"})
  cpu = parallel.DataParallel(jax.devices("cpu")[:1])
  lowered = _lower(config, plain, data, plan, cpu, config.batch_size // par.num_devices)[0]
  return _cost(lowered.cost_analysis()).get("flops")


def _cost(analysis) -> dict:
  """XLA's cost analysis as {'flops', 'bytes accessed'} (positive values only).

  A loop's body counts once in it: with several steps per dispatch these are still the
  figures of one step.
  """
  if isinstance(analysis, (list, tuple)):  # Older JAX: one dict per computation.
    analysis = analysis[0] if analysis else None
  analysis = analysis or {}
  return {k: float(analysis[k]) for k in ("flops", "bytes accessed") if analysis.get(k, 0) > 0}


def _train_inputs(data: DataSpec, par, plan, batch: int):
  """(shapes, partition specs, bytes of the eval split kept on each device) of a train
  chunk's inputs, as the data source lays them out (see data/memory.py, data/stream.py)."""
  split = par.sharding(parallel.STEPS_BATCH)
  if data.on_device:
    # Whole splits on every device, and the example ids of an epoch plus one chunk (the
    # window MemorySource.train_batches sends once per epoch).
    num_steps = plan.steps_per_epoch + plan.steps_per_dispatch
    replicated = par.sharding(parallel.REPLICATED)
    table = {
      "image": jax.ShapeDtypeStruct((data.num_train, *data.image_shape), jnp.uint8),
      "label": jax.ShapeDtypeStruct((data.num_train,), jnp.int32),
    }
    table = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), table
    )
    inputs = {
      "table": table,
      "idx": jax.ShapeDtypeStruct((num_steps, batch), jnp.int32, sharding=split),
      "first": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),  # plan.at_step
    }
    specs = {
      "table": parallel.REPLICATED,
      "idx": parallel.STEPS_BATCH,
      "first": parallel.REPLICATED,
    }
    return inputs, specs, data.num_eval * (math.prod(data.image_shape) + 4)
  num_steps = plan.steps_per_dispatch
  inputs = {
    "image": jax.ShapeDtypeStruct((num_steps, batch, *data.image_shape), jnp.uint8, sharding=split),
    "label": jax.ShapeDtypeStruct((num_steps, batch), jnp.int32, sharding=split),
  }
  return inputs, {k: parallel.STEPS_BATCH for k in inputs}, 0


def _bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded shapes."""
  return sum(
    math.prod(s.sharding.shard_shape(s.shape)) * np.dtype(s.dtype).itemsize
    for s in jax.tree.leaves(tree)
  )


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": GiB, "T": 1 << 40}


def _oom_memory(message: str, sizes: dict) -> dict:
  """What libtpu's out-of-memory error says (its temporaries), plus what is known anyway.

  libtpu gives up at the first memory space that overflows, e.g. "the total memory
  required for HLO temporaries (65.40G) exceeds available HBM (15.75G)".
  """
  found = re.search(r"temporaries \(([\d.]+)([KMGT]?)i?B?\)", message)
  temps = int(float(found.group(1)) * _UNITS[found.group(2)]) if found else 0
  state = sum(v for k, v in sizes.items() if k not in ("input batches", "eval split (on device)"))
  return {
    "arguments": state + sizes["input batches"],
    "outputs": state,
    "aliased": state,
    "temporaries": temps,
    "generated code": 0,
  }


def _first_line(e: Exception) -> str:
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  return lines[0][:300] if lines else type(e).__name__


def _plural(n: int, what: str) -> str:
  return f"{n:,} {what}{'' if n == 1 else 's'}"
