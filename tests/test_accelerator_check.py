"""scripts/accelerator_check.sh: its tiny CPU form end to end, and its table of peaks."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPT = ROOT / "scripts" / "accelerator_check.sh"
RATE_FIELDS = {
  "examples_per_sec",
  "step_ms",
  "steps_timed",
  "first_call_s",
  "tflops_per_sec",
  "mfu",
}
MODEL_FIELDS = {
  "label",
  "tiny",
  "config",
  "image_shape",
  "num_classes",
  "global_batch",
  "per_device_batch",
  "warmup_steps",
  "default_steps_per_dispatch",
  "model",
  "compute_dtype",
  "optimizer",
  "num_params",
  "step_flops",
  "bare",
  "flaxtrain",
  "flaxtrain_vs_bare",
  "vs_bare_verdict",
  "device_memory",
}


def _check_module():
  spec = importlib.util.spec_from_file_location(
    "accelerator_check", ROOT / "scripts" / "accelerator_check.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_tiny_check_on_cpu_reports_every_field(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # 1 CPU device, as users run it.
  env["PYTHON"] = sys.executable
  args = ["--tiny", "--no-install", "--skip-tests", "--out", str(tmp_path / "out")]
  r = subprocess.run(
    ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300
  )
  assert r.returncode == 0, r.stdout + r.stderr[-4000:]
  assert "TINY" in r.stdout and "bitwise equal" in r.stdout, r.stdout
  report = json.loads((tmp_path / "out" / "accelerator_check.json").read_text())
  assert report["status"] == "ok" and report["tiny"] is True
  assert report["detected"].startswith("cpu") and report["install"] == "not needed on CPU"
  assert report["tests"]["status"] == "skipped" and report["tests"]["selected"]
  for key in ("date", "machine", "versions", "target_vs_bare", "report_path", "wall_s"):
    assert report[key] is not None, key

  tp = report["throughput"]
  assert (tp["platform"], tp["num_devices"], tp["peak_bf16_flops_per_device"]) == ("cpu", 1, None)
  assert set(tp["models"]) == {"fashion_cnn", "resnet_small_32px_bf16_tiny"}
  for name, m in tp["models"].items():
    assert MODEL_FIELDS <= set(m), (name, MODEL_FIELDS - set(m))
    assert m["tiny"] and "TINY" in m["label"]
    assert set(m["flaxtrain"]) == {"1", "25"} and m["default_steps_per_dispatch"] == 1
    for rates in (m["bare"], *m["flaxtrain"].values()):
      assert RATE_FIELDS <= set(rates)
      assert rates["examples_per_sec"] > 0 and rates["tflops_per_sec"] > 0
      assert rates["mfu"] is None  # No MFU on a CPU.
    assert m["step_flops"] > 0 and m["flaxtrain_vs_bare"] > 0
    assert m["vs_bare_verdict"] in ("PASS", "WARN")
  assert tp["models"]["fashion_cnn"]["num_params"] == 824_458  # configs/fashion_cnn.py's CNN.
  assert tp["models"]["resnet_small_32px_bf16_tiny"]["compute_dtype"] == "bfloat16"

  d = report["determinism"]
  assert d["option"] == "--config.topology_invariant_shards" and d["xla_flags_added"] == []
  assert len(d["runs"]) == 2 and d["shards"] >= 1
  assert d["bitwise_equal"] is True and d["max_abs_param_diff"] == 0.0 and d["verdict"] == "PASS"


def test_bad_arguments_fail_with_usage_and_help_exits_0():
  r = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True)
  assert r.returncode == 2 and "unknown argument '--bogus'" in r.stderr
  r = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
  assert r.returncode == 0 and "--no-install" in r.stdout and "--tiny" in r.stdout


@pytest.mark.parametrize(
  "kind,platform,peak",
  [
    ("NVIDIA H100 80GB HBM3", "gpu", 989e12),  # SXM.
    ("NVIDIA H100 PCIe", "gpu", 756e12),
    ("NVIDIA H200", "gpu", 989e12),
    ("NVIDIA A100-SXM4-80GB", "gpu", 312e12),
    ("NVIDIA L4", "gpu", 121e12),
    ("NVIDIA L40S", "gpu", 362e12),  # Not the L4's.
    ("TPU v4", "tpu", 275e12),
    ("TPU v5 lite", "tpu", 197e12),  # v5e.
    ("TPU v5", "tpu", 459e12),  # v5p.
    ("TPU v6 lite", "tpu", 918e12),
    ("NVIDIA GeForce GTX 1080", "gpu", None),
    ("cpu", "cpu", None),
  ],
)
def test_peak_flops_by_device_kind(kind, platform, peak):
  value, source = _check_module().peak_bf16(kind, platform)
  assert value == peak and source
