"""`--mode=describe`: what a config would train and how long it would take, without a workdir.

Nothing is written: the config is resolved, the data loaded, the model initialized and a
few train steps timed from a fresh state, all in memory. With `--topology=v5e-8` the train
step is instead compiled for that TPU slice without the hardware or the data
(flaxtrain/topology.py): memory per chip, whether it fits, FLOPs and a step-time estimate.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
from clu import parameter_overview

from flaxtrain import resources, steps, workdirs

TIMED_STEPS = 10


def describe(exp, defaults, config_path: str, timed_steps: int = TIMED_STEPS) -> str:
  """The report as text: config changes, data, devices, parameters, FLOPs and time."""
  variables = exp.eval_variables(exp.init_state())
  return "\n".join(
    [
      config_changes(defaults, exp.config, config_path),
      "",
      data_and_devices(exp),
      "",
      parameter_table(variables),
      "",
      flops_line(exp, variables),
      time_line(exp, timed_steps),
      memory_line(exp),
    ]
  )


def memory_line(exp) -> str:
  """Peak memory of this process after the timed steps: the devices' (where the backend
  reports it) and the host's."""
  device = resources.peak_device_bytes(exp.par.local_devices)
  device = (
    f"{resources.human_bytes(device)} per device (the most any device of this process held)"
    if device
    else f"not reported by the {exp.par.devices[0].platform} backend"
  )
  host = resources.human_bytes(resources.peak_host_rss_bytes())
  return f"Memory: peak device {device}; peak host RSS {host} (data, model and the timed steps)."


def describe_topology(config, defaults, config_path: str, topology_name: str) -> str:
  """The report for a TPU slice that is not here; UserError if the step does not fit."""
  from flaxtrain import topology, topology_report  # The report uses this module's formatting.

  analysis = topology.analyze(config, topology.parse(topology_name))
  text = topology_report.report(analysis)
  return "\n".join([config_changes(defaults, config, config_path), "", text])


def config_changes(defaults, config, config_path: str) -> str:
  old, new = _flat(defaults), _flat(config)
  changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
  if not changed:
    return f"Config {config_path}: its defaults, no overrides."
  width = max(len(k) for k in changed)
  lines = [f"Config {config_path}: {len(changed)} value(s) differ from its defaults"]
  lines += [f"  {k:<{width}}  {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}" for k in changed]
  return "\n".join(lines)


def _flat(config) -> dict:
  # Through JSON so that tuples and lists, placeholders and None print the same way.
  return workdirs.flat_config(json.loads(config.to_json_best_effort()))


def data_and_devices(exp) -> str:
  spec, plan, par = exp.spec, exp.plan, exp.par
  batch = exp.config.batch_size
  shape = "x".join(str(d) for d in spec.image_shape)
  epochs = plan.total_steps / plan.steps_per_epoch
  return "\n".join(
    [
      f"Dataset {spec.name}: {spec.num_train:,} train / {spec.num_eval:,} eval examples of "
      f"{shape}, {spec.num_classes} classes; task {exp.task.name}.",
      f"Devices: {par.describe()}.",
      f"Batch {batch:,} = {batch // par.num_devices:,} per device; "
      f"{plan.steps_per_epoch:,} steps per epoch; {plan.total_steps:,} steps "
      f"({epochs:g} epochs), up to {plan.steps_per_dispatch} per dispatch; eval batch "
      f"{exp.data.plan.eval_batch_size:,}.",
    ]
  )


def parameter_table(variables: dict) -> str:
  lines = [
    "Parameters:",
    parameter_overview.get_parameter_overview(variables["params"], include_stats=False),
  ]
  for name, tree in variables.items():
    if name != "params":
      count = sum(np.size(x) for x in jax.tree.leaves(tree))
      lines.append(f"plus {count:,} values in {name!r} (not trained by the optimizer)")
  return "\n".join(lines)


def forward_flops(exp, variables) -> float | None:
  """FLOPs of the model on one eval example, from XLA's cost analysis."""
  x = jnp.zeros((1, *exp.spec.image_shape), jnp.uint8)
  fn = jax.jit(
    lambda v, x: exp.model.apply(v, steps.preprocess(x, exp.dtype, exp.norm), train=False)
  )
  return _flops(fn.lower(variables, x).compile().cost_analysis())


def _flops(analysis) -> float | None:
  if isinstance(analysis, (list, tuple)):  # Older JAX: one dict per computation.
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def flops_line(exp, variables) -> str:
  forward = forward_flops(exp, variables)
  step = exp.train_step_flops()
  per_example = step / exp.config.batch_size if step else None
  return (
    f"FLOPs per example (XLA cost analysis): {_si(forward)} forward, "
    f"{_si(per_example)} per train step."
  )


def time_line(exp, timed_steps: int) -> str:
  step_s = exp.time_train_steps(timed_steps)
  plan = exp.plan
  return (
    f"Time: {step_s * 1e3:.1f} ms per train step, {exp.config.batch_size / step_s:,.0f} "
    f"examples/s ({timed_steps} steps timed after compilation)\n"
    f"  -> {duration(step_s * plan.steps_per_epoch)} per epoch, "
    f"{duration(step_s * plan.total_steps)} for {plan.total_steps:,} steps "
    "(train steps only: eval and checkpoints come on top)."
  )


def _si(value: float | None) -> str:
  if value is None:
    return "n/a"
  for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if value >= scale:
      return f"{value / scale:.2f} {unit}"
  return f"{value:.0f}"


def duration(seconds: float) -> str:
  """'42.0 s', '3.5 min', '2.1 h'."""
  if seconds < 120:
    return f"{seconds:.1f} s"
  if seconds < 7200:
    return f"{seconds / 60:.1f} min"
  return f"{seconds / 3600:.1f} h"
