"""The streaming source: records read by random access, decoded in Grain worker processes.

For datasets larger than memory or with images of varying size (ImageNet). Records come
from TFDS's ArrayRecord files (`tfds.data_source`, raw image bytes); `records.TrainStep`
builds this process's rows of each global batch (the shared index plan) and Grain runs
it in `workers` processes with `threads` threads each, `prefetch` batches ahead. Grain's
own sampler, sharding and iterator checkpoints are not used: they tie the data order and
the saved state to the process and worker counts. Here the position is the step alone,
so a resumed run rebuilds the pipeline at its step, on any topology and worker count.

Host memory does not grow with the dataset: only the epoch's permutation of record ids
(8 bytes a record) and the batches in flight are held.
"""

import os
import time

import grain
import numpy as np
from absl import flags, logging

from flaxtrain import parallel
from flaxtrain.data import records
from flaxtrain.data.plan import Batches, IndexPlan
from flaxtrain.errors import UserError

# Steps of the train stream: far beyond any run; Grain's datasets are lazy.
_ENDLESS = 1 << 40


def local_rows(par: parallel.DataParallel, batch: int) -> np.ndarray:
  """The global rows of a [batch] array that this process's devices hold, ascending."""
  index_map = par.sharding(parallel.BATCH).addressable_devices_indices_map((batch,))
  ranges = sorted(
    (s[0].start or 0, s[0].stop if s[0].stop is not None else batch) for s in index_map.values()
  )
  return np.concatenate([np.arange(a, b) for a, b in ranges]).astype(np.int64)


def _cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def default_workers(num_workers: int) -> int:
  """-1: one worker per core this process may use, up to 64 (Grain spawns processes; at
  ~800 ImageNet images/s per worker, 32 would just keep up with a v5e-8 host)."""
  if num_workers >= 0:
    return num_workers
  return max(1, min(_cores() or 1, 64))


def default_threads(threads: int, workers: int) -> int:
  """-1: one per worker process (workers x threads ~ cores: measured fastest with workers),
  or one per core, up to 16, when the training process decodes by itself."""
  if threads > 0:
    return threads
  return 1 if workers > 0 else max(1, min(_cores() or 1, 16))


def check_workers(num_workers, threads, prefetch) -> None:
  cores = _cores() or 1
  if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < -1:
    raise UserError(
      f"dataset.workers must be -1 (one per core), 0 (no worker processes) or "
      f"a positive count, got {num_workers!r}."
    )
  if num_workers > 4 * cores:
    raise UserError(
      f"dataset.workers={num_workers} is more than 4x the {cores} CPU cores of "
      f"this machine: use at most {4 * cores}, or -1 for one per core."
    )
  if not isinstance(threads, int) or isinstance(threads, bool) or threads < -1 or threads == 0:
    raise UserError(
      f"dataset.threads must be -1 (automatic) or a positive integer, got {threads!r}."
    )
  if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 1:
    raise UserError(f"dataset.prefetch must be a positive integer, got {prefetch!r}.")


class StreamSource:
  """Train and eval batches built by Grain from a random-access record source."""

  def __init__(
    self,
    train_records,
    eval_records,
    *,
    par: parallel.DataParallel,
    image_shape,
    seed: int,
    batch_size: int,
    eval_batch_size: int,
    train_transform,
    eval_transform,
    train_split: str,
    eval_split: str,
    workers: int,
    threads: int,
    prefetch: int,
  ):
    self.par = par
    self.plan = IndexPlan(
      num_train=len(train_records),
      num_eval=len(eval_records),
      batch_size=batch_size,
      eval_batch_size=eval_batch_size,
      num_devices=par.num_devices,
      seed=seed,
    )
    self.shape = tuple(image_shape)
    self.workers = default_workers(workers)
    self.threads, self.prefetch = default_threads(threads, self.workers), prefetch
    self.description = (
      f"streamed: {self.workers} Grain worker process(es) x {self.threads} "
      f"thread(s) per process, host-side decoding"
    )
    self._train_rows = local_rows(par, batch_size)
    self._eval_rows = local_rows(par, self.plan.eval_batch_size)
    self._train_fn = records.TrainStep(
      train_records, train_split, self._train_rows, train_transform, self.shape, self.plan
    )
    self._eval_fn = records.EvalStep(
      eval_records,
      eval_split,
      self._eval_rows,
      eval_transform,
      self.shape,
      self.plan.num_eval,
      self.plan.eval_batch_size,
    )
    self._train_it, self._next_step = None, None
    self.input_wait_s = 0.0  # Time the loop spent blocked waiting for train batches.
    self.error = None  # Multi-process: this process's input failure, until all agree.

  @property
  def eval_transform(self):
    """What the host does to each eval image (export documents it for callers)."""
    return self._eval_fn.transform

  # ----------------------------------------------------------------- pipelines

  def _iterate(self, dataset: grain.MapDataset, workers: int | None = None):
    workers = self.workers if workers is None else workers
    # Grain submits at most prefetch_buffer_size elements at once: below the thread count,
    # threads would sit idle.
    ds = dataset.to_iter_dataset(
      grain.ReadOptions(
        num_threads=self.threads, prefetch_buffer_size=max(self.prefetch, self.threads)
      )
    )
    if workers > 0:
      if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags (e.g. under pytest).
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=self.prefetch),
        worker_init_fn=records.worker_init,
      )
    return iter(ds)

  def _next(self, it, what: str) -> dict:
    try:
      return next(it)
    except Exception as e:  # Grain re-raises a worker's error, or reports its death.
      _close(it)
      raise _input_error(e, what) from e

  def _global(self, host: np.ndarray, rows: np.ndarray, chunk_shape) -> "jax.Array":  # noqa: F821
    """[chunk, local rows, ...] host values -> a global [chunk, batch, ...] array."""

    def fetch(index):
      a = index[1].start or 0
      b = index[1].stop if index[1].stop is not None else chunk_shape[1]
      i = int(np.searchsorted(rows, a))
      return host[(index[0], slice(i, i + (b - a)), *index[2:])]

    return self.par.put_from_callback(chunk_shape, parallel.STEPS_BATCH, fetch)

  def _batches(self, steps: list[dict], chunk: int, batch: int, rows) -> Batches:
    inputs = {}
    for key in steps[0]:
      first = steps[0][key]
      host = np.zeros((chunk, *first.shape), first.dtype)
      for j, s in enumerate(steps):
        host[j] = s[key]
      inputs[key] = self._global(host, rows, (chunk, batch, *first.shape[1:]))
    return Batches(inputs=inputs, specs={k: parallel.STEPS_BATCH for k in inputs})

  def _blank(self, rows: int, eval_: bool = False) -> dict:
    """Zero images and labels (and, for eval, zero mask): what a failed process feeds."""
    out = {"image": np.zeros((rows, *self.shape), np.uint8), "label": np.zeros((rows,), np.int32)}
    return {**out, "mask": np.zeros((rows,), np.float32)} if eval_ else out

  def _failed(self, error: UserError, blank: dict) -> dict:
    """Alone, fail now. With other processes, fail at the next point they all check
    (`raise_if_failed`), feeding blanks until then: raising alone would leave the others
    waiting forever in the step's collectives."""
    if self.par.num_processes == 1:
      raise error
    if self.error is None:
      logging.error("%s", error)
      self.error = error
    return blank

  # ----------------------------------------------------------------- the interface

  def train_batches(self, start_step: int, num_steps: int, chunk: int) -> Batches:
    if self.error is None and self._next_step != start_step:  # New run, resume or jump.
      self.close()
      dataset = grain.MapDataset.range(start_step, _ENDLESS).map(self._train_fn)
      self._train_it, self._next_step = self._iterate(dataset), start_step
    t = time.perf_counter()
    steps = []
    for _ in range(num_steps):
      try:
        steps.append(
          self._blank(len(self._train_rows)) if self.error else self._next(self._train_it, "train")
        )
      except UserError as e:
        self._train_it = None
        steps.append(self._failed(e, self._blank(len(self._train_rows))))
    self.input_wait_s += time.perf_counter() - t
    if self._next_step is not None:
      self._next_step += num_steps
    return self._batches(steps, chunk, self.plan.batch_size, self._train_rows)

  def eval_batches(self):
    """One masked eval batch per chunk, built by the workers as they go."""
    it = self._iterate(
      grain.MapDataset.range(self.plan.eval_steps).map(self._eval_fn),
      workers=min(self.workers, self.plan.eval_steps),
    )
    try:
      for _ in range(self.plan.eval_steps):
        try:
          step = (
            self._blank(len(self._eval_rows), eval_=True) if self.error else self._next(it, "eval")
          )
        except UserError as e:
          step = self._failed(e, self._blank(len(self._eval_rows), eval_=True))
        yield self._batches([step], 1, self.plan.eval_batch_size, self._eval_rows)
    finally:
      _close(it)

  def raise_if_failed(self) -> None:
    """Multi-process: raises on every process if input failed on any (all must call it)."""
    if self.par.num_processes == 1:
      return
    from jax.experimental import multihost_utils

    failed = multihost_utils.process_allgather(np.int32(self.error is not None))
    if self.error is not None:
      raise self.error
    if np.any(failed):
      bad = ", ".join(str(i) for i in np.flatnonzero(failed))
      raise UserError(
        f"Input failed on process {bad} (its log says why): the last "
        "checkpoint is kept; fix the data and run the same command to resume."
      )

  def eval_examples(self, num: int) -> dict:
    """The first `num` eval examples as the model sees them (decoded here, no workers)."""
    num = min(num, self.plan.num_eval)
    images = np.zeros((num, *self.shape), np.uint8)
    labels = np.zeros((num,), np.int32)
    for i in range(num):
      try:
        images[i], labels[i] = self._eval_fn.example(i, None)
      except records.RecordError as e:
        raise _input_error(e, "eval") from e
    return {"image": images, "label": labels}

  def close(self):
    if self._train_it is not None:
      _close(self._train_it)
      self._train_it, self._next_step = None, None


def _close(it) -> None:
  """Stops an iterator's worker processes and frees its shared-memory buffers now."""
  close = getattr(it, "close", None)
  if close is not None:
    try:
      close()
    except Exception as e:  # A worker already gone: nothing left to stop.
      logging.debug("Closing an input pipeline: %s", e)


def _input_error(e: Exception, what: str) -> UserError:
  """A one-sentence UserError for an exception raised while reading `what` input."""
  if isinstance(e, UserError):
    return e
  cause = e if isinstance(e, records.RecordError) else e.__cause__
  if isinstance(cause, records.RecordError) or "RecordError" in f"{type(e).__name__} {e}":
    detail = " ".join(str(cause or e).split())[:300]
    return UserError(
      f"Input failed: {detail}: the prepared files are damaged; delete the "
      "dataset's version directory in the TFDS data dir and prepare it again "
      "(python -m flaxtrain.datasets NAME), or check the disk."
    )
  if isinstance(e, StopIteration):
    return UserError(f"The {what} input ended early: report this as a bug.")
  return UserError(
    f"An input worker failed ({type(e).__name__}: "
    f"{' '.join(str(e).split())[:200]}): the last checkpoint is kept; run the "
    "same command to resume."
  )
