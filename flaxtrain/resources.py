"""What a process has used at its peak: device memory and host memory (RSS).

Peaks since the process started, not since a run started: a notebook that trains twice
reports the larger of the two. No flaxtrain imports, so that any mode can call these.
"""

import os
import resource
import sys

import numpy as np

# ru_maxrss is in KiB on Linux and in bytes on macOS.
_RU_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024


def peak_device_bytes(devices) -> int | None:
  """The largest `peak_bytes_in_use` of `devices` (this process's own: others' raise).

  None where the backend keeps no memory statistics (XLA:CPU), never a made-up 0.
  """
  peaks = []
  for device in devices:
    try:
      stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - Some backends raise (unimplemented) instead of None.
      stats = None
    if stats and stats.get("peak_bytes_in_use"):
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks, default=None)


def peak_host_rss_bytes() -> int:
  """This process's peak resident set size (its children not included)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _RU_MAXRSS_UNIT


def peak_child_rss_bytes() -> int | None:
  """The largest peak RSS among this process's live child processes (e.g. Grain's input
  workers); None without any, or off Linux (/proc).

  Live ones only: `RUSAGE_CHILDREN` would also count every subprocess that a library ever
  forked (TensorFlow's import does), at the parent's size when it forked.
  """
  peak = None
  for pid in _live_children():
    try:
      with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
          if line.startswith("VmHWM:"):  # The process's peak RSS, in kB.
            peak = max(peak or 0, int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):  # It ended meanwhile.
      pass
  return peak


def _live_children() -> list[int]:
  try:
    tasks = os.listdir("/proc/self/task")  # Children are listed per thread that made them.
  except OSError:  # Not Linux.
    return []
  pids = []
  for task in tasks:
    try:
      with open(f"/proc/self/task/{task}/children", encoding="ascii") as f:
        pids += [int(p) for p in f.read().split()]
    except (OSError, ValueError):  # The thread ended, or the kernel lacks the file.
      pass
  return pids


def peaks(par) -> dict:
  """Summary fields: the peaks over every process of a `parallel.DataParallel` run.

  Call on every process at the same point, because with several processes the values are
  agreed by a gather (a few bytes, like the stop signal's).
  """
  values = [peak_device_bytes(par.local_devices), peak_host_rss_bytes(), peak_child_rss_bytes()]
  if par.num_processes > 1:
    values = _max_over_processes(values)
  return {
    "peak_device_memory_bytes": values[0],
    "peak_host_rss_bytes": values[1],
    "peak_child_rss_bytes": values[2],
  }


def _max_over_processes(values: list[int | None]) -> list[int | None]:
  from jax.experimental import multihost_utils

  # int32 halves (JAX has no int64 without x64): value = high * 2**30 + low; None: -1.
  local = np.array([[-1, 0] if v is None else [v >> 30, v & (2**30 - 1)] for v in values], np.int32)
  every = np.asarray(multihost_utils.process_allgather(local)).astype(np.int64)
  every = every.reshape(-1, *local.shape)
  merged = np.where(every[..., 0] < 0, -1, every[..., 0] * 2**30 + every[..., 1]).max(axis=0)
  return [None if v < 0 else int(v) for v in merged]


def human_bytes(n: int) -> str:
  """1.2 GiB, 340 MiB."""
  if n >= 1000 * 2**20:
    return f"{n / 2**30:.1f} GiB"
  return f"{n / 2**20:.0f} MiB"
