"""Peak device and host memory: measured, plausible, and in every run's summary.json."""

import json
import subprocess
import sys

import jax
import numpy as np
import psutil
import pytest
from conftest import tiny_config

from flaxtrain import loop, parallel, resources
from flaxtrain.main import _summary_line

MiB = 2**20


def test_peak_host_rss_is_in_bytes_and_at_least_the_current_rss():
  now = psutil.Process().memory_info().rss
  peak = resources.peak_host_rss_bytes()
  assert peak > 50 * MiB  # This process imported JAX.
  # The kernel's RSS counters are per-thread batched: a few MiB of slack.
  assert now - 16 * MiB <= peak < 1024 * 2**30


def test_peak_device_memory_is_none_or_positive_never_zero():
  peak = resources.peak_device_bytes(jax.local_devices())
  assert peak is None or peak > 0
  if all(d.memory_stats() is None for d in jax.local_devices()):  # XLA:CPU
    assert peak is None
  assert resources.peak_device_bytes([]) is None


class _Device:
  def __init__(self, stats):
    self.stats = stats

  def memory_stats(self):
    if isinstance(self.stats, Exception):
      raise self.stats
    return self.stats


def test_peak_device_memory_is_the_max_over_the_devices_that_report_it():
  devices = [
    _Device({"peak_bytes_in_use": 5 * MiB, "bytes_in_use": MiB}),
    _Device({"peak_bytes_in_use": 7 * MiB}),
    _Device(None),
    _Device({"bytes_in_use": 3}),
    _Device(NotImplementedError("no memory stats")),
  ]
  assert resources.peak_device_bytes(devices) == 7 * MiB
  assert resources.peak_device_bytes(devices[2:]) is None


@pytest.mark.skipif(sys.platform != "linux", reason="live children are read from /proc")
def test_peak_child_rss_is_the_largest_live_child():
  if not psutil.Process().children():
    assert resources.peak_child_rss_bytes() is None
  touch = "x = bytearray(200 * 2**20); x[::4096] = bytes(len(x[::4096])); print(1); input()"
  child = subprocess.Popen(
    [sys.executable, "-c", touch], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
  )
  try:
    assert child.stdout.readline().strip() == "1"  # It has touched its 200 MiB.
    assert resources.peak_child_rss_bytes() > 200 * MiB
  finally:
    child.communicate("\n", timeout=30)


def test_processes_agree_on_the_largest_values(monkeypatch):
  from jax.experimental import multihost_utils

  others = [[None, 3 * 2**30 + 5, None], [12 * 2**30 + 1, 100, 7]]

  def allgather(local):  # Process 0 (this one) and two others, as process_allgather does.
    encoded = [
      [[-1, 0] if v is None else [v >> 30, v & (2**30 - 1)] for v in values] for values in others
    ]
    return np.stack([local, *np.array(encoded, np.int32)])

  monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
  merged = resources._max_over_processes([None, 2 * 2**30, None])
  assert merged == [12 * 2**30 + 1, 3 * 2**30 + 5, 7]
  others[:] = [[None, 1, None]]
  assert resources._max_over_processes([None, 2, None]) == [None, 2, None]


def test_every_run_reports_its_peaks_in_summary_json_and_the_last_line(synthetic_data, tmp_path):
  summary = loop.train_and_evaluate(tiny_config(num_train_steps=2), str(tmp_path))
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  expected = resources.peaks(parallel.DataParallel())
  for key in ("peak_device_memory_bytes", "peak_host_rss_bytes", "peak_child_rss_bytes"):
    assert on_disk[key] == summary[key]
  assert 50 * MiB < on_disk["peak_host_rss_bytes"] <= expected["peak_host_rss_bytes"]
  device = on_disk["peak_device_memory_bytes"]
  assert device is None if expected["peak_device_memory_bytes"] is None else device > 0
  line = _summary_line(summary, str(tmp_path))
  assert f"peak memory {resources.human_bytes(on_disk['peak_host_rss_bytes'])} host" in line


def test_summary_line_shows_device_memory_where_known():
  summary = {
    "step": 10,
    "eval_loss": 0.5,
    "eval_accuracy": 0.9,
    "eval_examples": 100,
    "train_examples_per_sec": 1000.0,
    "wall_s": 3.0,
    "peak_device_memory_bytes": int(3.14 * 2**30),
    "peak_host_rss_bytes": 900 * MiB,
  }
  assert "peak memory 3.1 GiB device, 900 MiB host; 3.0 s wall" in _summary_line(summary, "w")
  del summary["peak_device_memory_bytes"], summary["peak_host_rss_bytes"]  # Older runs.
  assert "peak memory" not in _summary_line(summary, "w")
  assert resources.human_bytes(2**30) == "1.0 GiB"
