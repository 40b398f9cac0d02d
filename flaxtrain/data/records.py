"""One process's share of a train or eval batch, built from records: what input workers run.

`TrainStep(step)` and `EvalStep(k)` are pure functions of the step (and the seed): they read
the records of this process's rows of the global batch (the index plan), decode and
preprocess them, and return uint8 images and int32 labels. Each call builds a whole
batch, so with Grain's workers each worker builds whole batches and the output order,
and so every batch, is the same for 0, 1 or 16 workers. Augmentation draws come from
`(seed, step, global row)`.

numpy, OpenCV and the record source only: input workers never touch JAX.
"""

import resource
import signal

import numpy as np

from flaxtrain.data import plan as plan_lib
from flaxtrain.data import preprocess

# Seeds of host-side random draws: (seed, _HOST_AUGMENT, step, global row).
_HOST_AUGMENT = 0x5EED


def worker_init(worker_index: int, num_workers: int) -> None:
  """Runs first in every input worker process.

  Stop signals are the training process's to handle: it finishes its step, saves and then
  stops the workers. Left to Python's defaults, a Ctrl-C or SIGTERM sent to the process
  group would kill the workers first and turn a clean stop into an input failure. Each
  worker keeps one open reader per shard (ImageNet: ~1,100 files), hence the file limit.
  """
  del worker_index, num_workers
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  raise_file_limit()


def raise_file_limit() -> None:
  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
  if hard == resource.RLIM_INFINITY or soft < hard:
    try:
      resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
      pass  # Not allowed here: the soft limit stays, which is only a risk for huge datasets.


class RecordError(ValueError):
  """A record could not be read or decoded; the message names it."""


class _Steps:
  def __init__(
    self,
    source,
    split: str,
    rows: np.ndarray,
    transform: preprocess.Transform,
    shape: tuple[int, int, int],
  ):
    self.source = source  # A random-access source: len(), source[i] -> {'image', 'label'}.
    self.split = split
    # This process's global rows, ascending (StreamSource._global relies on it).
    self.rows = np.asarray(rows, np.int64)
    self.transform = transform
    self.shape = tuple(shape)

  def example(self, record_id: int, rng) -> tuple[np.ndarray, int]:
    """(image, label) of one record, or a RecordError that names it."""
    try:
      record = self.source[record_id]
      image = self.transform(record["image"], rng)
    except preprocess.DecodeError as e:
      raise RecordError(
        f"record {record_id} of split {self.split!r} could not be decoded ({e})"
      ) from e
    except (OSError, KeyError, IndexError, ValueError) as e:
      raise RecordError(
        f"record {record_id} of split {self.split!r} could not be read "
        f"({type(e).__name__}: {' '.join(str(e).split())[:200]})"
      ) from e
    if image.shape != self.shape:
      raise RecordError(
        f"record {record_id} of split {self.split!r} has an image of shape "
        f"{image.shape}, not {self.shape}"
      )
    return image, int(record["label"])


class TrainStep(_Steps):
  """step -> this process's rows of the global batch of that train step (0-based)."""

  def __init__(self, source, split, rows, transform, shape, plan: plan_lib.IndexPlan):
    super().__init__(source, split, rows, transform, shape)
    self.plan = plan

  def __call__(self, step: int) -> dict:
    step = int(step)
    ids = self.plan.step_indices(step)[self.rows]
    images = np.empty((len(ids), *self.shape), np.uint8)
    labels = np.empty((len(ids),), np.int32)
    random = self.transform.train and self.transform.random_resized_crop
    for i, (row, rid) in enumerate(zip(self.rows, ids, strict=True)):
      rng = (
        np.random.default_rng([self.plan.seed, _HOST_AUGMENT, step, int(row)]) if random else None
      )
      images[i], labels[i] = self.example(int(rid), rng)
    return {"image": images, "label": labels}


class EvalStep(_Steps):
  """k -> this process's rows of eval batch k; rows past the split are masked padding."""

  def __init__(self, source, split, rows, transform, shape, num_eval: int, eval_batch_size: int):
    super().__init__(source, split, rows, transform, shape)
    self.num_eval = num_eval
    self.eval_batch_size = eval_batch_size

  def __call__(self, k: int) -> dict:
    ids = int(k) * self.eval_batch_size + self.rows
    images = np.zeros((len(ids), *self.shape), np.uint8)
    labels = np.zeros((len(ids),), np.int32)
    mask = (ids < self.num_eval).astype(np.float32)
    for i, rid in enumerate(ids):
      if rid < self.num_eval:  # Padding rows stay zero: no record is read for them.
        images[i], labels[i] = self.example(int(rid), None)
    return {"image": images, "label": labels, "mask": mask}
