"""The launch scripts end to end, on this machine, against stand-ins for the cluster tools.

scripts/tpu_vm.sh drives a fake `gcloud` (tests/fakes/gcloud.py) whose TPU workers are
local directories; scripts/slurm_gpu.sbatch runs with bash in the environment sbatch
gives a job, with a fake `srun` (tests/fakes/srun.py) whose tasks are local processes.
Each worker or task is one flaxtrain process on CPU devices, joined through 127.0.0.1.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from importlib import metadata

import pytest
from conftest import ROOT

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the fakes use /proc, prctl")

FAKES = ROOT / "tests" / "fakes"
TPU_VM = ROOT / "scripts" / "tpu_vm.sh"
SBATCH = ROOT / "scripts" / "slurm_gpu.sbatch"
# A tiny CNN on 10% of Fashion-MNIST, a log line every 2 steps, eval on 1,000 examples.
TINY = [
  "--config.model.features=(8, 16)",
  "--config.model.dense=(32,)",
  "--config.batch_size=64",
  "--config.log_every_steps=2",
  "--config.dataset.train_split=train[:10%]",
  "--config.dataset.eval_split=test[:1000]",
]
# Runs until stopped: no eval or checkpoint on the way, so the stop's is the only one.
UNTIL_STOPPED = [
  *TINY,
  "--config.num_train_steps=100000",
  "--config.eval_every_steps=100000",
  "--config.checkpoint_every_steps=100000",
]
TIMEOUT = 300


def _tools(directory: pathlib.Path, **tools) -> pathlib.Path:
  """`name` -> command line: executables in `directory`, to put first on PATH."""
  directory.mkdir(parents=True, exist_ok=True)
  for name, argv in tools.items():
    path = directory / name
    path.write_text(f'#!/bin/sh\nexec {" ".join(map(str, argv))} "$@"\n')
    path.chmod(0o755)
  return directory


def _clean_env(**extra) -> dict:
  """The caller's environment without anything that would steer the scripts or flaxtrain."""
  prefixes = ("FLAXTRAIN", "GCLOUD", "CLOUDSDK_", "TPU_", "SLURM", "PIP_", "JAX_", "XLA_")
  env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
  env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
  return env


def _steps(text: str, label: str = "") -> list[int]:
  return [int(s) for s in re.findall(rf"^{re.escape(label)}.*\] \[(\d+)\] train_", text, re.M)]


def _wait_for_steps(read_texts, labels, at_least: int):
  """Until every label's lines in the texts show a logged train step >= at_least."""
  deadline = time.monotonic() + TIMEOUT
  while time.monotonic() < deadline:
    texts = read_texts()
    if all(
      max(_steps(t, label), default=0) >= at_least for t, label in zip(texts, labels, strict=True)
    ):
      return
    time.sleep(0.5)
  raise AssertionError(f"no train step >= {at_least} within {TIMEOUT} s:\n" + texts[0][-3000:])


def _checkpoints(workdir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _summary(workdir: pathlib.Path) -> dict:
  return json.loads((workdir / "summary.json").read_text())


# ------------------------------------------------------------------- Cloud TPU VMs
@pytest.fixture(scope="module")
def preinstalled(tmp_path_factory) -> pathlib.Path:
  """This venv's packages but flaxtrain and pip: what the fake TPU workers' image has.

  The workers find them through PYTHONPATH, so the script's install step runs for real
  (venv, pip, the wheel it builds) without downloading TensorFlow and JAX again.
  """
  view = tmp_path_factory.mktemp("preinstalled")
  for site in {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}:
    for entry in pathlib.Path(site).iterdir():
      name = entry.name.lower()
      if not name.startswith(("flaxtrain", "__editable__", "pip-")) and name != "pip":
        (view / entry.name).symlink_to(entry)
  return view


class FakeTpu:
  """tpu_vm.sh ACTION --name=ft --zone=... --project=... against the fake gcloud."""

  LOCATION = ["--name=ft", "--zone=us-central2-b", "--project=flaxtrain-test"]

  def __init__(self, tmp_path: pathlib.Path, preinstalled: pathlib.Path):
    self.root = tmp_path / "gcloud"
    self.dir = self.root / "flaxtrain-test" / "us-central2-b" / "ft"
    bin_dir = _tools(
      tmp_path / "bin",
      gcloud=[sys.executable, FAKES / "gcloud.py"],
      python3=[sys.executable],  # Builds the wheel offline: this venv has setuptools>=77.
    )
    (tmp_path / "tmp").mkdir()
    worker_env = {
      "PYTHONPATH": str(preinstalled),
      "PIP_NO_INDEX": "1",
      "PIP_NO_DEPS": "1",  # The [tpu] extra's libtpu: not offline, and there is no TPU.
      "PIP_DISABLE_PIP_VERSION_CHECK": "1",
      "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
      "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    self.env = _clean_env(
      PATH=f"{bin_dir}:{os.environ['PATH']}",
      TMPDIR=str(tmp_path / "tmp"),
      FAKE_GCLOUD_ROOT=str(self.root),
      FAKE_GCLOUD_WORKER_ENV=json.dumps(worker_env),
      TPU_VM_POLL_SECONDS="1",
      PIP_NO_INDEX="1",
      PIP_NO_BUILD_ISOLATION="0",  # Sic: pip reads "0" here as --no-build-isolation.
    )

  def __call__(self, action, *args, timeout=TIMEOUT):
    return subprocess.run(
      ["bash", str(TPU_VM), action, *self.LOCATION, *args],
      env=self.env,
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=timeout,
    )

  def home(self, worker: int) -> pathlib.Path:
    return self.dir / "workers" / str(worker)

  def log(self, worker: int) -> str:
    path = self.home(worker) / "flaxtrain-run" / "logs" / f"worker_{worker}.log"
    return path.read_text() if path.exists() else ""

  def installed(self, worker: int) -> pathlib.Path:
    (site,) = (self.home(worker) / "flaxtrain-venv" / "lib").glob("python3*/site-packages")
    return site / "flaxtrain"


def _ok(r):
  assert r.returncode == 0, (
    f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
  )
  return r


@pytest.mark.slow
def test_tpu_vm_up_logs_stop_wait_resume_and_delete_on_a_two_host_slice(
  tmp_path, real_data_dir, preinstalled
):
  # The source as a copy, so that building its wheel leaves this checkout as it is.
  src = tmp_path / "src"
  junk = shutil.ignore_patterns("__pycache__", "*.egg-info")
  for name in ("flaxtrain", "configs"):
    shutil.copytree(ROOT / name, src / name, ignore=junk)
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, src / name)
  tpu = FakeTpu(tmp_path, preinstalled)
  workdir = tmp_path / "filestore" / "run"  # On a file system both workers mount.
  where = ["--tpu-type=v4-16", "--shared-fs", f"--workdir={workdir}", f"--data-dir={real_data_dir}"]
  python = f"--python=python{sys.version_info[0]}.{sys.version_info[1]}"  # As in the image.
  try:
    # up: create the v4-16 (2 hosts), install the wheel of src on both, start training.
    r = _ok(tpu("up", *where, f"--source={src}", python, "--", *UNTIL_STOPPED))
    assert r.stdout.count(f"flaxtrain {metadata.version('flaxtrain')} installed") == 2, r.stdout
    assert all(f"worker {i}: started flaxtrain" in r.stdout for i in (0, 1)), r.stdout
    for i in (0, 1):  # The wheel's package, and the config the script copied.
      assert tpu.installed(i).joinpath("__init__.py").is_file()
      assert (tpu.home(i) / "flaxtrain-run" / "configs" / "fashion_cnn.py").is_file()
    _wait_for_steps(lambda: [tpu.log(0), tpu.log(1)], ["", ""], at_least=4)

    r = tpu("run", *where, "--", *UNTIL_STOPPED)  # Never two runs on one TPU.
    assert r.returncode != 0 and "flaxtrain is already running" in r.stderr, r.stderr
    r = _ok(tpu("logs", "--worker=all", "--no-follow", "--lines=3"))
    lines = r.stdout.splitlines()
    assert sorted(line[:5] for line in lines) == ["[w0] "] * 3 + ["[w1] "] * 3, r.stdout

    # stop: SIGTERM on every worker; logs follows worker 0 until flaxtrain exits.
    r = _ok(tpu("stop"))
    assert all(f"worker {i}: sent SIGTERM to flaxtrain" in r.stdout for i in (0, 1)), r.stdout
    r = _ok(tpu("logs", "--lines=50", timeout=120))
    (stopped,) = map(int, re.findall(r"Stopped at step (\d+) after a stop signal", r.stdout))
    r = _ok(tpu("wait"))
    assert all(f"worker {i}: flaxtrain exited with status 0" in r.stdout for i in (0, 1))
    assert "Stopped at step" in tpu.log(1)
    assert _checkpoints(workdir) == [stopped] and not (workdir / "summary.json").exists()
    r = _ok(tpu("status"))
    assert "READY" in r.stdout and r.stdout.count("flaxtrain exited with status 0") == 2

    # install again after an edit: the workers get the new code (same version number).
    with (src / "flaxtrain" / "__init__.py").open("a") as f:
      f.write("# edited after the first install\n")
    _ok(tpu("install", f"--source={src}", python))
    for i in (0, 1):
      assert "# edited after" in tpu.installed(i).joinpath("__init__.py").read_text()

    # run --follow resumes from the stop's checkpoint and exits with the workers' status.
    steps = stopped + 4
    r = _ok(tpu("run", *where, "--follow", "--", *TINY, f"--config.num_train_steps={steps}"))
    assert f"Resumed from the checkpoint at step {stopped}." in r.stdout
    assert r.stdout.count("flaxtrain exited with status 0") == 2, r.stdout
    summary = _summary(workdir)
    assert (summary["step"], summary["processes"], summary["devices"]) == (steps, 2, 4)
    assert summary["eval_examples"] == 1000 and _checkpoints(workdir) == [stopped, steps]

    # A run that fails: --follow exits with the workers' status.
    r = tpu("run", *where, "--follow", "--", "--config.no_such_key=1")
    assert r.returncode == 2 and r.stdout.count("flaxtrain exited with status 2") == 2
    assert "no_such_key" in r.stdout, r.stdout  # Worker 0's log, followed.

    _ok(tpu("delete"))
    assert not tpu.dir.exists()
    r = tpu("status")
    assert r.returncode != 0 and "NOT_FOUND" in r.stderr, r.stderr
  finally:
    if tpu.dir.exists():  # Kills whatever still runs on its workers.
      subprocess.run(
        [sys.executable, FAKES / "gcloud.py", "compute", "tpus", "tpu-vm", "delete", "ft"]
        + ["--quiet", "--zone=us-central2-b", "--project=flaxtrain-test"],
        env=tpu.env,
        check=False,
      )


# ------------------------------------------------------------------------------ SLURM
def _node_local(path) -> bool:
  return re.match(r"/(tmp|var/tmp|dev/shm)(/|$)", os.path.realpath(path)) is not None


@pytest.fixture
def shared_dir():
  """A directory outside /tmp: slurm_gpu.sbatch refuses node-local workdirs like /tmp."""
  for base in (ROOT / "runs", pathlib.Path.home() / ".cache"):
    if not _node_local(base):
      created = not base.exists()
      base.mkdir(parents=True, exist_ok=True)
      path = pathlib.Path(tempfile.mkdtemp(prefix="test_launch_", dir=base))
      yield path
      shutil.rmtree(path, ignore_errors=True)
      if created and not any(base.iterdir()):
        base.rmdir()
      return
  pytest.skip("no writable directory outside /tmp to stand in for shared storage")


def _job_id(after: int | None = None) -> int:
  """A job id whose SLURM coordinator port (61440 + id % 4096) is free here."""
  start = os.getpid() if after is None else after + 1
  for offset in ((start + k) % 4096 for k in range(4096)):
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", 61440 + offset))
      except OSError:
        continue
    return 4096 * 7 + offset
  raise AssertionError("no free port in 61440-65535")


def _sbatch_env(tmp_path, job: int) -> dict:
  """What sbatch --nodes=2 --cpus-per-task=1 gives the batch script, on nodes 127.0.0.1-2."""
  nodes = "127.0.0.[1-2]"
  bin_dir = _tools(
    tmp_path / "bin",
    srun=[sys.executable, FAKES / "srun.py"],
    scontrol=[sys.executable, FAKES / "scontrol.py"],
  )
  return _clean_env(
    PATH=f"{bin_dir}:{os.environ['PATH']}",
    FAKE_SLURM_ROOT=str(tmp_path / "slurm"),
    SLURM_JOB_ID=str(job),
    SLURM_JOBID=str(job),
    SLURM_JOB_NAME="flaxtrain",
    SLURM_JOB_NUM_NODES="2",
    SLURM_NNODES="2",
    SLURM_JOB_NODELIST=nodes,
    SLURM_NODELIST=nodes,
    SLURM_NTASKS="2",
    SLURM_NPROCS="2",
    SLURM_NTASKS_PER_NODE="1",
    SLURM_TASKS_PER_NODE="1(x2)",
    SLURM_CPUS_PER_TASK="1",
    SLURM_JOB_CPUS_PER_NODE="1(x2)",
    SLURM_SUBMIT_DIR=str(ROOT),
    SLURM_SUBMIT_HOST="127.0.0.1",
    SLURM_PROCID="0",
    SLURM_LOCALID="0",
    SLURM_NODEID="0",
    SLURMD_NODENAME="127.0.0.1",
    SLURM_CLUSTER_NAME="fake",
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=1",
    TF_CPP_MIN_LOG_LEVEL="2",
  )


def _signal_tasks(tmp_path, signum, job="*"):
  """Signals the tasks of the job's steps, as slurmstepd does."""
  for pids in (tmp_path / "slurm").glob(f"{job}.*.pids"):
    for pid in pids.read_text().split()[1::2]:
      try:
        os.kill(int(pid), signum)
      except ProcessLookupError:
        pass


@pytest.mark.slow
def test_slurm_job_trains_saves_on_sigterm_and_the_next_job_resumes(
  tmp_path, real_data_dir, shared_dir
):
  workdir = shared_dir / "run"
  common = [f"--venv={sys.prefix}", f"--workdir={workdir}", f"--data-dir={real_data_dir}"]
  # Job 1: the coordinator auto-detected by JAX from the SLURM variables.
  job, out, proc = _job_id(), tmp_path / "job1.out", None
  try:
    with out.open("w") as f:
      proc = subprocess.Popen(
        ["bash", str(SBATCH), *common, "--", *UNTIL_STOPPED],
        env=_sbatch_env(tmp_path, job),
        cwd=tmp_path,
        stdout=f,
        stderr=subprocess.STDOUT,
      )
    _wait_for_steps(lambda: [out.read_text()] * 2, ["0: ", "1: "], at_least=4)
    # As --signal=TERM@120 before the time limit: SLURM signals the tasks, not the script.
    _signal_tasks(tmp_path, signal.SIGTERM, job)
    assert proc.wait(timeout=120) == 0, out.read_text()[-3000:]
  finally:
    if proc is not None and proc.poll() is None:  # The test failed: end the job.
      _signal_tasks(tmp_path, signal.SIGKILL, job)
      proc.kill()
  text = out.read_text()
  stopped = {int(s) for s in re.findall(r"^[01]: .*Stopped at step (\d+) after a stop", text, re.M)}
  assert len(stopped) == 1 and text.count("Stopped at step") == 2, text[-3000:]
  (stopped,) = stopped
  assert "coordinator: auto" in text and "srun exited with status 0" in text
  assert _checkpoints(workdir) == [stopped] and not (workdir / "summary.json").exists()
  assert not list(workdir.glob(".shared_fs_check.*"))  # The script cleans up its marker.

  # Job 2 (as after sbatch --requeue): resumes, with the coordinator passed explicitly.
  steps, job = stopped + 4, _job_id(after=job)
  try:
    r = subprocess.run(
      ["bash", str(SBATCH), "--coordinator=explicit", *common, "--"]
      + [*TINY, f"--config.num_train_steps={steps}"],
      env=_sbatch_env(tmp_path, job),
      cwd=tmp_path,
      capture_output=True,
      text=True,
      timeout=TIMEOUT,
    )
  except subprocess.TimeoutExpired:
    _signal_tasks(tmp_path, signal.SIGKILL, job)
    raise
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert "coordinator: explicit" in r.stderr
  for task in (0, 1):
    assert f"{task}: flaxtrain: step {steps}:" in r.stdout, r.stdout
    assert re.search(rf"^{task}: .*Resumed from the checkpoint at step {stopped}\.", r.stderr, re.M)
  summary = _summary(workdir)
  assert (summary["step"], summary["processes"], summary["devices"]) == (steps, 2, 2)


def test_slurm_script_refuses_a_node_local_workdir_before_starting_anything(tmp_path):
  r = subprocess.run(
    ["bash", str(SBATCH), "--workdir=/tmp/flaxtrain-runs/x"],
    env=_sbatch_env(tmp_path, 1234),
    capture_output=True,
    text=True,
  )
  assert r.returncode == 2 and "is node-local" in r.stderr, r.stderr
  assert not (tmp_path / "slurm").exists()  # srun never ran.
