"""The index plan every data source shares: which examples make up each batch.

The global batch of train step `s` is rows `[pos*B, (pos+1)*B)` of the permutation of
epoch `e`, where `e, pos = divmod(s, steps_per_epoch)` and the permutation is drawn from
`(seed, epoch)`. Device `d` of the mesh gets the `d`-th slice of it, and each process
materialises only its own devices' rows. So the examples seen at each step depend on
nothing but `(seed, step)`: not on the number of processes, devices or input workers,
and a resumed run needs only its step to see exactly the batches that follow.

Eval covers the split in `ceil(N / eval_batch)` batches; rows past the end are padding
with mask 0, so every example counts exactly once on any topology.

numpy only: this module is imported by input worker processes, which never touch JAX.
"""

import dataclasses
import math

import numpy as np

from flaxtrain.errors import UserError


@dataclasses.dataclass
class Batches:
  """Device inputs of one train chunk or one eval chunk, and their partition specs."""

  inputs: dict
  specs: dict


def at_step(inputs: dict, step):
  """Per-device: the inputs of a train chunk whose first step is `step` (the train state's
  step counter, already on the device).

  Where 'idx' holds the ids of many steps from step 'first' on (a whole epoch's, sent to
  the devices once), the chunk's rows start at offset `step - first`: found here, so that
  the host sends nothing per chunk.
  """
  if "first" not in inputs:
    return inputs
  return {**inputs, "offset": step - inputs["first"]}


def take(inputs: dict, i):
  """Per-device: the i-th batch of a chunk as {'image', 'label'[, 'mask']}.

  With an 'offset' (`at_step`), 'idx' holds the ids of many steps and the chunk's batches
  are its rows offset+i.
  """
  if "idx" in inputs:
    if "offset" in inputs:
      i = inputs["offset"] + i
    idx = inputs["idx"][i]
    batch = {k: inputs["table"][k][idx] for k in ("image", "label")}
  else:
    batch = {k: inputs[k][i] for k in ("image", "label")}
  if "mask" in inputs:
    batch["mask"] = inputs["mask"][i]
  return batch


class IndexPlan:
  """Example ids of every train and eval batch, as pure functions of (seed, step)."""

  def __init__(
    self,
    *,
    num_train: int,
    num_eval: int,
    batch_size: int,
    eval_batch_size: int,
    num_devices: int,
    seed: int,
  ):
    self.num_train, self.num_eval = num_train, num_eval
    self.batch_size = batch_size
    self.seed = seed
    # Eval batches only need to split evenly; padding keeps the count exact anyway.
    self.eval_batch_size = int(math.ceil(eval_batch_size / num_devices) * num_devices)
    self.steps_per_epoch = num_train // batch_size
    if self.steps_per_epoch == 0:
      raise UserError(
        f"batch_size {batch_size} is larger than the {num_train} training "
        "examples: lower --config.batch_size."
      )
    self.eval_steps = int(math.ceil(num_eval / self.eval_batch_size))
    self._cached = {}  # {epoch: permutation}, the two newest epochs.

  def permutation(self, epoch: int) -> np.ndarray:
    # Two epochs are kept, since input threads work on both sides of an epoch boundary;
    # the dict is replaced, never changed in place, so a thread never sees it half-made.
    cached = self._cached
    perm = cached.get(epoch)
    if perm is None:
      perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_train)
      newest = max(cached, default=None)
      self._cached = {epoch: perm, **({newest: cached[newest]} if newest is not None else {})}
    return perm

  def step_indices(self, step: int) -> np.ndarray:
    """[batch_size] example ids of the global batch of train step `step` (0-based)."""
    epoch, pos = divmod(step, self.steps_per_epoch)
    return self.permutation(epoch)[pos * self.batch_size : (pos + 1) * self.batch_size]

  def train_indices(self, start_step: int, num_steps: int, chunk: int) -> np.ndarray:
    """[chunk, batch_size] example ids for steps start..start+num_steps (rest zero)."""
    out = np.zeros((chunk, self.batch_size), np.int32)
    for j in range(num_steps):
      out[j] = self.step_indices(start_step + j)
    return out

  def eval_indices(self) -> tuple[np.ndarray, np.ndarray]:
    """[steps, eval_batch] ids and mask covering every eval example exactly once."""
    flat = np.arange(self.eval_steps * self.eval_batch_size)
    mask = (flat < self.num_eval).astype(np.float32)
    idx = np.where(flat < self.num_eval, flat, 0).astype(np.int32)
    shape = (self.eval_steps, self.eval_batch_size)
    return idx.reshape(shape), mask.reshape(shape)
