"""Trains one config on several topologies and prints how far their results drift apart.

    python scripts/topology_check.py --steps=120 --workdir=runs/topology_check

Topologies (all on this machine's CPU): 1 device, 8 fake devices, and 2 processes x 2
fake devices joined by jax.distributed on 127.0.0.1. flaxtrain's batches are a pure
function of (seed, epoch, step), so the runs differ only by floating-point reduction
order. Each reduction is checked: the default (per-device mean gradients, one all-reduce)
and `--config.topology_invariant_shards=N` (fixed shards summed in one binary tree: the
same bits on every topology). Prints JSON: per reduction and topology the eval
loss/accuracy, and the largest differences of eval loss and of any parameter against the
1-device run.
"""

import argparse
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _cmd(workdir, steps, extra):
  return [
    sys.executable,
    "-m",
    "flaxtrain.main",
    f"--workdir={workdir}",
    f"--config.num_train_steps={steps}",
    f"--config.eval_every_steps={steps}",
    f"--config.checkpoint_every_steps={steps}",
    *extra,
  ]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_single(workdir, devices, steps, extra, timeout):
  r = subprocess.run(
    _cmd(workdir, steps, extra),
    env=_env(devices),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  if r.returncode:
    raise RuntimeError(f"{devices}-device run failed:\n{r.stderr[-3000:]}")


def run_multi(workdir, processes, devices, steps, extra, timeout):
  port = _free_port()
  procs = [
    subprocess.Popen(
      _cmd(workdir, steps, extra)
      + [
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={processes}",
        f"--process_id={i}",
      ],
      env=_env(devices),
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(processes)
  ]
  outputs = [p.communicate(timeout=timeout)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
    if p.returncode:
      raise RuntimeError(f"process {i} of {processes} failed:\n{out[-3000:]}")


def load_params(workdir) -> dict:
  import orbax.checkpoint as ocp

  ckpt_dir = pathlib.Path(workdir) / "checkpoints"
  step = max(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
  import jax

  path = ckpt_dir / str(step) / "default"
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    # Restore onto this process's first device, whatever topology saved it.
    target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      ckptr.metadata(path).item_metadata.tree,
    )
    tree = ckptr.restore(path, target)
  flat = jax.tree_util.tree_flatten_with_path(tree["params"])[0]
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def compare(workdir_root, steps, extra, timeout=1200, rerun=True) -> dict:
  root = pathlib.Path(workdir_root)
  if rerun:
    shutil.rmtree(root, ignore_errors=True)
  runs = {
    "1 device": lambda d: run_single(d, 1, steps, extra, timeout),
    "8 devices": lambda d: run_single(d, 8, steps, extra, timeout),
    "2 processes x 2 devices": lambda d: run_multi(d, 2, 2, steps, extra, timeout),
  }
  results = {}
  for name, fn in runs.items():
    workdir = root / name.replace(" ", "_")
    if rerun:
      fn(workdir)
    summary = json.loads((workdir / "summary.json").read_text())
    results[name] = {
      "workdir": str(workdir),
      "eval_loss": summary["eval_loss"],
      "eval_accuracy": summary["eval_accuracy"],
      "devices": summary["devices"],
      "processes": summary["processes"],
    }
  ref_name = "1 device"
  ref_params = load_params(results[ref_name]["workdir"])
  for r in results.values():
    params = load_params(r["workdir"])
    r["max_abs_eval_loss_diff"] = abs(r["eval_loss"] - results[ref_name]["eval_loss"])
    r["max_abs_param_diff"] = float(
      max(np.max(np.abs(params[k] - ref_params[k])) for k in ref_params)
    )
  return {"steps": steps, "extra_flags": extra, "runs": results}


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--steps", type=int, default=120)
  parser.add_argument("--workdir", default="runs/topology_check")
  parser.add_argument(
    "--invariant_shards",
    type=int,
    default=8,
    help="also check --config.topology_invariant_shards=N (0: skip)",
  )
  parser.add_argument("extra", nargs="*", help="flaxtrain flags after --")
  args = parser.parse_args()
  report = {"default": compare(pathlib.Path(args.workdir) / "default", args.steps, args.extra)}
  if args.invariant_shards:
    flag = f"--config.topology_invariant_shards={args.invariant_shards}"
    report[flag.lstrip("-")] = compare(
      pathlib.Path(args.workdir) / "invariant", args.steps, [*args.extra, flag]
    )
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  main()
