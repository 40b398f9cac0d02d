"""Smoke test of scripts/benchmark.py: a tiny run yields every field with sane values.

No timing thresholds here: performance is measured by the script (`make bench`), not by tests.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPT = ROOT / "scripts" / "benchmark.py"


def load_benchmark_module():
  spec = importlib.util.spec_from_file_location("flaxtrain_benchmark", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def positive(value):
  return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def test_tiny_benchmark_reports_every_field(real_data_dir, tmp_path):
  out = tmp_path / "bench.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # conftest's 4 devices.
  env["TFDS_DATA_DIR"] = real_data_dir
  cmd = [
    sys.executable,
    str(SCRIPT),
    "--config=configs/fashion_cnn.py",
    "--batch_sizes=32",
    "--steps=4",
    "--warmup=2",
    "--rounds=1",
    "--skip_torch",
    "--quiet_wait=0",
    f"--json_out={out}",
  ]
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-4000:]
  report = json.loads(out.read_text())
  assert json.loads(r.stdout) == report  # The same JSON on stdout.

  assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
  assert report["versions"]["jax"] and report["versions"]["flax"]
  assert report["versions"]["torch"] is None  # --skip_torch
  assert positive(report["matmul_flops_per_sec"])

  entry = report["results"]["32"]
  assert set(entry) >= {"flaxtrain", "tutorial", "ratios", "peak_flops_per_sec"}
  assert "torch" not in entry

  f = entry["flaxtrain"]
  assert "error" not in f, f
  assert f["batch_size"] == 32 and f["devices"] * f["per_device_batch"] == 32
  for key in (
    "train_examples_per_sec",
    "summary_train_examples_per_sec",
    "step_ms",
    "time_to_first_step_s",
    "time_to_first_step_in_train_s",
    "first_dispatch_s",
    "startup_s",
    "data_load_s",
    "compile_s",
    "eval_examples_per_sec",
    "eval_s",
    "checkpoint_first_save_s",
    "checkpoint_save_s",
    "checkpoint_share_est",
    "peak_host_memory_mib",
    "step_flops",
    "achieved_flops_per_sec",
    "flop_utilization",
    "call_ms_per_step",
    "dispatch_ms_per_step",
  ):
    assert positive(f[key]), (key, f[key])
  assert f["steady_steps"] == 4
  assert 0 <= f["input_wait_share"] < 1
  assert 0 < f["flop_utilization"] < 1.5
  assert 0 < f["checkpoint_share_est"] < 1
  assert f["time_to_first_step_s"] > f["time_to_first_step_in_train_s"]
  assert f["time_to_first_step_s"] > f["compile_s"]
  assert f["platform"] != "cpu" or f["device_memory"] is None
  assert f["peak_host_memory_mib"] > 50  # MiB, not KiB or bytes.
  assert f["eval_accuracy"] is not None

  t = entry["tutorial"]
  assert "error" not in t, t
  assert positive(t["train_examples_per_sec"]) and t["steady_steps"] == 4
  assert positive(t["step_flops"]) and 0 < t["flop_utilization"] < 1.5
  # The same model: XLA counts (nearly) the same FLOPs per step in both.
  assert abs(t["step_flops"] - f["step_flops"]) / t["step_flops"] < 0.05

  ratios = entry["ratios"]
  assert positive(ratios["flaxtrain_vs_tutorial"])
  assert ratios["flaxtrain_vs_fastest_reference"] == pytest.approx(ratios["flaxtrain_vs_tutorial"])
  assert ratios["flaxtrain_vs_torch"] is None

  targets = report["targets"]
  assert set(targets) == {
    "throughput_vs_tutorial_b32",
    "throughput_vs_fastest_reference_b128",
    "time_to_first_step_s",
    "checkpoint_share_of_wall",
    "full_10_epochs_wall_vs_tutorial",
  }
  assert targets["throughput_vs_tutorial_b32"]["met"] in (True, False)
  assert targets["throughput_vs_fastest_reference_b128"]["met"] is None  # Batch 128 not run.
  assert report["full"] is None


def test_tiny_input_benchmark_reports_every_field(tmp_path):
  """`benchmark.py --input` in a tiny form: 64 JPEGs, batches of 16, 1 round."""
  out = tmp_path / "input.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  cmd = [
    sys.executable,
    str(SCRIPT),
    "--input",
    "--input_images=64",
    "--input_batch=16",
    "--input_warmup=1",
    "--input_batches=2",
    "--input_workers=0,1",
    "--input_decode_images=16",
    "--input_decode_reps=1",
    "--rounds=1",
    "--quiet_wait=0",
    f"--input_data_dir={tmp_path / 'data'}",
    f"--json_out={out}",
  ]
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
  assert r.returncode == 0, r.stderr[-4000:]
  report = json.loads(out.read_text())
  assert json.loads(r.stdout) == report

  assert report["machine"]["cores"] >= 1
  assert report["versions"]["grain"] and report["versions"]["tensorflow-datasets"]
  data = report["data"]
  assert data["num_train"] == 64 and not data["reused"] and 20 < data["mean_jpeg_kb"] < 500
  assert (tmp_path / "data" / "n64-seed0" / "made.json").exists()  # Cached for reuse.

  rates = report["flaxtrain_examples_per_sec_by_workers"]
  assert set(rates) == {"0", "1"} and all(positive(v) for v in rates.values())
  assert report["workers_used"] in (0, 1)
  assert report["input_examples_per_sec"] == max(rates.values())
  assert positive(report["tf_data_examples_per_sec"])
  assert report["flaxtrain_vs_tf_data"] == pytest.approx(
    report["input_examples_per_sec"] / report["tf_data_examples_per_sec"]
  )
  for w in ("0", "1"):
    f = report["flaxtrain"][w]
    assert "error" not in f, f
    assert f["workers"] == int(w) and f["timed_images"] == 32
    assert f["output"] == "uint8 [16, 224, 224, 3]"
  assert report["tf_data"]["output"] == "float32 [16, 224, 224, 3]"
  decode = report["decode_ms_per_image"]
  for key in (
    "record_read",
    "cv2_imdecode_full",
    "flaxtrain_header",
    "flaxtrain_transform",
    "flaxtrain_resize",
    "flaxtrain_train_step_per_image",
    "tf_decode_jpeg_full",
    "tf_decode_and_crop_jpeg",
    "tf_flax_preprocess_for_train",
  ):
    assert positive(decode[key]), (key, decode[key])
  # A whole decode and preprocessing costs more than the header parse alone.
  assert decode["tf_flax_preprocess_for_train"] > decode["tf_extract_jpeg_shape"]
  assert decode["flaxtrain_transform"] > decode["flaxtrain_header"]


def test_progress_notes_give_checkpoint_and_eval_shares():
  bench = load_benchmark_module()
  stderr = (
    "I1122 11:11:08.1 12 local.py:41] Setting work unit notes: 30.1 steps/s, 50.0% "
    "(2340/4680), ETA: 1m (1m : 0.9% checkpoint, 3.2% eval)\n"
    "I1122 11:12:08.1 12 local.py:41] Setting work unit notes: 30.5 steps/s, 100.0% "
    "(4680/4680), ETA: 0s (2m : 1.1% checkpoint, 3.0% eval)\n"
  )
  shares = bench.parse_progress_notes(stderr)
  assert shares["checkpoint_share"] == pytest.approx(0.011)
  assert shares["eval_share"] == pytest.approx(0.030)
  assert bench.parse_progress_notes("no notes") == {}


def test_unknown_flags_are_refused():
  r = subprocess.run(
    [sys.executable, str(SCRIPT), "--bogus=1"], cwd=ROOT, capture_output=True, text=True, timeout=60
  )
  assert r.returncode != 0 and "--bogus=1" in r.stderr
