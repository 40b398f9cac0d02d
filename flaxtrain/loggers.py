"""Where a run's metrics go: TensorBoard in the workdir, and the wandb and MLflow trackers.

`--config.loggers` is a comma-separated list (default 'tensorboard'). `create_writer`
puts them all behind one writer that writes in a background thread (CLU's `asynclib`, as
CLU's default writer does; CLU's writers themselves import TensorFlow, see event_files.py);
only process 0 writes, the other processes only log. Each tracker's run
id is kept in <workdir>/trackers.json, so a run resumed in its workdir continues its
tracker runs. A tracker that fails reaches the loop as `asynclib.AsyncError`, as a failed
TensorBoard write does: the loop keeps the last checkpoint and stops with
`failure_message`. See docs/trackers.md.
"""

import contextlib
import difflib
import importlib
import json
import os
import pathlib
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any

from absl import logging
from clu import asynclib
from etils import epath

from flaxtrain import event_files, workdirs
from flaxtrain.errors import UserError

LOGGERS = ("tensorboard", "wandb", "mlflow")
# Tracker -> (module to import, flaxtrain extra that installs it).
PACKAGES = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
TRACKERS_FILE = "trackers.json"
DEFAULT_PROJECT = "flaxtrain"
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
      _import(name)


def _import(logger: str):
  module, extra = PACKAGES[logger]
  try:
    return importlib.import_module(module)
  except ImportError as e:
    if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == module:
      raise UserError(
        f"--config.loggers={logger} needs the {module} package: pip install 'flaxtrain[{extra}]'."
      ) from e
    raise UserError(
      f"--config.loggers={logger} could not import {module} ({_one_line(e)}): reinstall it "
      f"with pip install 'flaxtrain[{extra}]'."
    ) from e


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
    f"Could not write the TensorBoard metrics in {workdir} ({_one_line(cause)}): free space "
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


class TrackerError(Exception):
  """A tracker call failed; `logger` is its --config.loggers name."""

  def __init__(self, logger: str, message: str):
    super().__init__(message)
    self.logger = logger


# ------------------------------------------------------------------ trackers


class Tracker:
  """One tracker run: hparams, scalars at their steps, and the summary.

  Subclasses set `logger`, `state` (what trackers.json keeps to resume the run) and
  implement `_hparams`, `_scalars`, `_summary`, `_end`. Every failure is a TrackerError.
  """

  logger = ""
  state: dict

  def write_hparams(self, hparams: Mapping[str, Any]):
    with self._failing("record the config"):
      self._hparams(dict(hparams))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    with self._failing(f"log the metrics of step {step}"):
      self._scalars(int(step), {k: float(v) for k, v in scalars.items()})

  def write_summary(self, summary: Mapping[str, Any]):
    with self._failing("record the run summary"):
      self._summary({k: v for k, v in summary.items() if v is not None})

  def end(self, status: str):
    with self._failing(f"end its run as {status}"):
      self._end(status)

  def flush(self):
    pass  # Each call above has handed its values over by the time it returns.

  def close(self):
    self.end("FINISHED")

  @contextlib.contextmanager
  def _failing(self, what: str):
    try:
      yield
    except TrackerError:
      raise
    except Exception as e:
      raise TrackerError(self.logger, f"{self.describe()} could not {what} ({_one_line(e)})") from e

  def describe(self) -> str:
    return self.logger


class WandbTracker(Tracker):
  """A Weights & Biases run; WANDB_MODE=offline writes it under <workdir>/wandb only."""

  logger = "wandb"

  def __init__(self, config, workdir: str, previous: dict | None):
    wandb = _import("wandb")
    project = config.get("tracker_project") or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
    kwargs = {}
    if _is_local(workdir):
      os.makedirs(workdir, exist_ok=True)
      kwargs["dir"] = os.fspath(workdir)  # <workdir>/wandb; elsewhere WANDB_DIR or ./wandb.
    if previous:
      kwargs.update(id=previous["run_id"], resume="allow")
    try:
      self.run = wandb.init(project=project, name=_run_name(workdir), **kwargs)
    except Exception as e:
      raise UserError(
        f"Could not start the wandb run ({_one_line(e)}): run `wandb login` or set "
        "WANDB_API_KEY, or set WANDB_MODE=offline to record it in the workdir only."
      ) from e
    self.state = {"run_id": self.run.id, "project": project}

  def describe(self) -> str:
    return f"wandb (run {self.state['run_id']})"

  def _hparams(self, hparams):
    self.run.config.update(_nested(hparams), allow_val_change=True)

  def _scalars(self, step, scalars):
    # wandb keeps the values of a step it has already passed (a resumed run repeats the
    # steps after its last checkpoint, with the same values) and warns.
    self.run.log(scalars, step=step)

  def _summary(self, summary):
    self.run.summary.update(summary)

  def _end(self, status):
    if status == "KILLED":
      self.run.mark_preempting()
    self.run.finish(exit_code=1 if status == "FAILED" else 0)


class MlflowTracker(Tracker):
  """An MLflow run, by default in the file store <workdir>/mlruns (MLFLOW_TRACKING_URI wins)."""

  logger = "mlflow"

  def __init__(self, config, workdir: str, previous: dict | None):
    _import("mlflow")
    from mlflow.tracking import MlflowClient

    self.uri = tracking_uri(workdir)
    if urllib.parse.urlparse(self.uri).scheme in ("", "file"):
      # MLflow 3 refuses file stores unless asked: flaxtrain's default store is one, since
      # mlflow-skinny cannot write sqlite and a workdir may be on NFS.
      os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    experiment = (
      config.get("tracker_project") or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
    )
    try:
      self.client = MlflowClient(tracking_uri=self.uri)
      run_id = self._resume(previous) or self._create(experiment, workdir)
    except Exception as e:
      raise UserError(
        f"Could not start an MLflow run in {self.uri} ({_one_line(e)}): check "
        "MLFLOW_TRACKING_URI, or unset it to use <workdir>/mlruns."
      ) from e
    self.state = {"run_id": run_id, "experiment": experiment, "tracking_uri": self.uri}

  def describe(self) -> str:
    return f"MLflow (run {self.state['run_id']} in {self.uri})"

  def _resume(self, previous: dict | None) -> str | None:
    from mlflow.exceptions import MlflowException

    if not previous:
      return None
    run_id = previous["run_id"]
    try:
      run = self.client.get_run(run_id)
    except MlflowException as e:
      if e.error_code != "RESOURCE_DOES_NOT_EXIST":
        raise
      run = None
    if run is None or run.info.lifecycle_stage == "deleted":
      logging.warning(
        "MLflow run %s of this workdir is not in %s (moved, deleted or another store): "
        "starting a new run.",
        run_id,
        self.uri,
      )
      return None
    self.client.update_run(run_id, status="RUNNING")
    return run_id

  def _create(self, experiment: str, workdir: str) -> str:
    from mlflow.exceptions import MlflowException

    found = self.client.get_experiment_by_name(experiment)
    if found is not None:
      experiment_id = found.experiment_id
    else:
      try:
        experiment_id = self.client.create_experiment(experiment)
      except MlflowException as e:  # Another run created it first.
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
          raise
        experiment_id = self.client.get_experiment_by_name(experiment).experiment_id
    tags = {"flaxtrain.workdir": _absolute(workdir)}
    run = self.client.create_run(experiment_id, run_name=_run_name(workdir), tags=tags)
    return run.info.run_id

  def _hparams(self, hparams):
    from mlflow.entities import Param

    # Params cannot change: a rerun before the first checkpoint logs only the new ones.
    run_id = self.state["run_id"]
    existing = self.client.get_run(run_id).data.params
    values = {k: str(v) for k, v in hparams.items()}
    changed = sorted(k for k, v in values.items() if k in existing and existing[k] != v)
    if changed:
      logging.warning(
        "MLflow run %s keeps its first values of %s (params cannot change); the workdir's "
        "config.json has the new ones.",
        run_id,
        ", ".join(changed),
      )
    params = [Param(k, v) for k, v in values.items() if k not in existing]
    if params:
      self.client.log_batch(run_id, params=params)

  def _scalars(self, step, scalars):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, step) for k, v in scalars.items()]
    self.client.log_batch(self.state["run_id"], metrics=metrics)

  def _summary(self, summary):
    from mlflow.entities import Metric, RunTag

    # Numbers as metrics at the final step, the rest as tags; "summary/" keeps them apart
    # from the per-step metrics of the same name.
    now, step = int(time.time() * 1000), int(summary.get("step", 0))
    metrics, tags = [], []
    for k, v in summary.items():
      if isinstance(v, (int, float)):
        metrics.append(Metric(f"summary/{k}", float(v), now, step))
      else:
        tags.append(RunTag(f"summary/{k}", str(v)))
    self.client.log_batch(self.state["run_id"], metrics=metrics, tags=tags)

  def _end(self, status):
    self.client.set_terminated(self.state["run_id"], status=status)


TRACKERS = {"wandb": WandbTracker, "mlflow": MlflowTracker}


def tracking_uri(workdir: str) -> str:
  """MLFLOW_TRACKING_URI if set, else the file store <workdir>/mlruns (local workdirs only)."""
  uri = os.environ.get("MLFLOW_TRACKING_URI")
  if uri:
    return uri
  if not _is_local(workdir):
    raise UserError(
      f"--config.loggers=mlflow with --workdir {workdir} needs a tracking server: set "
      "MLFLOW_TRACKING_URI (e.g. http://host:5000)."
    )
  return pathlib.Path(_absolute(workdir), "mlruns").as_uri()


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


def _is_local(workdir: str) -> bool:
  return "://" not in os.fspath(workdir)


def _absolute(workdir: str) -> str:
  return os.path.abspath(workdir) if _is_local(workdir) else os.fspath(workdir)


def _run_name(workdir: str) -> str:
  return os.fspath(workdir).rstrip("/").rsplit("/", 1)[-1] or "flaxtrain"


def _nested(flat: Mapping[str, Any]) -> dict:
  """{'dataset.name': x} -> {'dataset': {'name': x}}: wandb shows the config's sections."""
  out = {}
  for key, value in flat.items():
    *path, last = key.split(".")
    node = out
    for part in path:
      node = node.setdefault(part, {})
    node[last] = value
  return out


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= 200 else text[:199] + "…"


@contextlib.contextmanager
def _logged(what: str):
  try:
    yield
  except Exception:
    logging.exception("%s.", what)
