"""describe, eval, report and export on a tiny trained run; their errors through the CLI."""

import io
import json
import re
import shutil
import sys
import types

import flax
import jax
import numpy as np
import pytest
from conftest import load_config, patch_synthetic, tiny_config
from PIL import Image
from test_cli import flaxtrain

from flaxtrain import (
  config_lib,
  describe,
  evaluate,
  experiment,
  export,
  loop,
  report,
  steps,
  workdirs,
)
from flaxtrain.errors import UserError

# tiny_config's CNN on 28x28x1, 10 classes: conv 8 + conv 16 + dense 784->32 + dense 32->10.
TINY_PARAMS = 80 + 1168 + 25120 + 330


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A finished 2-epoch synthetic run (checkpoints at steps 32 and 64) and its Experiment."""
  with pytest.MonkeyPatch.context() as mp:
    patch_synthetic(mp)
    config = tiny_config()
    workdir = tmp_path_factory.mktemp("modes") / "run"
    summary = loop.train_and_evaluate(config, str(workdir))
    exp = experiment.Experiment(config)
  return types.SimpleNamespace(workdir=workdir, config=config, summary=summary, exp=exp)


def _listing(path):
  return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_describe_reports_changes_sizes_params_and_time(run):
  text = describe.describe(
    run.exp, load_config("fashion_cnn"), "configs/fashion_cnn.py", timed_steps=2
  )
  assert "model.features" in text and "[32, 64] -> [8, 16]" in text
  assert "2,048 train / 500 eval examples of 28x28x1, 10 classes" in text
  assert "= 16 per device; 32 steps per epoch; 64 steps (2 epochs), up to 1 per dispatch" in text
  assert f"Total: {TINY_PARAMS:,}" in text
  assert "FLOPs per example (XLA cost analysis):" in text and "n/a" not in text
  assert "ms per train step" in text and "per epoch" in text
  # CPU devices report no memory statistics; the host's peak is there and plausible.
  host = re.search(r"Memory: peak device .+; peak host RSS ([\d.]+) (MiB|GiB)", text)
  assert host and float(host[1]) * (1 if host[2] == "MiB" else 1024) > 100, text[-500:]


def test_eval_reproduces_the_training_summary(run):
  step, metrics = evaluate.run(run.exp, str(run.workdir))
  assert step == run.summary["step"] == 64
  assert metrics["eval_examples"] == 500
  for key in ("eval_loss", "eval_accuracy"):
    assert metrics[key] == pytest.approx(run.summary[key], abs=1e-6)
  written = json.loads((run.workdir / "eval_64.json").read_text())
  assert written["step"] == 64 and written["eval_accuracy"] == metrics["eval_accuracy"]


def test_eval_step_and_best(run):
  first, at_32 = evaluate.run(run.exp, str(run.workdir), 32)
  assert first == 32 and (run.workdir / "eval_32.json").exists()
  best, at_best = evaluate.run(run.exp, str(run.workdir), "best")
  assert best in (32, 64)
  assert at_best["eval_accuracy"] == max(at_32["eval_accuracy"], run.summary["eval_accuracy"])


def test_report_writes_pictures_and_markdown(run):
  out = report.run(run.exp, str(run.workdir))
  assert out == run.workdir / "report"
  names = {"predictions.png", "confusion_matrix.png", "curves.png", "report.md"}
  assert {p.name for p in out.iterdir()} == names
  for name in names - {"report.md"}:
    image = Image.open(io.BytesIO((out / name).read_bytes()))
    assert image.format == "PNG" and min(image.size) > 300
  md = (out / "report.md").read_text()
  assert "step 64" in md and "eval_accuracy" in md
  for name in names - {"report.md"}:
    assert f"({name})" in md
  scalars = report.read_scalars(str(run.workdir))
  assert list(scalars["eval_accuracy"][0]) == [32, 64]
  assert list(scalars["train_loss"][0]) == [8 * i for i in range(1, 9)]
  assert scalars["train_loss"][1][-1] < scalars["train_loss"][1][0]


def test_confusion_counts():
  counts = report.confusion(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), 3)
  assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]


def test_reconstructions_picture():
  images = np.random.default_rng(0).integers(0, 255, (24, 28, 28, 1), np.uint8)
  png = report.reconstructions_png(images, images / 255.0)
  assert Image.open(io.BytesIO(png)).format == "PNG"


def test_export_round_trip(run):
  out = export.run(run.exp, str(run.workdir), "latest")
  exported = jax.export.deserialize((out / "inference.jax").read_bytes())
  state, _ = run.exp.restore(str(run.workdir))
  variables = run.exp.eval_variables(state)
  loaded = flax.serialization.from_bytes(variables, (out / "params.msgpack").read_bytes())
  assert jax.tree.all(jax.tree.map(np.array_equal, loaded, variables))
  images = run.exp.data.eval["image"]
  for n in (3, 7):  # The batch dimension is symbolic.
    expected = jax.nn.softmax(
      run.exp.model.apply(variables, steps.preprocess(images[:n], run.exp.dtype), train=False)
    )
    np.testing.assert_allclose(exported.call(images[:n]), expected, atol=1e-5)
  meta = json.loads((out / "metadata.json").read_text())
  assert meta["step"] == 64 and meta["input"]["shape"] == ["batch", 28, 28, 1]
  assert "jax.export.deserialize" in (out / "README.md").read_text()
  tf = pytest.importorskip("tensorflow")
  if not (out / "saved_model").exists():  # Kept only where this TF can run it.
    assert sys.version_info >= (3, 12), "no SavedModel with the pinned TF/jax of CI"
    return
  serve = tf.saved_model.load(str(out / "saved_model")).signatures["serving_default"]
  np.testing.assert_allclose(serve(images=images[:5])["output_0"].numpy(), expected[:5], atol=1e-5)


def test_reconstruction_report_and_export(tmp_path, synthetic_data):
  config = tiny_config(num_train_steps=16, eval_every_steps=16, **{"task.name": "reconstruction"})
  config.model = config_lib.autoencoder_model(encoder=(32,), latent=8, decoder=(32,))
  workdir = str(tmp_path / "ae")
  loop.train_and_evaluate(config, workdir)
  exp = experiment.Experiment(config)
  out = report.run(exp, workdir)
  assert {p.name for p in out.iterdir()} == {"reconstructions.png", "curves.png", "report.md"}
  assert "eval_mse" in (out / "report.md").read_text()
  out = export.run(exp, workdir)
  exported = jax.export.deserialize((out / "inference.jax").read_bytes())
  variables = flax.serialization.msgpack_restore((out / "params.msgpack").read_bytes())
  images = exp.data.eval["image"][:4]
  reconstructed = exported.call(images)
  assert reconstructed.shape == images.shape
  expected = jax.nn.sigmoid(exp.model.apply(variables, steps.preprocess(images, exp.dtype)))
  np.testing.assert_allclose(reconstructed, expected, atol=1e-5)


def test_staged_dir_keeps_the_old_one_on_failure(tmp_path):
  target = tmp_path / "export"
  with workdirs.staged_dir(target) as out:
    (out / "a").write_text("old")
  with pytest.raises(RuntimeError), workdirs.staged_dir(target) as out:
    (out / "a").write_text("half")
    raise RuntimeError
  assert _listing(tmp_path) == ["export", "export/a"]
  assert (target / "a").read_text() == "old"


def test_restore_errors_are_sentences(run, tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    evaluate.check_run(str(tmp_path / "nope"), "latest")
  with pytest.raises(
    UserError, match="has no checkpoint at step 5: pass --step=latest, best or one of 32, 64"
  ):
    evaluate.check_run(str(run.workdir), 5)


# ------------------------------------------------------------------ the CLI


def _no_events_run(run, tmp_path):
  workdir = tmp_path / "no_events"
  shutil.copytree(run.workdir / "checkpoints", workdir / "checkpoints")
  return workdir


CLI_ERRORS = [
  (["--mode=eval"], "missing", "does not exist: pass the --workdir of a run"),
  (["--mode=export"], "empty", "has no checkpoints"),
  (["--mode=eval", "--step=999"], "run", "has no checkpoint at step 999"),
  (["--mode=report", "--step=first"], "run", "--step=first is not a checkpoint"),
  (["--mode=report"], "no_events", "has no TensorBoard event files"),
  (["--mode=train", "--step=32"], "run", "--step is for --mode=eval, report and export"),
]


@pytest.mark.parametrize(
  "args,where,needle", CLI_ERRORS, ids=[" ".join(a) + f" {w}" for a, w, _ in CLI_ERRORS]
)
def test_cli_errors_are_one_sentence_and_write_nothing(run, tmp_path, args, where, needle):
  workdir = {
    "missing": lambda: tmp_path / "missing",
    "run": lambda: run.workdir,
    "empty": lambda: tmp_path,
    "no_events": lambda: _no_events_run(run, tmp_path),
  }[where]()
  before = _listing(workdir) if workdir.exists() else None
  r = flaxtrain(*args, f"--workdir={workdir}")
  assert r.returncode != 0
  errors = [line for line in r.stderr.splitlines() if line.startswith("flaxtrain: error:")]
  assert len(errors) == 1 and needle in errors[0], r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  assert (_listing(workdir) if workdir.exists() else None) == before


@pytest.mark.slow
def test_cli_describe_fashion_cnn_writes_nothing(tmp_path, real_data_dir):
  workdir = tmp_path / "run"
  r = flaxtrain(
    "--mode=describe",
    f"--workdir={workdir}",
    "--config.optimizer.learning_rate=0.001",
    env={"TFDS_DATA_DIR": real_data_dir},
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert "optimizer.learning_rate  0.002 -> 0.001" in r.stdout
  assert "Total: 824,458" in r.stdout
  assert "60,000 train / 10,000 eval examples" in r.stdout
  assert not workdir.exists() and not list(tmp_path.iterdir())
