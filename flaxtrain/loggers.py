"""Where a run's metrics go: TensorBoard in the workdir, and the wandb and MLflow trackers.

`--config.loggers` is a comma-separated list (default 'tensorboard'). `create_writer`
puts them all behind one writer that writes in a background thread (CLU's `asynclib`, as
CLU's default writer does; CLU's writers themselves import TensorFlow, see event_files.py);
only process 0 writes, the other processes only log. Each tracker's run
id is kept in <workdir>/trackers.json, so a run resumed in its workdir continues its
tracker runs. A tracker that fails reaches the loop as `asynclib.AsyncError`, as a failed
TensorBoard write does: the loop keeps the last checkpoint and stops with
`failure_message`. The trackers themselves are in trackers.py; see docs/trackers.md.
"""

import contextlib
import difflib
import json
from collections.abc import Mapping
from typing import Any

from absl import logging
from clu import asynclib
from etils import epath

from flaxtrain import event_files, workdirs
from flaxtrain.errors import UserError
from flaxtrain.trackers import (
  PACKAGES,
  TRACKERS,
  Tracker,
  TrackerError,
  import_package,
  one_line,
  tracking_uri,
)

LOGGERS = ("tensorboard", "wandb", "mlflow")
TRACKERS_FILE = "trackers.json"
# How a tracker run ends (MLflow's RunStatus names): KILLED is a run stopped to be resumed.
STATUSES = ("FINISHED", "KILLED", "FAILED")


# ------------------------------------------------------------------ config


def names(config) -> tuple[str, ...]:
  """config.loggers as a tuple of known names, in order, without repeats."""
  value = config.get("loggers", "tensorboard")
  if not isinstance(value, str):
    raise UserError(
      f"loggers must be a comma-separated string such as 'tensorboard,wandb', got {value!r}: "
      "set --config.loggers."
    )
  out = []
  for name in (part.strip() for part in value.split(",")):
    if name and name not in out:
      if name not in LOGGERS:
        close = difflib.get_close_matches(name, LOGGERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(
          f"Unknown logger {name!r}{hint}: --config.loggers takes a comma-separated list of "
          f"{', '.join(LOGGERS)}."
        )
      out.append(name)
  return tuple(out)


def check(config) -> None:
  """Known logger names and their packages installed: one-sentence UserErrors at start-up."""
  for name in names(config):
    if name in PACKAGES:
      import_package(name)


# ------------------------------------------------------------------ the writer


def create_writer(config, workdir: str, *, process_index: int) -> "Writer":
  """One writer for every logger in config.loggers; process 0 writes, the others only log.

  Starts (or, from <workdir>/trackers.json, resumes) the tracker runs now, so that a
  tracker that cannot start is a UserError before training. End it with `Writer.close`
  (or `Writer.abort` on a way out by an error).
  """
  if process_index > 0:
    return Writer([LoggingWriter()])
  selected = names(config)
  if "mlflow" in selected:
    tracking_uri(workdir)  # A gs:// workdir without a tracking server fails before any I/O.
  previous = _read_state(workdir)
  trackers = []
  try:
    for name in selected:
      if name in TRACKERS:
        trackers.append(TRACKERS[name](config, workdir, previous.get(name)))
  except BaseException:
    _write_state(workdir, previous, trackers)  # The next attempt continues the started runs,
    for tracker in trackers:  # which end as failed ones, not as dangling ones.
      with _logged(f"Could not end the {tracker.logger} run"):
        tracker.end("FAILED")
    raise
  _write_state(workdir, previous, trackers)
  writers = [LoggingWriter()]
  if "tensorboard" in selected:
    writers.append(event_files.create(workdir))
  return Writer(writers + trackers)


class Writer:
  """The run's writers, each behind its own background thread (writes in order).

  A failed write is re-raised as `asynclib.AsyncError` by a later write or `flush`.
  """

  def __init__(self, writers):
    self._writers = [_Async(w) for w in writers]
    self._closed = False

  def write_hparams(self, hparams: Mapping[str, Any]):
    for w in self._writers:
      w.write_hparams(hparams)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    for w in self._writers:
      w.write_scalars(step, scalars)

  def flush(self):
    for w in self._writers:
      w.flush()

  @property
  def trackers(self) -> tuple["Tracker", ...]:
    return tuple(w.writer for w in self._writers if isinstance(w.writer, Tracker))

  def write_summary(self, summary: Mapping[str, Any]):
    """The run's final summary (as in summary.json) to every tracker; TensorBoard has none."""
    for w in self._writers:
      w.write_summary(summary)

  def close(self, status: str = "FINISHED"):
    """Writes what is queued and ends the tracker runs with `status` (see STATUSES).

    Every writer is closed; then the first failure is raised (`asynclib.AsyncError` for a
    tracker's). Closing again does nothing.
    """
    if status not in STATUSES:
      raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    if self._closed:
      return
    self._closed = True
    errors = []
    for w in self._writers:
      try:
        w.close(status)
      except Exception as e:
        errors.append(e)
    if errors:
      raise errors[0]

  def abort(self, status: str = "FAILED"):
    """`close(status)` for a way out by an error: a failure to close is logged, not raised."""
    with _logged(f"Could not close the metric writers (ending the runs as {status})"):
      self.close(status)


class _Async:
  """One writer's calls in a background thread, in order (CLU's AsyncWriter, plus the
  summary and the status a tracker run ends with). A call after a failed one raises
  `asynclib.AsyncError`."""

  def __init__(self, writer):
    self._writer = writer
    self._pool = asynclib.Pool(thread_name_prefix=f"{type(writer).__name__}", max_workers=1)

  @property
  def writer(self):
    return self._writer

  def write_hparams(self, hparams: Mapping[str, Any]):
    self._pool(self._writer.write_hparams)(hparams=hparams)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    self._pool(self._writer.write_scalars)(step=step, scalars=scalars)

  def write_summary(self, summary: Mapping[str, Any]):
    if isinstance(self._writer, Tracker):
      self._pool(self._writer.write_summary)(summary=dict(summary))

  def flush(self):
    try:
      self._pool.join()
    finally:
      self._writer.flush()

  def close(self, status: str = "FINISHED"):
    try:
      self.flush()
    except Exception:  # The write that failed is the error to report; still end the run.
      with _logged(f"Could not close {type(self._writer).__name__}"):
        self._end("FAILED")
      raise
    self._end(status)

  def _end(self, status: str):
    if not isinstance(self._writer, Tracker):
      self._writer.close()
      return
    try:
      self._writer.end(status)
    except TrackerError as e:  # As a failed write in the background would arrive.
      raise asynclib.AsyncError(str(e)) from e


def failure_message(error: BaseException, workdir: str) -> str:
  """The one sentence for a writer that failed during the run (e.g. an `asynclib.AsyncError`)."""
  e = error
  while e is not None:
    if isinstance(e, TrackerError):
      return (
        f"{e}: fix it or drop {e.logger} from --config.loggers, then run the same command to "
        "resume; the last complete checkpoint is kept."
      )
    e = e.__cause__
  cause = error.__cause__ or error
  return (
    f"Could not write the TensorBoard metrics in {workdir} ({one_line(cause)}): free space "
    "or use another --workdir; the last complete checkpoint is kept."
  )


class LoggingWriter:
  """Each write as an absl INFO line: CLU's LoggingWriter's format, in the caller's order
  (the loop's lines: '[step] train_... (sorted), steps_per_sec=..., uptime=...')."""

  def write_hparams(self, hparams: Mapping[str, Any]):
    logging.info("[Hyperparameters] %s", hparams)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    values = (f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in scalars.items())
    logging.info("[%d] %s", step, ", ".join(values))

  def flush(self):
    logging.flush()

  def close(self):
    pass


# ------------------------------------------------------------------ helpers


def _read_state(workdir: str) -> dict:
  path = epath.Path(workdir) / TRACKERS_FILE
  if not path.exists():
    return {}
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise UserError(
      f"{path} is not valid JSON ({e}): delete it to start new tracker runs for this workdir."
    ) from e


def _write_state(workdir: str, previous: dict, trackers: list):
  state = {**previous, **{t.logger: t.state for t in trackers}}
  if state != previous:
    workdirs.atomic_write(epath.Path(workdir) / TRACKERS_FILE, json.dumps(state, indent=2))


@contextlib.contextmanager
def _logged(what: str):
  try:
    yield
  except Exception:
    logging.exception("%s.", what)
