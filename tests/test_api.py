"""flaxtrain from Python: `flaxtrain.train` and `flaxtrain.load` as a notebook uses them."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import ROOT, synthetic_split, tiny_config

import flaxtrain
from flaxtrain.errors import UserError

# A fresh process with `devices` CPU devices, the synthetic data of conftest, and `body`.
_SCRIPT = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count={devices}"
sys.path.insert(0, {tests!r})
import json, numpy as np, pytest
import jax
from flaxtrain import console
console.import_tensorflow_quietly()  # conftest's imports load TensorFlow before any train().
from conftest import patch_synthetic, synthetic_split, tiny_config
patch_synthetic(pytest.MonkeyPatch())
import flaxtrain
assert len(jax.devices()) == {devices}, jax.devices()
"""


def _python(devices: int, body: str, tmp_path) -> tuple[dict, str]:
  code = _SCRIPT.format(devices=devices, tests=str(ROOT / "tests")) + textwrap.dedent(body)
  out = tmp_path / "out.json"
  env = {**os.environ, "OUT": str(out)}
  proc = subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(out.read_text()), proc.stderr


@pytest.mark.slow
def test_a_two_device_run_loads_in_a_one_device_process(tmp_path):
  workdir = tmp_path / "run"
  trained, stderr = _python(
    2,
    f"""
    summary = flaxtrain.train(tiny_config(), {str(workdir)!r}, num_epochs=1,
                              optimizer__learning_rate=0.01)
    json.dump(summary, open(os.environ["OUT"], "w"))
    """,
    tmp_path,
  )
  assert trained["devices"] == 2 and trained["step"] == 2048 // 64
  # A script's stderr: the eval line, not the log (nor TensorFlow's start-up notes).
  shown = [line for line in stderr.splitlines() if line.strip()]
  assert len(shown) == 1 and shown[0].startswith("Step 32: eval loss"), stderr[-3000:]
  assert json.loads((workdir / "config.json").read_text())["optimizer"]["learning_rate"] == 0.01
  log = (workdir / "flaxtrain.log").read_text()
  for record in ("Devices: ", "[Hyperparameters]", "Step 32: eval loss"):
    assert record in log, record  # The full log, from before the workdir existed.

  loaded, _ = _python(
    1,
    f"""
    run = flaxtrain.load({str(workdir)!r})
    data = synthetic_split(500, 1)
    probs = run.predict(data["image"], batch_size=128)  # Padded last chunk.
    one = run.predict(data["image"][7])
    json.dump({{
        "step": run.step, "shape": list(probs.shape),
        "accuracy": float(np.mean(np.argmax(probs, -1) == data["label"])),
        "sums": float(np.max(np.abs(probs.sum(-1) - 1))),
        "one": float(np.max(np.abs(one - probs[7]))),
        "classes": list(run.class_names), "devices": len(jax.devices()),
        "lr": run.config.optimizer.learning_rate,
    }}, open(os.environ["OUT"], "w"))
    """,
    tmp_path,
  )
  assert loaded["devices"] == 1 and loaded["step"] == trained["step"]
  assert loaded["shape"] == [500, 10] and loaded["sums"] < 1e-5 and loaded["one"] < 1e-6
  # The loaded model's predictions over the eval split give the run's own exact eval.
  assert loaded["accuracy"] == pytest.approx(trained["eval_accuracy"], abs=1e-6)
  assert loaded["classes"] == [str(i) for i in range(10)] and loaded["lr"] == 0.01


def test_load_best_and_numbered_steps_and_bad_input(tmp_path, synthetic_data):
  workdir = str(tmp_path / "run")
  summary = flaxtrain.train(tiny_config(num_epochs=2), workdir, eval_every_steps=16)
  assert summary["step"] == 64
  assert flaxtrain.load(workdir, step=32).step == 32
  best = flaxtrain.load(workdir, step="best")
  accuracy = {
    int(p.parent.parent.name): json.loads(p.read_text())["eval_accuracy"]
    for p in (tmp_path / "run" / "checkpoints").glob("*/metrics/metrics")
  }
  assert len(accuracy) == 3 and accuracy[best.step] == max(accuracy.values()), accuracy
  assert best.summary["step"] == 64
  images = synthetic_split(4, 2)["image"]
  assert best.apply(images).shape == (4, 10)  # Logits.
  with pytest.raises(UserError, match=r"Images must be \[N, 28, 28, 1\]"):
    best.predict(np.zeros((2, 32, 32, 1), np.uint8))
  with pytest.raises(UserError, match="take uint8 images"):
    best.predict(images.astype(np.float32) / 255)
  assert best.predict(images[:0]).shape == (0, 10)
  with pytest.raises(UserError, match="no checkpoint at step 5"):
    flaxtrain.load(workdir, step=5)
  with pytest.raises(UserError, match="does not exist"):
    flaxtrain.load(str(tmp_path / "nope"))
  # Resuming a finished run trains nothing and returns its summary.
  assert flaxtrain.train(tiny_config(num_epochs=2), workdir)["step"] == 64


def test_train_overrides_are_checked(tmp_path):
  with pytest.raises(UserError, match=r"did you mean --config\.optimizer\.learning_rate"):
    flaxtrain.train(tiny_config(), str(tmp_path / "a"), optimizer__learning_rat=0.1)
  with pytest.raises(UserError, match="num_epochs='two' does not fit"):
    flaxtrain.train(tiny_config(), str(tmp_path / "b"), num_epochs="two")
  with pytest.raises(UserError, match="Unknown config 'fashion_cn'"):
    flaxtrain.train("fashion_cn", str(tmp_path / "c"))
  assert not any(tmp_path.iterdir())  # Nothing written.
