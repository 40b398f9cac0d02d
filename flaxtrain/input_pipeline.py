"""Batches as a pure function of (seed, epoch, step), laid out over the devices.

The decoded dataset lives in host memory (`datasets.load`). The global batch of step
`s` is rows `[p*B, (p+1)*B)` of the permutation of epoch `s // steps_per_epoch`, drawn
from `(seed, epoch)`; device `d` of the mesh gets the `d`-th slice of it. So the
examples seen at each step do not depend on the number of processes or devices, and a
resumed run sees exactly the batches the uninterrupted run would have seen.

Two layouts, same batches:
  * on device: the whole split is copied once to every device; each step sends only
    int32 indices and the device gathers its examples (no input stalls);
  * host: each process gathers the rows its own devices need and transfers them.
Eval pads the last batch with masked rows so every example counts exactly once.
"""

import dataclasses
import math

import numpy as np

from flaxtrain import parallel
from flaxtrain.errors import UserError

# A split up to this size (bytes, per device) is kept on the devices in 'auto' mode.
ON_DEVICE_LIMIT = 1 << 30


@dataclasses.dataclass
class Batches:
  """Device inputs for `take`: either a table plus indices, or the examples themselves."""

  inputs: dict
  specs: dict


def take(inputs: dict, i):
  """Per-device: the i-th batch of a chunk as {'image', 'label'[, 'mask']}."""
  if "idx" in inputs:
    idx = inputs["idx"][i]
    batch = {k: inputs["table"][k][idx] for k in ("image", "label")}
  else:
    batch = {k: inputs[k][i] for k in ("image", "label")}
  if "mask" in inputs:
    batch["mask"] = inputs["mask"][i]
  return batch


class Pipeline:
  """Turns step numbers into device inputs for train and eval."""

  def __init__(self, train: dict, evald: dict, *, par: parallel.DataParallel, seed: int,
               batch_size: int, eval_batch_size: int, on_device: str = "auto"):
    self.par = par
    self.train, self.eval = train, evald
    self.seed = seed
    self.batch_size = batch_size
    n = par.num_devices
    # Eval batches only need to split evenly; padding keeps the count exact anyway.
    self.eval_batch_size = int(math.ceil(eval_batch_size / n) * n)
    self.num_train = len(train["label"])
    self.num_eval = len(evald["label"])
    self.steps_per_epoch = self.num_train // batch_size
    if self.steps_per_epoch == 0:
      raise UserError(f"batch_size {batch_size} is larger than the {self.num_train} training "
                      "examples: lower --config.batch_size.")
    self.on_device = self._decide_on_device(on_device)
    self._tables = {}
    self._perm_epoch, self._perm = None, None

  def _decide_on_device(self, mode) -> bool:
    if mode in (True, "true", "True", "yes"):
      return True
    if mode in (False, "false", "False", "no"):
      return False
    if mode != "auto":
      raise UserError(f"dataset.on_device must be 'auto', 'true' or 'false', got {mode!r}.")
    size = sum(v.nbytes for s in (self.train, self.eval) for v in s.values())
    return size <= ON_DEVICE_LIMIT

  def permutation(self, epoch: int) -> np.ndarray:
    if self._perm_epoch != epoch:  # Chunks rarely span epochs: caching one is enough.
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_train)
      self._perm_epoch = epoch
    return self._perm

  def train_indices(self, start_step: int, num_steps: int, chunk: int) -> np.ndarray:
    """[chunk, batch_size] example ids for steps start..start+num_steps (rest zero)."""
    out = np.zeros((chunk, self.batch_size), np.int32)
    for j in range(num_steps):
      epoch, pos = divmod(start_step + j, self.steps_per_epoch)
      out[j] = self.permutation(epoch)[pos * self.batch_size:(pos + 1) * self.batch_size]
    return out

  def eval_indices(self) -> tuple[np.ndarray, np.ndarray]:
    """[steps, eval_batch] ids and mask covering every eval example exactly once."""
    steps = int(math.ceil(self.num_eval / self.eval_batch_size))
    flat = np.arange(steps * self.eval_batch_size)
    mask = (flat < self.num_eval).astype(np.float32)
    idx = np.where(flat < self.num_eval, flat, 0).astype(np.int32)
    shape = (steps, self.eval_batch_size)
    return idx.reshape(shape), mask.reshape(shape)

  def _table(self, name: str, split: dict):
    if name not in self._tables:
      self._tables[name] = self.par.replicate(split)
    return self._tables[name]

  def _batches(self, name: str, split: dict, idx: np.ndarray) -> Batches:
    if self.on_device:
      return Batches(
          inputs={"table": self._table(name, split),
                  "idx": self.par.put(idx, parallel.STEPS_BATCH)},
          specs={"table": parallel.REPLICATED, "idx": parallel.STEPS_BATCH})
    inputs = {}
    for key, values in split.items():
      shape = idx.shape + values.shape[1:]
      # Only the rows of this process's devices are gathered on the host.
      inputs[key] = self.par.put_from_callback(
          shape, parallel.STEPS_BATCH,
          lambda index, v=values: v[idx[index[:2]]])
    return Batches(inputs=inputs, specs={k: parallel.STEPS_BATCH for k in inputs})

  def train_batches(self, start_step: int, num_steps: int, chunk: int) -> Batches:
    return self._batches("train", self.train, self.train_indices(start_step, num_steps, chunk))

  def eval_batches(self) -> Batches:
    idx, mask = self.eval_indices()
    b = self._batches("eval", self.eval, idx)
    b.inputs["mask"] = self.par.put(mask, parallel.STEPS_BATCH)
    b.specs["mask"] = parallel.STEPS_BATCH
    return b
