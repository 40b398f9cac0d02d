"""Orbax checkpoints of the replicated train state: save, keep, restore, check structure."""

import os

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

from flaxtrain.errors import UserError

BEST_METRIC = "eval_accuracy"


class Checkpointer:
  """Keeps the newest `keep` checkpoints plus the best by eval accuracy; async saves."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory) if "://" not in directory else directory
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=keep),
        checkpoint_managers.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1,
                                  keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, metrics: dict | None = None, force: bool = False) -> bool:
    if metrics is not None:
      metrics = {k: float(v) for k, v in metrics.items()}
    tree = flax.serialization.to_state_dict(state)
    return self.manager.save(step, args=ocp.args.StandardSave(tree), metrics=metrics,
                             force=force)

  def restore(self, step: int, target):
    """Restores `step` into the structure, shapes and shardings of `target`."""
    tree = flax.serialization.to_state_dict(target)
    check_structure(self.manager.item_metadata(step), tree, where=self.directory)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
    return flax.serialization.from_state_dict(target, restored)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def _describe(tree) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): tuple(getattr(leaf, "shape", np.shape(leaf)))
          for path, leaf in flat}


def check_structure(saved, target, *, where: str):
  """Raises a UserError naming the first entry where `saved` and `target` differ."""
  if saved is None:
    return
  saved_d, target_d = _describe(saved), _describe(target)
  for key in sorted(set(saved_d) | set(target_d)):
    a, b = saved_d.get(key), target_d.get(key)
    if a != b:
      logging.info("Checkpoint entries: %s", sorted(saved_d))
      raise UserError(
          f"The checkpoint in {where} does not match what this config builds: entry {key} is "
          f"{'missing' if a is None else a} in the checkpoint but "
          f"{'missing' if b is None else b} in the config; use a new --workdir or the "
          "config that wrote it.")
