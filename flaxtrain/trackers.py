"""The wandb and MLflow trackers behind `--config.loggers`: one tracker run per training
run, started (or resumed from <workdir>/trackers.json) by `loggers.create_writer`, which
calls each one from its own background thread. See docs/trackers.md.
"""

import contextlib
import importlib
import os
import pathlib
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any

from absl import logging

from flaxtrain.errors import UserError

# Tracker -> (module to import, flaxtrain extra that installs it).
PACKAGES = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
DEFAULT_PROJECT = "flaxtrain"


def import_package(logger: str):
  """The tracker's package, or a one-sentence UserError naming the extra that installs it."""
  module, extra = PACKAGES[logger]
  try:
    return importlib.import_module(module)
  except ImportError as e:
    if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == module:
      raise UserError(
        f"--config.loggers={logger} needs the {module} package: pip install 'flaxtrain[{extra}]'."
      ) from e
    raise UserError(
      f"--config.loggers={logger} could not import {module} ({one_line(e)}): reinstall it "
      f"with pip install 'flaxtrain[{extra}]'."
    ) from e


class TrackerError(Exception):
  """A tracker call failed; `logger` is its --config.loggers name."""

  def __init__(self, logger: str, message: str):
    super().__init__(message)
    self.logger = logger


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
      raise TrackerError(self.logger, f"{self.describe()} could not {what} ({one_line(e)})") from e

  def describe(self) -> str:
    return self.logger


class WandbTracker(Tracker):
  """A Weights & Biases run; WANDB_MODE=offline writes it under <workdir>/wandb only."""

  logger = "wandb"

  def __init__(self, config, workdir: str, previous: dict | None):
    wandb = import_package("wandb")
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
        f"Could not start the wandb run ({one_line(e)}): run `wandb login` or set "
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
    import_package("mlflow")
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
        f"Could not start an MLflow run in {self.uri} ({one_line(e)}): check "
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


def one_line(e: BaseException) -> str:
  """An error as one line of at most 200 characters, for one-sentence messages."""
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= 200 else text[:199] + "…"
