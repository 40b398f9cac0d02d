"""The in-memory source: a decoded fixed-size dataset held in host memory.

For splits that fit comfortably in memory (MNIST, CIFAR). Batches follow the shared index
plan (`plan.py`), in one of two layouts with the same batches:
  * on device: the whole split is copied once to every device, and each epoch's int32
    indices once per epoch; a chunk sends nothing (the device finds its rows from its
    step counter, `plan.at_step`) and gathers its examples (no input stalls);
  * host: each process gathers the rows its own devices need and transfers them.
"""

import hashlib
import os
import pathlib
import uuid
import zipfile

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from flaxtrain import console, parallel
from flaxtrain.data import prepare
from flaxtrain.data.plan import Batches, IndexPlan
from flaxtrain.errors import UserError

# Decoded splits are kept here, inside the prepared version's directory, for the next run.
DECODED_DIR = "flaxtrain-decoded"
# A split up to this size (bytes, per device) is kept on the devices in 'auto' mode.
ON_DEVICE_LIMIT = 1 << 30
_READ_BATCH = 4096  # Examples decoded per TF step when reading a split into memory.


def load(
  name: str,
  *,
  data_dir: str | None = None,
  manual_dir: str | None = None,
  train_split: str = "train",
  eval_split: str = "test",
) -> tuple[prepare.DatasetSpec, dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Returns (spec, train, eval); each split is {'image': uint8 [N,H,W,C], 'label': int32 [N]}."""
  builder = prepare.prepare(name, data_dir=data_dir, manual_dir=manual_dir)
  for split in (train_split, eval_split):  # Both checked before decoding either.
    prepare.check_split(builder, split)
  shape = tuple(builder.info.features["image"].shape)
  if None in shape[:2]:
    raise UserError(
      f"Dataset {name!r} has images of varying size {shape}, which cannot be "
      "held as one array in memory: set --config.dataset.source=stream (or auto)."
    )
  # Prepared for streaming only (ArrayRecord): read the records one by one instead.
  read = (
    _read_split
    if prepare.has_format(builder, "tfrecord") or not builder.info.splits
    else _read_records
  )
  train, eval_ = _decoded(builder, train_split, read), _decoded(builder, eval_split, read)
  label = builder.info.features["label"]
  spec = prepare.DatasetSpec(
    name=name,
    image_shape=tuple(builder.info.features["image"].shape),
    num_classes=label.num_classes,
    class_names=tuple(label.names),
    train_split=train_split,
    eval_split=eval_split,
    num_train=len(train["label"]),
    num_eval=len(eval_["label"]),
  )
  return spec, train, eval_


def keep_decoded(builder, splits) -> None:
  """Decodes `splits` of a prepared dataset now and keeps their copies (see `_decoded`):
  the first training run then starts as fast as later ones."""
  read = _read_split if prepare.has_format(builder, "tfrecord") else _read_records
  for split in splits:
    _decoded(builder, split, read)


def _decoded(builder, split: str, read) -> dict[str, np.ndarray]:
  """`read(builder, split)`, through a decoded copy kept beside the prepared files.

  Decoding Fashion-MNIST's 70,000 PNGs takes seconds at every start; the copy (uncompressed
  .npz) loads in milliseconds. It is named after the split and a fingerprint of the
  prepared files (names, sizes, times), so data prepared again is decoded again. Written to
  a temporary name and renamed, so a reader never sees half a file. Only where the data
  lies on a local file system and has been prepared (not under TFDS's mock data).
  """
  directory = pathlib.Path(str(builder.data_dir))
  if not directory.is_dir():
    return read(builder, split)
  files = sorted(
    (f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in directory.iterdir() if f.is_file()
  )
  if not any(".tfrecord" in name or ".array_record" in name for name, _, _ in files):
    return read(builder, split)
  key = hashlib.sha256(repr((split, files)).encode()).hexdigest()[:16]
  stem = "".join(c if c.isalnum() else "_" for c in split)
  path = directory / DECODED_DIR / f"{stem}-{key}.npz"
  if path.exists():
    try:
      with np.load(path) as f:
        arrays = {"image": f["image"], "label": f["label"]}
      if arrays["image"].dtype == np.uint8 and len(arrays["image"]) == len(arrays["label"]):
        logging.info("Dataset %s, split %s: read the decoded copy %s.", builder.name, split, path)
        return arrays
      logging.warning("The decoded copy %s does not hold a split: decoding again.", path)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
      logging.warning("Could not read the decoded copy %s (%s): decoding again.", path, e)
  arrays = read(builder, split)
  try:
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
      with open(tmp, "wb") as f:
        np.savez(f, **arrays)
      os.replace(tmp, path)
    finally:
      tmp.unlink(missing_ok=True)
    for old in path.parent.glob(f"{stem}-*.npz"):  # Copies of data prepared before.
      if old != path:
        old.unlink(missing_ok=True)
    logging.info("Dataset %s, split %s: kept a decoded copy in %s.", builder.name, split, path)
  except OSError as e:
    logging.warning(
      "Could not keep a decoded copy of split %s in %s (%s): the next run decodes it again.",
      split,
      path.parent,
      e,
    )
  return arrays


def _read_split(builder, split: str) -> dict[str, np.ndarray]:
  """Decodes a whole split into memory as {'image': uint8 NHWC, 'label': int32}.

  Read in fixed-size batches, not `batch_size=-1`: when the split sizes are unknown (as
  under `tfds.testing.mock_data`), TFDS turns -1 into sys.maxsize and TF aborts the process.
  """
  console.import_tensorflow_quietly()  # tf.data reads the records.
  chunks = list(tfds.as_numpy(builder.as_dataset(split=split, batch_size=_READ_BATCH)))
  # TFDS images always carry a channel axis, (H, W, 1) for grayscale; labels come as int64.
  return {
    "image": np.concatenate([c["image"] for c in chunks]).astype(np.uint8, copy=False),
    "label": np.concatenate([c["label"] for c in chunks]).astype(np.int32),
  }


def _read_records(builder, split: str) -> dict[str, np.ndarray]:
  """Like `_read_split`, from ArrayRecord files through `tfds.data_source` (numpy decode)."""
  source = builder.as_data_source(split=split)
  n = len(source)
  first = source[0]
  images = np.empty((n, *np.shape(first["image"])), np.uint8)
  labels = np.empty((n,), np.int32)
  for i in range(n):
    record = source[i]
    images[i], labels[i] = record["image"], record["label"]
  return {"image": images, "label": labels}


class MemorySource:
  """Turns step numbers into device inputs for train and eval, from host arrays."""

  def __init__(
    self,
    train: dict,
    evald: dict,
    *,
    par: parallel.DataParallel,
    seed: int,
    batch_size: int,
    eval_batch_size: int,
    on_device: str = "auto",
  ):
    self.par = par
    self.train, self.eval = train, evald
    self.plan = IndexPlan(
      num_train=len(train["label"]),
      num_eval=len(evald["label"]),
      batch_size=batch_size,
      eval_batch_size=eval_batch_size,
      num_devices=par.num_devices,
      seed=seed,
    )
    self.on_device = self._decide_on_device(on_device)
    self.description = "in memory, on device" if self.on_device else "in memory, gathered on host"
    self._tables = {}
    self._window = (0, 0, None)  # (first step, steps, Batches of their ids): train_batches.
    self._eval_batches = None
    self.input_wait_s = None  # Batches are gathered when asked for: nothing to wait for.

  def _decide_on_device(self, mode) -> bool:
    return on_device(mode, sum(v.nbytes for s in (self.train, self.eval) for v in s.values()))

  def _table(self, name: str, split: dict):
    if name not in self._tables:
      self._tables[name] = self.par.replicate(split)
    return self._tables[name]

  def _batches(self, name: str, split: dict, idx, put: bool = True) -> Batches:
    if self.on_device:
      if put:
        idx = self.par.put(idx, parallel.STEPS_BATCH)
      return Batches(
        inputs={"table": self._table(name, split), "idx": idx},
        specs={"table": parallel.REPLICATED, "idx": parallel.STEPS_BATCH},
      )
    inputs = {}
    for key, values in split.items():
      shape = idx.shape + values.shape[1:]
      # Only the rows of this process's devices are gathered on the host.
      inputs[key] = self.par.put_from_callback(
        shape, parallel.STEPS_BATCH, lambda index, v=values: v[idx[index[:2]]]
      )
    return Batches(inputs=inputs, specs={k: parallel.STEPS_BATCH for k in inputs})

  def train_batches(self, start_step: int, num_steps: int, chunk: int) -> Batches:
    if not self.on_device:
      idx = self.plan.train_indices(start_step, num_steps, chunk)
      return self._batches("train", self.train, idx)
    # The ids of a whole epoch (plus one chunk past its end, for chunks that cross it) go
    # to the devices once, with the step of their first row; each chunk's rows start at
    # its state's step counter minus that (`plan.at_step`), so a chunk sends nothing.
    first, count, window = self._window
    if not first <= start_step <= start_step + num_steps <= first + count:
      spe = self.plan.steps_per_epoch
      first, count = start_step // spe * spe, spe + chunk
      ids = self.par.put(self.plan.train_indices(first, count, count), parallel.STEPS_BATCH)
      window = self._batches("train", self.train, ids, put=False)
      window.inputs["first"] = self.par.replicate(np.int32(first))
      window.specs["first"] = parallel.REPLICATED
      self._window = first, count, window
    return window

  def eval_batches(self):
    """The eval split as chunks of masked batches; here one chunk, kept on the devices."""
    if self._eval_batches is None:
      idx, mask = self.plan.eval_indices()
      b = self._batches("eval", self.eval, idx)
      b.inputs["mask"] = self.par.put(mask, parallel.STEPS_BATCH)
      b.specs["mask"] = parallel.STEPS_BATCH
      self._eval_batches = b
    yield self._eval_batches

  def eval_examples(self, num: int) -> dict:
    """The first `num` eval examples as host arrays, as the model sees them."""
    return {k: v[:num] for k, v in self.eval.items()}

  def raise_if_failed(self) -> None:
    pass  # Nothing here fails on one process alone.

  def close(self):
    pass


def on_device(mode, nbytes: int) -> bool:
  """Whether in-memory splits of `nbytes` live on every device: config.dataset.on_device
  ('auto': up to ON_DEVICE_LIMIT) decides."""
  if mode in (True, "true", "True", "yes"):
    return True
  if mode in (False, "false", "False", "no"):
    return False
  if mode != "auto":
    raise UserError(f"dataset.on_device must be 'auto', 'true' or 'false', got {mode!r}.")
  return nbytes <= ON_DEVICE_LIMIT
