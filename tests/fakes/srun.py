#!/usr/bin/env python3
"""A stand-in `srun` for tests: runs a job step's tasks as local processes.

  srun [--nodes=N] [--ntasks=N] [--ntasks-per-node=K] [--cpus-per-task=C]
       [--kill-on-bad-exit[=0|1]] [--label] COMMAND [ARGS...]

Only inside a (fake) job: $SLURM_JOB_ID and $SLURM_JOB_NODELIST must be set, as sbatch
sets them; the step's nodes are the first N of the job's. Every task gets this
environment plus what srun sets for a task (SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID,
SLURM_NTASKS, SLURM_STEP_NODELIST, SLURMD_NODENAME, ...). Like srun, this waits for
all tasks and exits with the highest exit status; --label prefixes each output line
with the task id; --kill-on-bad-exit=1 stops the other tasks (SIGTERM, then SIGKILL
after $FAKE_SRUN_KILL_WAIT seconds, default 10) when one exits non-zero; SIGTERM, SIGINT,
SIGHUP, SIGUSR1 and SIGUSR2 sent to srun are passed on to the tasks.

The task pids are written to $FAKE_SLURM_ROOT/<job id>.<step id>.pids, one "TASK PID"
per line, so that a test can signal the tasks as slurmstepd does (e.g. `sbatch
--signal=TERM@120` before the time limit). Unknown options exit 2 with a message.
"""

import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
from scontrol import expand  # noqa: E402

_VALUE = {"--nodes", "--ntasks", "--ntasks-per-node", "--cpus-per-task"}
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def die(message, code=2):
  print(f"srun: error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def parse(args):
  opts, i = {}, 0
  while i < len(args) and args[i].startswith("-"):
    name, eq, value = args[i].partition("=")
    if name in ("--label", "-l"):
      opts["--label"] = "1"
    elif name in ("--kill-on-bad-exit", "-K"):
      opts["--kill-on-bad-exit"] = value if eq else "1"
    elif name in _VALUE:
      if not eq:
        i += 1
        value = args[i] if i < len(args) else die(f"{name} needs a value")
      if not value.isdigit() or int(value) < 1:
        die(f"{name}={value}: expected a positive integer")
      opts[name] = value
    else:
      die(f"the fake srun does not support {args[i]} (tests/fakes/srun.py)")
    i += 1
  if i == len(args):
    die("no command to run")
  return opts, args[i:]


def pump(stream, prefix, out):
  for line in iter(stream.readline, b""):
    out.buffer.write(prefix + line)
    out.flush()
  stream.close()


def main(args):
  opts, command = parse(args)
  job, nodelist = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_JOB_NODELIST")
  state = os.environ.get("FAKE_SLURM_ROOT")
  if not (job and nodelist and state):
    die(
      "the fake srun runs job steps inside a fake job only: set SLURM_JOB_ID, "
      "SLURM_JOB_NODELIST and FAKE_SLURM_ROOT"
    )
  job_nodes = expand(nodelist)
  nodes = int(opts.get("--nodes", os.environ.get("SLURM_JOB_NUM_NODES", len(job_nodes))))
  per_node = int(opts.get("--ntasks-per-node", 1))
  ntasks = int(opts.get("--ntasks", nodes * per_node))
  if nodes > len(job_nodes):
    die(f"Unable to create step for job {job}: More processors requested than permitted")
  if ntasks != nodes * per_node:
    die("the fake srun needs --ntasks = --nodes x --ntasks-per-node")
  step_nodes = job_nodes[:nodes]
  root = pathlib.Path(state)
  root.mkdir(parents=True, exist_ok=True)
  step = len(list(root.glob(f"{job}.*.pids")))
  step_env = {
    "SLURM_STEP_ID": str(step),
    "SLURM_STEPID": str(step),
    "SLURM_STEP_NODELIST": ",".join(step_nodes),
    "SLURM_STEP_NUM_NODES": str(nodes),
    "SLURM_STEP_NUM_TASKS": str(ntasks),
    "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})",
    "SLURM_NTASKS": str(ntasks),
    "SLURM_NPROCS": str(ntasks),
    "SLURM_NNODES": str(nodes),
  }
  if "--cpus-per-task" in opts:
    step_env["SLURM_CPUS_PER_TASK"] = opts["--cpus-per-task"]
  width = len(str(ntasks - 1))
  tasks, pumps = [], []
  for t in range(ntasks):
    node = t // per_node
    env = {
      **os.environ,
      **step_env,
      "SLURM_PROCID": str(t),
      "SLURM_LOCALID": str(t % per_node),
      "SLURM_NODEID": str(node),
      "SLURMD_NODENAME": step_nodes[node],
    }
    p = subprocess.Popen(
      command,
      env=env,
      stdin=subprocess.DEVNULL,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      start_new_session=True,  # Another node: the caller's Ctrl-C reaches srun only.
    )
    tasks.append(p)
    prefix = f"{t:>{width}}: ".encode() if "--label" in opts else b""
    for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
      pumps.append(threading.Thread(target=pump, args=(stream, prefix, out), daemon=True))
      pumps[-1].start()
  pids = root / f"{job}.{step}.pids"
  pids.write_text("".join(f"{t} {p.pid}\n" for t, p in enumerate(tasks)))

  def signal_all(signum):
    for p in tasks:
      if p.poll() is None:
        p.send_signal(signum)

  for s in _FORWARDED:
    signal.signal(s, lambda signum, frame: signal_all(signum))
  kill_at = None
  kill_wait = float(os.environ.get("FAKE_SRUN_KILL_WAIT", "10"))
  reported = set()
  while True:
    running = any(p.poll() is None for p in tasks)
    for t, p in enumerate(tasks):
      if p.returncode and t not in reported:
        reported.add(t)
        what = (
          f"Exited with exit code {p.returncode}"
          if p.returncode > 0
          else f"Killed by signal {-p.returncode}"
        )
        print(f"srun: error: {step_nodes[t // per_node]}: task {t}: {what}", file=sys.stderr)
        if running and kill_at is None and opts.get("--kill-on-bad-exit") == "1":
          print(f"srun: Terminating StepId={job}.{step}", file=sys.stderr, flush=True)
          signal_all(signal.SIGTERM)
          kill_at = time.monotonic() + kill_wait
    if not running:
      break
    if kill_at is not None and time.monotonic() > kill_at:
      signal_all(signal.SIGKILL)
    time.sleep(0.1)
  for thread in pumps:
    thread.join()
  codes = [p.returncode if p.returncode >= 0 else 128 - p.returncode for p in tasks]
  return max(codes)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
