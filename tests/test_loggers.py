"""--config.loggers: TensorBoard, wandb and MLflow, offline, read back from what the real
packages recorded (wandb's offline transaction log, MLflow's file store)."""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest
from clu import asynclib
from conftest import tiny_config

from flaxtrain import loggers, loop, workdirs
from flaxtrain.errors import UserError

ALL = "tensorboard,wandb,mlflow"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
  """wandb records to the workdir only; MLflow to its default store in the workdir."""
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT", "WANDB_DIR"):
    monkeypatch.delenv(key, raising=False)


def _mlflow(workdir):
  from mlflow.tracking import MlflowClient

  return MlflowClient(loggers.tracking_uri(str(workdir)))


def _history(client, run_id, key):
  return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def _wandb_records(path: pathlib.Path):
  """The records of a .wandb file: W&B's header, then LevelDB-log-framed protobufs."""
  from wandb.proto import wandb_internal_pb2

  data, block, pos, chunks = path.read_bytes(), 32768, 7, []
  assert data[:4] == b":W&B"
  while pos + 7 <= len(data):
    if block - pos % block < 7 or data[pos + 6] == 0:  # A block's zero-filled tail.
      pos += block - pos % block
      continue
    length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
    chunks.append(data[pos + 7 : pos + 7 + length])
    pos += 7 + length
    if kind in (1, 4):  # A full record, or the last piece of one.
      record = wandb_internal_pb2.Record()
      record.ParseFromString(b"".join(chunks))
      chunks = []
      yield record


def _wandb_runs(workdir, timeout_s: float = 60) -> list[dict]:
  """What each offline wandb run in the workdir recorded, oldest first: once every run's
  exit record is on disk (wandb's service process can write it after `finish` returns)."""
  deadline = time.monotonic() + timeout_s
  while True:
    runs = _read_wandb_runs(workdir)
    if all(r["exit_code"] is not None for r in runs) or time.monotonic() > deadline:
      return runs
    time.sleep(0.5)


def _read_wandb_runs(workdir) -> list[dict]:
  runs = []
  for path in sorted(pathlib.Path(workdir, "wandb").glob("offline-run-*/run-*.wandb")):
    run = {"config": {}, "history": {}, "summary": {}, "exit_code": None}
    for r in _wandb_records(path):
      kind = r.WhichOneof("record_type")
      if kind == "run":
        run.update(id=r.run.run_id, project=r.run.project, name=r.run.display_name)
      elif kind == "config":
        run["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
      elif kind == "history":
        row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        run["history"][row["_step"]] = row
      elif kind == "summary":
        run["summary"].update({i.key: json.loads(i.value_json) for i in r.summary.update if i.key})
      elif kind == "exit":
        run["exit_code"] = r.exit.exit_code
    runs.append(run)
  return runs


# ------------------------------------------------------------ names and packages


def test_loggers_default_to_tensorboard_and_parse_a_comma_list():
  assert loggers.names(tiny_config()) == ("tensorboard",)
  assert loggers.names(tiny_config(loggers=" wandb, tensorboard,,wandb")) == (
    "wandb",
    "tensorboard",
  )
  loggers.check(tiny_config(loggers=ALL))


def test_unknown_logger_is_one_sentence_listing_the_valid_ones():
  with pytest.raises(UserError) as e:
    loggers.check(tiny_config(loggers="tensorboard,wandbb"))
  assert str(e.value) == (
    "Unknown logger 'wandbb' (did you mean 'wandb'?): --config.loggers takes a "
    "comma-separated list of tensorboard, wandb, mlflow."
  )


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_missing_package_names_the_extra(monkeypatch, name):
  monkeypatch.setitem(sys.modules, name, None)  # `import name` now fails as if not installed.
  with pytest.raises(UserError) as e:
    loggers.check(tiny_config(loggers=f"tensorboard,{name}"))
  assert str(e.value) == (
    f"--config.loggers={name} needs the {name} package: pip install 'flaxtrain[{name}]'."
  )


# ------------------------------------------------------------------ the writer


def test_tensorboard_alone_and_other_processes_write_no_tracker(tmp_path):
  writer = loggers.create_writer(tiny_config(), str(tmp_path / "tb"), process_index=0)
  assert writer.trackers == ()
  writer.write_scalars(8, {"train_loss": 1.0})
  writer.close()
  assert [p.name[:19] for p in (tmp_path / "tb").iterdir()] == ["events.out.tfevents"]

  other = tmp_path / "process1"
  other.mkdir()
  writer = loggers.create_writer(tiny_config(loggers=ALL), str(other), process_index=1)
  writer.write_hparams({"seed": 0})
  writer.write_scalars(8, {"train_loss": 1.0})
  writer.write_summary({"step": 8})
  writer.close()
  assert list(other.iterdir()) == []


def _records(logdir):
  """Every (step, tag, value-or-plugin) of the event files in `logdir`, read by TensorFlow."""
  import tensorflow as tf

  out = []
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    for record in tf.data.TFRecordDataset(str(path)):  # Checks each record's CRCs.
      event = tf.compat.v1.Event.FromString(record.numpy())
      for v in event.summary.value:
        plugin = v.metadata.plugin_data.plugin_name
        value = tf.make_ndarray(v.tensor) if plugin == "scalars" else plugin
        out.append((event.step, v.tag, value))
  return out


def test_event_files_hold_what_tensorflows_summary_writer_writes(tmp_path):
  """The TensorFlow-free writer against CLU's SummaryWriter (tf.summary): the same scalars
  (float32 tensors of the scalars plugin) and the same hparams summaries, read back by
  TensorFlow, by TensorBoard's EventAccumulator and by `flaxtrain --mode=report`."""
  from clu import metric_writers
  from tensorboard.backend.event_processing import event_accumulator

  from flaxtrain import event_files, report

  hparams = {"seed": 0, "optimizer.name": "adamw", "learning_rate": 1e-3, "ema": False}
  scalars = [(8, {"train_loss": 2.5, "train_accuracy": 0.25}), (16, {"eval_loss": 1.0 / 3})]
  for writer in [
    event_files.create(str(tmp_path / "ours")),
    metric_writers.SummaryWriter(str(tmp_path / "tf")),
  ]:
    writer.write_hparams(hparams)
    for step, values in scalars:
      writer.write_scalars(step, values)
    writer.close()
  ours, theirs = _records(tmp_path / "ours"), _records(tmp_path / "tf")
  assert [(s, t, str(v)) for s, t, v in ours] == [(s, t, str(v)) for s, t, v in theirs]
  assert [v.dtype for _, _, v in ours if not isinstance(v, str)] == ["float32"] * 3

  acc = event_accumulator.EventAccumulator(str(tmp_path / "ours"), size_guidance={"tensors": 0})
  acc.Reload()
  tags = ["_hparams_/session_start_info", "eval_loss", "train_accuracy", "train_loss"]
  assert sorted(acc.Tags()["tensors"]) == tags
  assert [e.step for e in acc.Tensors("train_loss")] == [8]
  curves = report.read_scalars(str(tmp_path / "ours"))
  assert curves["eval_loss"][0].tolist() == [16]
  assert curves["eval_loss"][1][0] == pytest.approx(1 / 3)


def test_a_training_run_does_not_import_tensorflow(tmp_path):
  """TensorFlow's import costs seconds of CPU at every start: a run on data that needs no
  tf.data (an in-memory split already decoded, a streamed one) never imports it."""
  code = f"""
import sys
from conftest import patch_synthetic, tiny_config
import pytest
from flaxtrain import loop
with pytest.MonkeyPatch.context() as mp:
  patch_synthetic(mp)
  summary = loop.train_and_evaluate(tiny_config(num_epochs=1), {str(tmp_path)!r})
assert summary["step"] == 32, summary
print("tensorflow" in sys.modules)
"""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  env["PYTHONPATH"] = os.pathsep.join(
    [str(pathlib.Path(__file__).parent), env.get("PYTHONPATH", "")]
  )
  out = subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == ["False"]
  assert list(tmp_path.glob("events.out.tfevents.*"))


def test_trackers_record_config_scalars_summary_and_resume_the_same_runs(tmp_path):
  workdir = tmp_path / "my_run"
  config = tiny_config(loggers=ALL)
  writer = loggers.create_writer(config, str(workdir), process_index=0)
  writer.write_hparams(workdirs.flat_config(config))
  for step in (8, 16):
    writer.write_scalars(step, {"train_loss": 1.0 / step})
  writer.write_scalars(16, {"eval_accuracy": 0.5})
  writer.close(status="KILLED")  # Stopped by a signal, to be resumed.
  ids = json.loads((workdir / "trackers.json").read_text())

  # The same command again: the same tracker runs continue.
  writer = loggers.create_writer(config, str(workdir), process_index=0)
  assert {t.logger: t.state for t in writer.trackers} == ids
  writer.write_scalars(24, {"train_loss": 1.0 / 24, "eval_accuracy": 0.75})
  summary = {"step": 24, "eval_accuracy": 0.75, "wall_s": 12.5, "data_source": "memory"}
  writer.write_summary({**summary, "input_wait_share": None})
  writer.close()
  assert list(workdir.glob("events.out.tfevents.*"))

  client = _mlflow(workdir)
  assert loggers.tracking_uri(str(workdir)) == (workdir / "mlruns").as_uri()
  run = client.get_run(ids["mlflow"]["run_id"])
  assert run.info.status == "FINISHED" and run.info.run_name == "my_run"
  assert len(client.search_runs([run.info.experiment_id])) == 1
  assert client.get_experiment(run.info.experiment_id).name == "flaxtrain"
  assert run.data.params["batch_size"] == "64"
  assert run.data.params["model.features"] == "(8, 16)"
  assert run.data.params["loggers"] == ALL
  assert _history(client, run.info.run_id, "train_loss") == [(8, 1 / 8), (16, 1 / 16), (24, 1 / 24)]
  assert _history(client, run.info.run_id, "eval_accuracy") == [(16, 0.5), (24, 0.75)]
  assert _history(client, run.info.run_id, "summary/wall_s") == [(24, 12.5)]
  assert run.data.tags["summary/data_source"] == "memory"
  assert "summary/input_wait_share" not in run.data.tags

  first, resumed = _wandb_runs(workdir)
  assert first["id"] == resumed["id"] == ids["wandb"]["run_id"]
  assert resumed["project"] == "flaxtrain" and resumed["name"] == "my_run"
  assert first["config"]["batch_size"] == 64
  assert first["config"]["model"]["features"] == "(8, 16)"
  assert [(s, h["train_loss"]) for s, h in first["history"].items()] == [(8, 1 / 8), (16, 1 / 16)]
  assert first["history"][16]["eval_accuracy"] == 0.5
  assert resumed["history"][24]["eval_accuracy"] == 0.75
  assert {k: resumed["summary"][k] for k in summary} == summary
  assert (first["exit_code"], resumed["exit_code"]) == (0, 0)


def test_a_failing_tracker_reaches_the_loop_as_an_async_error(tmp_path):
  config = tiny_config(loggers="tensorboard,mlflow", tracker_project="failing")
  writer = loggers.create_writer(config, str(tmp_path), process_index=0)
  (mlflow,) = writer.trackers

  def unreachable(*args, **kwargs):
    raise ConnectionError("tracking server unreachable")

  mlflow.client.log_batch = unreachable
  writer.write_scalars(8, {"train_loss": 1.0})
  with pytest.raises(asynclib.AsyncError) as e:
    writer.flush()  # Or the next write: the loop's `except asynclib.AsyncError` catches it.
  message = loggers.failure_message(e.value, str(tmp_path))
  assert message.startswith(f"MLflow (run {mlflow.state['run_id']} in file:")
  assert message.endswith(
    "could not log the metrics of step 8 (tracking server unreachable): fix it or drop mlflow "
    "from --config.loggers, then run the same command to resume; the last complete "
    "checkpoint is kept."
  )
  writer.abort()
  assert _mlflow(tmp_path).get_run(mlflow.state["run_id"]).info.status == "FAILED"
  # A TensorBoard failure keeps the loop's sentence.
  tb = asynclib.AsyncError("Consider re-running")
  tb.__cause__ = asynclib.AsyncError("Error 'No space left on device' occurred ASYNCHRONOUSLY.")
  assert loggers.failure_message(tb, "runs/x") == (
    "Could not write the TensorBoard metrics in runs/x (Error 'No space left on device' "
    "occurred ASYNCHRONOUSLY.): free space or use another --workdir; the last complete "
    "checkpoint is kept."
  )


def test_a_tracker_that_cannot_start_fails_before_training(tmp_path, monkeypatch):
  with pytest.raises(UserError, match=r"^--config.loggers=mlflow with --workdir gs://b/run needs"):
    loggers.create_writer(tiny_config(loggers="mlflow"), "gs://b/run", process_index=0)
  monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://host")
  with pytest.raises(UserError, match=r"^Could not start an MLflow run in nosuchscheme://host \("):
    loggers.create_writer(tiny_config(loggers="wandb,mlflow"), str(tmp_path), process_index=0)
  # The wandb run started first ends as failed, and the next attempt would continue it.
  (wandb_run,) = _wandb_runs(tmp_path)
  assert wandb_run["exit_code"] == 1
  assert json.loads((tmp_path / "trackers.json").read_text())["wandb"]["run_id"] == wandb_run["id"]


# ------------------------------------------------------------------ end to end


def test_training_sends_config_metrics_and_summary_to_every_tracker(synthetic_data, tmp_path):
  workdir = tmp_path / "run"
  config = tiny_config(
    loggers=ALL, num_train_steps=16, log_every_steps=8, eval_every_steps=16, tracker_project="e2e"
  )
  summary = loop.train_and_evaluate(config, str(workdir))
  ids = json.loads((workdir / "trackers.json").read_text())

  client = _mlflow(workdir)
  run = client.get_run(ids["mlflow"]["run_id"])
  assert run.info.status == "FINISHED" and run.data.params["loggers"] == ALL
  assert [s for s, _ in _history(client, run.info.run_id, "train_loss")] == [8, 16]
  assert _history(client, run.info.run_id, "eval_accuracy") == [(16, summary["eval_accuracy"])]
  assert _history(client, run.info.run_id, "summary/wall_s") == [(16, summary["wall_s"])]
  # The loop's pace at each log: both values in one write, at its step.
  pace = [s for s, v in _history(client, run.info.run_id, "steps_per_sec") if v > 0]
  assert pace == [s for s, v in _history(client, run.info.run_id, "uptime") if v > 0] == [8, 16]

  (wandb_run,) = _wandb_runs(workdir)
  assert wandb_run["id"] == ids["wandb"]["run_id"] and wandb_run["project"] == "e2e"
  assert wandb_run["config"]["loggers"] == ALL
  assert sorted(s for s, h in wandb_run["history"].items() if "train_loss" in h) == [8, 16]
  assert wandb_run["summary"]["eval_accuracy"] == summary["eval_accuracy"]
  assert wandb_run["exit_code"] == 0

  # Finished: running it again trains nothing and starts no new tracker run.
  loop.train_and_evaluate(config, str(workdir))
  assert json.loads((workdir / "trackers.json").read_text()) == ids
  assert len(client.search_runs([run.info.experiment_id])) == 1
  assert os.path.isdir(workdir / "checkpoints")
