"""`--mode=eval`: one checkpoint of a finished (or running) run, evaluated exactly.

Also what every mode that reads a run shares: the checks that the workdir and the
requested checkpoint exist, before any data is loaded, and all-or-nothing output dirs.
"""

import json

from absl import logging
from etils import epath

from flaxtrain import workdirs
from flaxtrain.errors import UserError

# Config keys that change what a checkpoint means; other differences (optimizer, length)
# do not matter once the run is trained.
_MEANINGFUL = ("dataset.", "model.", "task.", "compute_dtype")


def check_run(workdir: str, step: int | str):
  """Raises a UserError unless `workdir` holds checkpoints (and `step`, if a number)."""
  path = epath.Path(workdir)
  if not path.is_dir():
    raise UserError(
      f"--workdir {workdir} does not exist: pass the --workdir of a run, or "
      "train one there first with --mode=train."
    )
  steps = checkpoint_steps(workdir)
  if not steps:
    raise UserError(
      f"--workdir {workdir} has no checkpoints: pass the --workdir of a run, "
      "or train there first with --mode=train."
    )
  if isinstance(step, int) and step not in steps:
    raise UserError(
      f"--workdir {workdir} has no checkpoint at step {step}: pass --step="
      f"latest, best or one of {', '.join(str(s) for s in steps)}."
    )


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the complete checkpoints (Orbax's temporary directories are not digits)."""
  path = epath.Path(workdir) / "checkpoints"
  if not path.is_dir():
    return []
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit())


def restore(exp, workdir: str, step: int | str):
  """(state, step) of the requested checkpoint, after warning about a differing config."""
  _warn_if_config_differs(exp.config, workdir)
  state, restored_step = exp.restore(workdir, step)
  logging.info(
    "Restored the checkpoint at step %d (--step=%s) from %s.", restored_step, step, workdir
  )
  return state, restored_step


def _warn_if_config_differs(config, workdir: str):
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    return
  try:
    saved = workdirs.flat_config(json.loads(path.read_text()))
  except (ValueError, AttributeError):
    return  # A damaged config.json is only a record; the checkpoint is what counts.
  # Through JSON both ways, so that tuples compare equal to the lists they were saved as.
  current = workdirs.flat_config(json.loads(config.to_json_best_effort()))
  differ = sorted(
    k
    for k in set(saved) | set(current)
    if k.startswith(_MEANINGFUL) and saved.get(k) != current.get(k)
  )
  if differ:
    logging.warning(
      "The config differs from the one that trained %s in %s: results are "
      "for this config's data and model.",
      workdir,
      ", ".join(f"{k} ({saved.get(k)!r} there, {current.get(k)!r} here)" for k in differ),
    )


def run(exp, workdir: str, step: int | str = "latest") -> tuple[int, dict]:
  """Evaluates the checkpoint; writes `<workdir>/eval_<step>.json`; returns (step, metrics)."""
  check_run(workdir, step)
  state, restored_step = restore(exp, workdir, step)
  metrics = exp.evaluate(state)
  if exp.par.process_index == 0:
    path = epath.Path(workdir) / f"eval_{restored_step}.json"
    record = {"step": restored_step, "requested": str(step), **metrics}
    workdirs.atomic_write(path, json.dumps(record, indent=2))
    logging.info("Wrote %s", path)
  return restored_step, metrics


def metrics_text(metrics: dict) -> str:
  """'eval accuracy 0.9283, eval loss 0.2058': the eval metrics of `metrics`, loss last."""
  keys = sorted(
    (k for k in metrics if k.startswith("eval_") and k != "eval_examples"),
    key=lambda k: k == "eval_loss",
  )
  return ", ".join(f"{k.replace('_', ' ')} {metrics[k]:.4f}" for k in keys)


def summary_line(step: int, metrics: dict, workdir: str) -> str:
  return (
    f"flaxtrain: step {step}: {metrics_text(metrics)} on {metrics['eval_examples']} "
    f"examples; written to {epath.Path(workdir) / f'eval_{step}.json'}"
  )
