"""Smoke test of scripts/benchmark.py: a tiny run yields every field with sane values.

No timing thresholds here: performance is measured by the script (`make bench`), not by tests.
"""

import importlib.util
import json
import os
import subprocess
import sys
import types

import numpy as np
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


@pytest.mark.slow  # A whole script run: make test only, not on the newest stack too.
def test_tiny_window_benchmark_reports_every_field(real_data_dir, tmp_path):
  out = tmp_path / "bench.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # conftest's 4 devices.
  env["TFDS_DATA_DIR"] = real_data_dir
  cmd = [
    sys.executable,
    str(SCRIPT),
    "--config=configs/fashion_cnn.py",
    "--window",
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
  # (No upper bound: the CPU's peak is a matmul timed in the same run, and a machine busy
  # with other work at that moment makes the ratio arbitrarily large.)
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


@pytest.mark.slow  # A whole script run: make test only, not on the newest stack too.
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


# ------------------------------------------------------------ full runs and loop overhead


def sibling(name: str):
  """scripts/bench_full.py or bench_overhead.py (they import scripts/benchmark.py)."""
  scripts = str(ROOT / "scripts")
  if scripts not in sys.path:
    sys.path.insert(0, scripts)
  import importlib

  return importlib.import_module(name)


FLAXTRAIN_LOG = """\
---- flaxtrain 2026-12-02T11:00:00+00:00: flaxtrain --config=configs/fashion_cnn.py
I1202 11:00:01.000000 1 loop.py:226] Step 468: eval loss 0.4, accuracy 0.86 (10000 examples).
---- flaxtrain 2026-12-02T11:32:09+00:00: flaxtrain --config=configs/fashion_cnn.py
I1202 11:32:12.069544 1 local.py:41] Setting work unit notes: 22.3 steps/s, 16.7% (5/30)
I1202 11:32:13.947971 1 loop.py:226] Step 468: eval loss 2.1896, accuracy 0.3605 (10000 \
examples); checkpoint saved.
I1202 11:32:15.115726 1 loop.py:230] Step 900: checkpoint saved.
I1202 11:32:25.500000 1 loop.py:226] Step 936: eval loss 1.8480, accuracy 0.5422 (10000 \
examples); checkpoint saved.
I1202 11:32:25.600000 1 local.py:41] Setting work unit notes: 40.1 steps/s, 100.0% (936/936), \
ETA: 0m (0m : 13.7% checkpoint, 39.6% eval)
"""


def test_per_epoch_times_come_from_the_last_run_in_the_log():
  full = sibling("bench_full")
  evals = full.parse_eval_times(FLAXTRAIN_LOG)
  assert [s for s, _ in evals] == [468, 936]  # The earlier run's line and the save-only not.
  assert evals[1][1] - evals[0][1] == pytest.approx(11.552029, abs=1e-5)
  start = evals[0][1] - 20.0
  walls = full.epoch_walls(start, [t for _, t in evals])
  assert walls == pytest.approx([20.0, 11.552029], abs=1e-5)
  assert full.rate_after_first(walls, 468 * 128) == pytest.approx(468 * 128 / 11.552029)
  assert full.rate_after_first(walls[:1], 100) is None


def test_flaxtrain_result_reads_the_workdir(tmp_path):
  full = sibling("bench_full")
  (tmp_path / "flaxtrain.log").write_text(FLAXTRAIN_LOG)
  summary = {"step": 936, "eval_accuracy": 0.5422, "train_examples_per_sec": 4000.0}
  (tmp_path / "summary.json").write_text(json.dumps({**summary, "devices": 2}))
  t468 = full.parse_eval_times(FLAXTRAIN_LOG)[0][1]
  r = full.flaxtrain_result(str(tmp_path), t468 - 30.0, t468 + 15.0, 468, 128)
  assert r["epoch_times_source"] == "flaxtrain.log eval-line timestamps"
  assert r["epoch_wall_s"] == pytest.approx([30.0, 11.552029], abs=1e-5)
  assert r["examples_per_sec"] == pytest.approx(468 * 128 / 11.552029)
  assert r["wall_to_final_eval_s"] == pytest.approx(41.552029, abs=1e-5)
  assert r["process_wall_s"] == pytest.approx(45.0)
  assert r["train_examples_per_sec"] == 4000.0 and r["eval_accuracy"] == 0.5422
  assert r["eval_share"] == pytest.approx(0.396) and r["checkpoint_share"] == pytest.approx(0.137)
  # A loop that records its epochs in summary.json wins over the log.
  (tmp_path / "summary.json").write_text(json.dumps({**summary, "epoch_wall_s": [9.0, 8.0]}))
  r = full.flaxtrain_result(str(tmp_path), t468 - 30.0, t468 + 15.0, 468, 128)
  assert r["epoch_wall_s"] == [9.0, 8.0] and r["epoch_times_source"] == "summary.json epoch_wall_s"


def test_full_table_has_a_row_per_contender_and_ratios_to_the_fastest_peer():
  full = sibling("bench_full")
  entry = {
    "flaxtrain": {
      "epoch_wall_s": [20.0, 10.0],
      "examples_per_sec": 6000.0,
      "train_examples_per_sec": 6500.0,
      "wall_to_final_eval_s": 30.0,
      "eval_accuracy": 0.9,
    },
    "torch": {
      "epoch_wall_s": [15.0, 12.0],
      "examples_per_sec": 5000.0,
      "train_examples_per_sec": 5200.0,
      "wall_to_final_eval_s": 27.0,
      "eval_accuracy": 0.91,
    },
    "tutorial": {"error": "exit 1"},
  }
  entry["ratios"] = r = full.ratios(entry)
  assert r["throughput"] == pytest.approx(1.2) and r["throughput_peer"] == "torch"
  assert r["train_only"] == pytest.approx(1.25) and r["wall"] == pytest.approx(30 / 27)
  text = full.table({"128": entry})
  lines = text.splitlines()
  assert lines[0].startswith("| batch | contender | epoch walls (s) | ex/s, epochs 2..N |")
  assert len(lines) == 5 and all(ln.count("|") == 9 for ln in lines)
  assert (
    "| 128 | flaxtrain | 20.0, 10.0 | 6,000 | 6,500 | 30.0 | 90.00% | ex/s 1.20x (torch)" in text
  )
  assert "| 128 | tutorial | failed: exit 1 |" in text


def _tiny_npz(path):
  import numpy as np

  rng = np.random.default_rng(0)
  np.savez(
    path,
    train_image=rng.integers(0, 255, (96, 28, 28, 1), dtype=np.uint8),
    train_label=rng.integers(0, 10, 96).astype(np.int32),
    test_image=rng.integers(0, 255, (40, 28, 28, 1), dtype=np.uint8),
    test_label=rng.integers(0, 10, 40).astype(np.int32),
  )
  return str(path)


def _check_peer(r, epochs):
  assert len(r["epoch_wall_s"]) == epochs == len(r["epoch_train_s"])
  assert all(positive(w) for w in r["epoch_wall_s"])
  assert positive(r["examples_per_sec"]) and positive(r["train_examples_per_sec"])
  assert r["wall_to_final_eval_s"] == pytest.approx(sum(r["epoch_wall_s"]))
  assert 0 <= r["eval_accuracy"] <= 1


# Only in make test; on the newest stack same there (the benchmark's own peers).
@pytest.mark.slow
def test_peer_workers_time_every_epoch(tmp_path, monkeypatch):
  """The tutorial and torch peers in-process on a tiny random split: 3 epochs of 2 steps."""
  full = sibling("bench_full")
  bench = sibling("benchmark")
  monkeypatch.setenv(bench.SPAWN_ENV, repr(__import__("time").time()))
  spec = {"npz": _tiny_npz(tmp_path / "d.npz"), "batch_size": 16, "epochs": 3, "epoch_steps": 2}
  _check_peer(full.worker_tutorial(spec), 3)
  pytest.importorskip("torch")
  recipe = full.recipe_of("configs/fashion_cnn.py")
  assert recipe["optimizer"] == "adamw" and recipe["schedule"] == "warmup_cosine"
  # In its own interpreter, as the benchmark runs it: torch's import of triton can crash a
  # process that already loaded TensorFlow (e.g. through the real_data_dir fixture).
  r = bench.spawn("full_torch", {**spec, "recipe": recipe, "eval_batch_size": 16}, str(tmp_path))
  assert "error" not in r, r.get("stderr_tail")
  _check_peer(r, 3)
  assert r["threads"] >= 1


def test_torch_schedule_is_optax_warmup_cosine():
  import optax

  full = sibling("bench_full")
  recipe = {"schedule": "warmup_cosine", "warmup_epochs": 0.5, "end_factor": 0.0}
  factor = full._torch_schedule(recipe, 100, 400)
  ref = optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=50, decay_steps=400)
  for step in (0, 1, 25, 49, 50, 51, 200, 399, 400):
    assert factor(step) == pytest.approx(float(ref(step)), abs=1e-6), step


def test_overhead_bare_loop_and_table(tmp_path, monkeypatch):
  ov = sibling("bench_overhead")
  bench = sibling("benchmark")
  monkeypatch.setenv(bench.SPAWN_ENV, "0")
  spec = {"config": ov.CONFIG, "batch_size": 8, "steps": 60, "npz": _tiny_npz(tmp_path / "d.npz")}
  for model in ("mlp", "logreg"):
    for d in (1, 25):
      r = ov.worker_bare({**spec, "model": model, "steps_per_dispatch": d})
      assert positive(r["steps_per_sec"]) and r["timed_steps"] == (60 // d - 1) * d
      assert r["final_loss"] == r["final_loss"]  # Finite, not NaN.
      assert r["default_steps_per_dispatch"] == 25  # On the CPU too: no convolutions.
  results = {
    "mlp": {
      1: {
        "flaxtrain": {"steps_per_sec": 400.0},
        "bare": {"steps_per_sec": 1000.0},
        "default": True,
      },
      25: {"flaxtrain": {"steps_per_sec": 900.0}, "bare": {"steps_per_sec": 1000.0}},
    },
    "logreg": {
      1: {"flaxtrain": {"error": "exit 1"}, "bare": {"steps_per_sec": 5000.0}},
      # A drifting machine: the medians' ratio (1.00) is not what any round saw.
      25: {
        "flaxtrain": {"steps_per_sec": 1000.0, "steps_per_sec_rounds": [600.0, 1000.0, 1400.0]},
        "bare": {"steps_per_sec": 1000.0, "steps_per_sec_rounds": [500.0, 1000.0, 1750.0]},
      },
    },
  }
  text = ov.table(results)
  assert "| mlp | 1 (default) | 400 | 1,000 | 0.40 |  |" in text
  assert "| mlp | 25 | 900 | 1,000 | 0.90 |  |" in text
  assert "| logreg | 1 | - | 5,000 | - |  |" in text
  assert "| logreg | 25 | 1,000 | 1,000 | 1.00 | 1.20, 1.00, 0.80 |" in text
  results["logreg"][25]["flaxtrain"]["steps_per_sec_rounds"] = [660.0, 1000.0, 1400.0]
  assert "| logreg | 25 | 1,000 | 1,000 | 1.00 | 1.32, 1.00, 0.80 |" in ov.table(results)
  results["logreg"][25]["bare"]["steps_per_sec_rounds"] = [500.0, 1100.0, 1750.0]
  assert ov.ratio(results["logreg"][25]) == pytest.approx(1000 / 1100)


def test_overhead_rounds_alternate_which_side_runs_first(tmp_path, monkeypatch, capsys):
  """Within a round the two sides run back to back, the bare loop first in every other
  round; the platform's default dispatch comes from the bare worker whichever ran last."""
  ov = sibling("bench_overhead")
  bench = sibling("benchmark")
  calls = []

  def flaxtrain(args, model, d, tmp, tag):
    calls.append(("flaxtrain", model, d))
    return {"steps_per_sec": 90.0 + len(calls)}

  def spawn(kind, spec, tmp, **kw):
    if kind == "data":
      return {}
    calls.append(("bare", spec["model"], spec["steps_per_dispatch"]))
    return {"steps_per_sec": 100.0, "default_steps_per_dispatch": 1}

  monkeypatch.setattr(ov, "run_flaxtrain", flaxtrain)
  monkeypatch.setattr(bench, "spawn", spawn)
  monkeypatch.setattr(bench, "machine_info", lambda: {"cpu": "test", "cores": 2})
  monkeypatch.setattr(bench, "versions", lambda with_torch: {})
  args = types.SimpleNamespace(
    overhead_models=["mlp"],
    rounds=3,
    overhead_steps=100,
    overhead_batch=32,
    quiet_wait=0,
    json_out=str(tmp_path / "o.json"),
    data_dir=None,
  )
  assert ov.main(args) == 0
  firsts = [calls[i][0] for i in range(0, len(calls), 2)]
  assert firsts == ["flaxtrain", "flaxtrain", "bare", "bare", "flaxtrain", "flaxtrain"]
  report = json.loads((tmp_path / "o.json").read_text())
  assert report["settings"]["default_steps_per_dispatch"] == {"mlp": 1}
  rounds = report["results"]["mlp"]["1"]["flaxtrain_vs_bare_rounds"]
  assert rounds == pytest.approx([0.91, 0.96, 0.99])  # Paired by round, whichever went first.
  assert "| mlp | 1 (default) |" in capsys.readouterr().out


@pytest.mark.slow  # A whole script run: make test only, not on the newest stack too.
def test_full_run_smoke_parses_a_real_cli_run(real_data_dir, tmp_path):
  """`--smoke`: the real CLI for 2 "epochs" of 2 steps; its log gives the epoch times. The
  leanest jitted JAX loop runs the same 2 x 2 steps beside it."""
  out = tmp_path / "full.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["TFDS_DATA_DIR"] = real_data_dir
  cmd = [
    sys.executable,
    str(SCRIPT),
    "--smoke",
    "--smoke_steps=2",
    "--batch_sizes=128",
    "--skip_torch",
    "--skip_tutorial",
    "--quiet_wait=0",
    f"--json_out={out}",
  ]
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-4000:]
  report = json.loads(out.read_text())
  assert report["settings"]["epochs"] == 2 and report["settings"]["rounds"] == 1
  f = report["results"]["128"]["flaxtrain"]
  assert "error" not in f, f
  assert f["epoch_times_source"] == "flaxtrain.log eval-line timestamps"
  assert len(f["epoch_wall_s"]) == 2 and all(positive(w) for w in f["epoch_wall_s"])
  assert positive(f["examples_per_sec"]) and positive(f["train_examples_per_sec"])
  assert f["wall_to_final_eval_s"] < f["process_wall_s"]
  assert f["step"] == 4 and 0 <= f["eval_accuracy"] <= 1
  assert "| 128 | flaxtrain |" in r.stdout and "| batch | contender |" in r.stdout
  assert "1 round(s)" in r.stdout
  j = report["results"]["128"]["jax"]
  assert "error" not in j, j
  assert len(j["epoch_wall_s"]) == 2 and j["devices"] == 1 and 0 <= j["eval_accuracy"] <= 1
  assert np.isfinite(j["final_loss"]) and positive(j["examples_per_sec"])
  assert "| 128 | jax |" in r.stdout
  assert report["results"]["128"]["ratios"]["throughput_peer"] == "jax"


@pytest.mark.slow  # A whole script run: make test only.
def test_step_parts_times_xla_torch_and_the_data_parallel_step():
  """scripts/step_parts.py, which the README's step breakdown cites, runs end to end: every
  XLA piece, the two-device lines and PyTorch's pieces, each with a time."""
  pytest.importorskip("torch")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  cmd = [sys.executable, "scripts/step_parts.py", "--batch=4", "--calls=1", "--devices=2"]
  r = subprocess.run(
    [*cmd, "--torch"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  assert r.returncode == 0, r.stderr[-3000:]
  times = {
    line.rsplit(None, 2)[0]: float(line.rsplit(None, 2)[1])
    for line in r.stdout.splitlines()
    if line.endswith(" ms")
  }
  for name in ("forward + backward", "fwd + bwd, 2 devices", "AdamW step, 2 devices"):
    assert times[name] > 0, name
  torch_part = r.stdout.split("PyTorch", 1)[1]
  assert "whole step, AdamW" in torch_part and "conv2 both gradients" in torch_part
