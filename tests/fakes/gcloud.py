#!/usr/bin/env python3
"""A stand-in `gcloud` for tests: Cloud TPU VMs whose workers are local directories.

Only what scripts/tpu_vm.sh uses is supported; anything else exits 2 with a message, so
a script can't pass by calling something the fake silently ignores.

  gcloud compute tpus tpu-vm create NAME --zone=Z --project=P --accelerator-type=T
      --version=V [--spot] [--scopes=...] [--service-account=...]
  gcloud compute tpus tpu-vm describe|delete NAME --zone=Z --project=P [--format=F] [--quiet]
  gcloud compute tpus tpu-vm list --zone=Z --project=P [--format=F]
  gcloud compute tpus tpu-vm ssh NAME --zone=Z --project=P --worker=W --command=CMD
  gcloud compute tpus tpu-vm scp [--recurse] SRC... NAME:DEST --zone=Z --project=P --worker=W

State lives in $FAKE_GCLOUD_ROOT/PROJECT/ZONE/NAME/: tpu.json, and workers/I/ as worker
I's home directory. The worker count follows the accelerator type as on Cloud TPU
(v4-16: 2 hosts). `ssh` runs CMD with `bash -c` in every chosen worker's home at once,
in a small environment like an ssh session's, and exits with the first failed worker's
status, as gcloud does. Each worker shell runs under its own supervisor process, which
reaps the background processes the command leaves behind (a VM's init does that), so
`kill -0` and `tail --pid` see them end. `delete` kills every process started on the
TPU's workers and removes its directories.

The "machine image", read at `create`:
  FAKE_GCLOUD_PYTHON      interpreter installed as python3 and python3.X on the workers'
                          PATH (default: the base interpreter running this file).
  FAKE_GCLOUD_WORKER_ENV  a JSON object of variables every worker shell gets, e.g. a
                          PYTHONPATH with preinstalled packages, XLA_FLAGS, PIP_NO_INDEX.
Workers also get JAX_PLATFORMS=cpu (there is no TPU), and on multi-host slices
FLAXTRAIN_COORDINATOR_ADDRESS=127.0.0.1:PORT, FLAXTRAIN_NUM_PROCESSES and
FLAXTRAIN_PROCESS_ID: on a real TPU VM JAX finds the other workers through the metadata
server, which JAX never asks on CPU. `curl` on the workers answers the metadata server's
agent-worker-number and worker-network-endpoints; `sudo` fails (nothing is installed).
"""

import ctypes
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

HERE = pathlib.Path(__file__).resolve().parent
_VALUE_FLAGS = {
  "--zone",
  "--project",
  "--format",
  "--accelerator-type",
  "--version",
  "--scopes",
  "--service-account",
  "--worker",
  "--command",
}
_BOOL_FLAGS = {"--quiet", "--spot", "--recurse"}
# Accelerator generation -> how many chips/cores of the type's size one host has, for
# slices bigger than one host (all types of size <= 8 have one host).
_PER_HOST = {"v2": 8, "v3": 8, "v4": 8, "v5p": 8, "v5litepod": 4, "v5e": 4, "v6e": 4}


class Fail(Exception):
  """An error gcloud would report: printed as `ERROR: (gcloud...) message`, exit 1."""

  def __init__(self, message, code=1):
    super().__init__(message)
    self.code = code


def unsupported(what):
  raise Fail(f"the fake gcloud does not support {what} (tests/fakes/gcloud.py)", code=2)


def parse(args, allowed):
  """--flag=value / --flag value / --bool -> (flags, positionals); unknown flags fail."""
  flags, positional = {}, []
  i = 0
  while i < len(args):
    arg = args[i]
    if arg.startswith("--"):
      name, eq, value = arg.partition("=")
      if name not in allowed:
        unsupported(f"the flag {name}")
      if name in _BOOL_FLAGS:
        if eq:
          raise Fail(f"{name} takes no value")
        flags[name] = True
      elif eq:
        flags[name] = value
      elif i + 1 < len(args):
        flags[name] = args[i + 1]
        i += 1
      else:
        raise Fail(f"argument {name}: expected one argument")
    elif arg.startswith("-"):
      unsupported(f"the flag {arg}")
    else:
      positional.append(arg)
    i += 1
  return flags, positional


def root() -> pathlib.Path:
  path = os.environ.get("FAKE_GCLOUD_ROOT")
  if not path:
    raise Fail("FAKE_GCLOUD_ROOT is not set: the fake gcloud keeps its TPUs there", code=2)
  return pathlib.Path(path)


def location(flags):
  for flag in ("--zone", "--project"):
    if not flags.get(flag):
      raise Fail(f"{flag} is required (the fake gcloud reads no gcloud config)", code=2)
  return root() / flags["--project"] / flags["--zone"]


def tpu_dir(flags, name) -> pathlib.Path:
  return location(flags) / name


def load(flags, name):
  path = tpu_dir(flags, name) / "tpu.json"
  if not path.exists():
    raise Fail(
      f"NOT_FOUND: Resource 'projects/{flags['--project']}/locations/{flags['--zone']}"
      f"/nodes/{name}' was not found"
    )
  return json.loads(path.read_text())


def save(state):
  path = pathlib.Path(state["dir"]) / "tpu.json"
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(state, indent=2))
  tmp.replace(path)


def workers_of(accelerator_type: str) -> int:
  m = re.fullmatch(r"([a-z][a-z0-9]*)-([1-9][0-9]*)", accelerator_type)
  if not m or m.group(1) not in _PER_HOST:
    raise Fail(
      f"INVALID_ARGUMENT: accelerator type {accelerator_type!r} is not one the fake knows "
      f"({', '.join(f'{g}-N' for g in _PER_HOST)})"
    )
  size = int(m.group(2))
  per_host = _PER_HOST[m.group(1)]
  if size <= 8:
    return 1
  if size % per_host:
    raise Fail(f"INVALID_ARGUMENT: accelerator type {accelerator_type!r} does not exist")
  return size // per_host


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# ------------------------------------------------------------------------------ actions
def create(args):
  allowed = {"--zone", "--project", "--accelerator-type", "--version", "--spot", "--scopes"}
  flags, pos = parse(args, allowed | {"--service-account"})
  if len(pos) != 1:
    raise Fail("create takes one TPU name")
  name = pos[0]
  for flag in ("--accelerator-type", "--version"):
    if not flags.get(flag):
      raise Fail(f"{flag} is required")
  d = tpu_dir(flags, name)
  if (d / "tpu.json").exists():
    raise Fail(f"ALREADY_EXISTS: node {name} already exists")
  n = workers_of(flags["--accelerator-type"])
  python = os.environ.get("FAKE_GCLOUD_PYTHON") or getattr(sys, "_base_executable", sys.executable)
  python = os.path.realpath(python)
  image_env = json.loads(os.environ.get("FAKE_GCLOUD_WORKER_ENV") or "{}")
  if not isinstance(image_env, dict) or not all(isinstance(v, str) for v in image_env.values()):
    raise Fail("FAKE_GCLOUD_WORKER_ENV must be a JSON object of strings", code=2)
  d.mkdir(parents=True)
  bin_dir = d / "image-bin"  # The image's /usr/bin, first on the workers' PATH.
  bin_dir.mkdir()
  version = subprocess.check_output(
    [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], text=True
  ).strip()
  for exe in ("python3", f"python{version}"):
    (bin_dir / exe).symlink_to(python)
  for tool in ("curl", "sudo"):
    wrapper = bin_dir / tool
    wrapper.write_text(
      f"#!/bin/sh\nexec {shlex.quote(sys.executable)} "
      f'{shlex.quote(str(HERE / "tpu_worker.py"))} {tool} "$@"\n'
    )
    wrapper.chmod(0o755)
  for i in range(n):
    (d / "workers" / str(i)).mkdir(parents=True)
  save(
    {
      "dir": str(d),
      "name": f"projects/{flags['--project']}/locations/{flags['--zone']}/nodes/{name}",
      "acceleratorType": flags["--accelerator-type"],
      "runtimeVersion": flags["--version"],
      "spot": bool(flags.get("--spot")),
      "state": "READY",
      "health": "HEALTHY",
      "workers": n,
      "vm_id": uuid.uuid4().hex,  # Marks every process started on this TPU's workers.
      "coordinator_port": free_port(),  # Fixed per slice, like JAX's 8482 on TPU VMs.
      "image_env": image_env,
    }
  )
  print(f"Create request issued for: [{name}]", file=sys.stderr)
  print(f"Created tpu [{name}].", file=sys.stderr)


def fmt(state, spec):
  fields = {
    "name": state["name"],
    "name.basename()": state["name"].rsplit("/", 1)[-1],
    "acceleratorType": state["acceleratorType"],
    "state": state["state"],
    "health": state["health"],
  }
  m = re.fullmatch(r"(value|table)\((.*)\)", spec or "")
  if spec is None:
    return "\n".join(
      f"{k}: {state[k]}" for k in ("acceleratorType", "health", "name", "runtimeVersion", "state")
    )
  keys = [k.strip() for k in m.group(2).split(",")] if m else []
  if not m or not all(k in fields for k in keys):
    unsupported(f"--format={spec}")
  if m.group(1) == "value":
    return "\t".join(fields[k] for k in keys)
  header = [re.sub(r"(?<!^)(?=[A-Z])", "_", k.split(".")[0]).upper() for k in keys]
  rows = [header, [fields[k] for k in keys]]
  widths = [max(len(r[i]) for r in rows) for i in range(len(keys))]
  return "\n".join(
    "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
  )


def describe(args):
  flags, pos = parse(args, {"--zone", "--project", "--format"})
  if len(pos) != 1:
    raise Fail("describe takes one TPU name")
  print(fmt(load(flags, pos[0]), flags.get("--format")))


def list_(args):
  flags, pos = parse(args, {"--zone", "--project", "--format"})
  if pos:
    raise Fail(f"unrecognized arguments: {pos}")
  loc = location(flags)
  states = sorted(
    (json.loads(p.read_text()) for p in loc.glob("*/tpu.json")), key=lambda s: s["name"]
  )
  spec = flags.get("--format", "table(name.basename(),acceleratorType,state)")
  for i, state in enumerate(states):
    lines = fmt(state, spec).splitlines()
    print("\n".join(lines if i == 0 or not spec.startswith("table") else lines[1:]))


def delete(args):
  flags, pos = parse(args, {"--zone", "--project", "--quiet", "--format"})
  if len(pos) != 1:
    raise Fail("delete takes one TPU name")
  if not flags.get("--quiet"):
    unsupported("delete without --quiet (gcloud would ask for confirmation)")
  state = load(flags, pos[0])
  kill_vm_processes(state["vm_id"])
  shutil.rmtree(state["dir"])
  print(f"Deleted tpu [{pos[0]}].", file=sys.stderr)


def kill_vm_processes(vm_id):
  """SIGKILL every process whose environment carries this TPU's marker: the VM is gone."""
  marker = f"FAKE_GCLOUD_VM={vm_id}".encode()
  for _ in range(3):  # A process may fork while we look.
    found = False
    for entry in os.listdir("/proc"):
      if not entry.isdigit():
        continue
      try:
        env = pathlib.Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
      except OSError:
        continue
      if marker in env:
        found = True
        try:
          os.kill(int(entry), signal.SIGKILL)
        except ProcessLookupError:
          pass
    if not found:
      return
    time.sleep(0.2)


def parse_workers(spec, n):
  """--worker as gcloud reads it: 'all', I, or a comma list of I and I-J ranges."""
  if spec.lower() == "all":
    return list(range(n))
  chosen = set()
  for part in filter(None, spec.split(",")):
    bounds = part.split("-")
    if not all(b.isdigit() for b in bounds) or len(bounds) > 2:
      raise Fail(f"Invalid value for [--worker]: unable to parse worker ID {part}.")
    lo, hi = int(bounds[0]), int(bounds[-1])
    if lo > hi or (len(bounds) == 2 and lo == hi):
      raise Fail(f'Invalid value for [--worker]: found malformed range "{part}".')
    chosen.update(range(lo, hi + 1))
  if not chosen:
    raise Fail("Invalid value for [--worker]: no worker specified.")
  if max(chosen) >= n:
    raise Fail(
      f"Invalid value for [--worker]: worker index {max(chosen)} is larger than the valid "
      f"worker indexes on this TPU VM. Please only use indexes in the range [0, {n - 1}], "
      "inclusive."
    )
  return sorted(chosen)


def ready(flags, name):
  state = load(flags, name)
  if state["state"] != "READY":
    raise Fail(f"the TPU {name} is {state['state']}, not READY")
  return state


def worker_env(state, i):
  home = pathlib.Path(state["dir"]) / "workers" / str(i)
  user = os.environ.get("USER") or "tpu-user"
  env = {
    "HOME": str(home),
    "USER": user,
    "LOGNAME": user,
    "SHELL": "/bin/bash",
    "LANG": "C.UTF-8",
    "PATH": f"{state['dir']}/image-bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
    "/sbin:/bin",
    "JAX_PLATFORMS": "cpu",
    "FAKE_GCLOUD_VM": state["vm_id"],
    "FAKE_GCLOUD_WORKER": str(i),
    "FAKE_GCLOUD_WORKERS": str(state["workers"]),
  }
  if state["workers"] > 1:
    env["FLAXTRAIN_COORDINATOR_ADDRESS"] = f"127.0.0.1:{state['coordinator_port']}"
    env["FLAXTRAIN_NUM_PROCESSES"] = str(state["workers"])
    env["FLAXTRAIN_PROCESS_ID"] = str(i)
  env.update(state["image_env"])
  return home, env


def start_worker(argv, home, env):
  """Runs argv under a supervisor; returns the read end of a pipe that gets its status.

  The supervisor is this worker's init: it gets the exit status of argv to us, then
  stays behind, without our stdout/stderr, to reap what argv left running.
  """
  r, w = os.pipe()
  pid = os.fork()
  if pid:
    os.close(w)
    return r
  try:
    os.close(r)
    os.setsid()  # Signals to the caller's terminal or process group don't reach the VM.
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    rc = subprocess.call(argv, cwd=home, env=env, stdin=subprocess.DEVNULL)
    os.write(w, str(rc if rc >= 0 else 128 - rc).encode())
    os.close(w)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
      os.dup2(null, fd)
    while True:
      try:
        os.wait()
      except ChildProcessError:
        break
  finally:
    os._exit(0)


def run_on_workers(state, workers, argv, what):
  pipes = []
  for i in workers:
    print(f"{what}: Attempting to connect to worker {i}...", file=sys.stderr, flush=True)
    home, env = worker_env(state, i)
    pipes.append((i, start_worker(argv, home, env)))
  first_failure = 0
  for i, r in pipes:
    with os.fdopen(r) as f:
      status = f.read()
    rc = int(status) if status else 255
    if rc and len(workers) > 1:
      print(
        f"##### Command execution on worker {i} failed with exit status {rc}. Continuing.",
        file=sys.stderr,
        flush=True,
      )
    first_failure = first_failure or rc
  return first_failure


def ssh(args):
  flags, pos = parse(args, {"--zone", "--project", "--worker", "--command"})
  if len(pos) != 1:
    raise Fail("ssh takes one TPU name (the fake supports no USER@ and no extra ssh args)")
  if "--command" not in flags:
    unsupported("an interactive ssh session (pass --command)")
  state = ready(flags, pos[0])
  workers = parse_workers(flags.get("--worker", "0"), state["workers"])
  return run_on_workers(state, workers, ["bash", "-c", flags["--command"]], "SSH")


def scp(args):
  flags, pos = parse(args, {"--zone", "--project", "--worker", "--recurse"})
  if len(pos) < 2:
    raise Fail("scp takes SRC... NAME:DEST")
  *sources, dest = pos
  if any(":" in s for s in sources):
    unsupported("copying from the TPU (remote sources)")
  name, colon, remote = dest.partition(":")
  if not colon or "@" in name:
    unsupported(f"the destination {dest!r} (use NAME:PATH)")
  state = ready(flags, name)
  workers = parse_workers(flags.get("--worker", "0"), state["workers"])
  for s in sources:
    if not os.path.exists(s):
      raise Fail(f"{s}: No such file or directory")
    if os.path.isdir(s) and not flags.get("--recurse"):
      raise Fail(f"{s}: is a directory (pass --recurse)")
  # Like scp, run on each worker: the destination is resolved against its home.
  cp = ["cp", "-R"] if flags.get("--recurse") else ["cp"]
  argv = [*cp, "--", *map(os.path.abspath, sources), remote or "."]
  return run_on_workers(state, workers, argv, "SCP")


TPU_VM = {"create": create, "describe": describe, "list": list_, "delete": delete}
TPU_VM_RUN = {"ssh": ssh, "scp": scp}


def main(argv):
  if argv[:3] != ["compute", "tpus", "tpu-vm"] or len(argv) < 4:
    unsupported(f"`gcloud {' '.join(argv[:4])}`: only `gcloud compute tpus tpu-vm ...`")
  action, rest = argv[3], argv[4:]
  if action in TPU_VM:
    TPU_VM[action](rest)
    return 0
  if action in TPU_VM_RUN:
    return TPU_VM_RUN[action](rest)
  unsupported(f"`gcloud compute tpus tpu-vm {action}`")


if __name__ == "__main__":
  try:
    sys.exit(main(sys.argv[1:]))
  except Fail as e:
    command = " ".join(sys.argv[1:5])
    print(f"ERROR: (gcloud {command}) {e}", file=sys.stderr)
    sys.exit(e.code)
