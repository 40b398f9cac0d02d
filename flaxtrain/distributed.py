"""Multi-process start-up: `jax.distributed.initialize`, explicit or auto-detected."""

import glob
import os
import sys
import threading

import jax
from absl import logging

from flaxtrain.errors import UserError

# Environment variables JAX's cluster auto-detection reads.
_CLUSTER_ENV = (
  "SLURM_JOB_ID",
  "TPU_WORKER_HOSTNAMES",
  "MEGASCALE_COORDINATOR_ADDRESS",
  "OMPI_MCA_orte_hnp_uri",
)


def initialize(coordinator_address, num_processes, process_id, timeout_s: int):
  """Joins the other processes, if any; single-process runs do nothing."""
  explicit = coordinator_address or num_processes or (process_id is not None and process_id >= 0)
  if explicit:
    if not (
      coordinator_address
      and num_processes
      and process_id is not None
      and 0 <= process_id < num_processes
    ):
      raise UserError(
        "Multi-process runs need all of --coordinator_address=HOST:PORT, --num_processes=N "
        f"and --process_id in [0, N) (got {coordinator_address!r}, {num_processes!r}, "
        f"{process_id!r})."
      )
    if num_processes == 1:
      return
    kwargs = dict(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
  elif _auto_detectable():
    kwargs = {}
  else:
    return
  logging.info(
    "Joining %s process(es) via %s (timeout %d s).",
    num_processes or "auto",
    coordinator_address or "cluster auto-detection",
    timeout_s,
  )
  message = (
    f"Process {process_id if process_id is not None and process_id >= 0 else '?'} could not "
    f"join the run at coordinator {coordinator_address or '(auto-detected)'} within "
    f"{timeout_s} s: check that all {num_processes or ''} processes were started with the "
    "same --coordinator_address and that it is reachable."
  )
  # On a timeout JAX aborts the whole process from C++, which Python cannot catch: a
  # watchdog says why first, and exits before the abort.
  done = threading.Event()

  def watchdog():
    if not done.wait(timeout_s):
      print(f"flaxtrain: error: {message}", file=sys.stderr, flush=True)
      os._exit(1)

  threading.Thread(target=watchdog, daemon=True).start()
  try:
    jax.distributed.initialize(initialization_timeout=timeout_s, **kwargs)
  except Exception as e:  # JAX raises RuntimeError/XlaRuntimeError with long texts.
    raise UserError(message) from e
  finally:
    done.set()


def _auto_detectable() -> bool:
  if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
    return False  # A single SLURM task is just one process.
  if any(os.environ.get(k) for k in _CLUSTER_ENV):
    return True
  # Cloud TPU VMs set no variable; JAX finds the slice through the metadata server.
  return bool(glob.glob("/dev/accel*")) or bool(glob.glob("/dev/vfio/[0-9]*"))
