"""Real processes on 127.0.0.1 joined by jax.distributed, standing in for hosts."""

import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, TINY_FLAGS

pytestmark = pytest.mark.slow

_spec = importlib.util.spec_from_file_location(
  "topology_check", ROOT / "scripts" / "topology_check.py"
)
topology = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(topology)

STEPS = 30


def _flags(data_dir, *extra):
  return [*TINY_FLAGS, f"--config.dataset.data_dir={data_dir}", *extra]


def _summary(workdir):
  return json.loads((pathlib.Path(workdir) / "summary.json").read_text())


def _popen(cmd, env):
  """A process in its own group (a test can kill the whole group), output captured."""
  return subprocess.Popen(
    cmd,
    env=env,
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    start_new_session=True,
  )


def _start(workdir, port, data_dir, steps, *extra, processes=2, ids=None):
  cmd = topology._cmd(
    workdir, steps, _flags(data_dir, "--config.checkpoint_every_steps=10", *extra)
  )
  return [
    _popen(
      cmd
      + [
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={processes}",
        f"--process_id={i}",
      ],
      topology._env(2),
    )
    for i in (ids if ids is not None else range(processes))
  ]


# Topology-invariant reductions with Mixup/CutMix and RandAugment on: their draws follow the
# example, not the device, so 2 processes x 2 devices must train the 1-device run's bits.
MIXED = (
  "--config.topology_invariant_shards=4",
  "--config.augment.mixup_alpha=0.8",
  "--config.augment.cutmix_alpha=1.0",
  "--config.augment.mix_prob=0.8",
  "--config.task.label_smoothing=0.1",
  "--config.augment.randaugment_num_ops=2",
  "--config.augment.randaugment_magnitude=9",
)


@pytest.fixture(scope="module")
def two_by_two(real_data_dir, tmp_path_factory):
  """The same tiny run as 2 processes x 2 devices and as 1 process x 1 device."""
  root = tmp_path_factory.mktemp("mp")
  extra = _flags(real_data_dir, *MIXED)
  topology.run_multi(root / "multi", 2, 2, STEPS, extra, timeout=600)
  topology.run_single(root / "one", 1, STEPS, extra, timeout=600)
  return root


def test_two_processes_train_bitwise_the_one_device_run(two_by_two):
  """--config.topology_invariant_shards: 2 processes x 2 devices == 1 device, bit for bit,
  with Mixup/CutMix and RandAugment on; eval is exact across hosts."""
  a, b = topology.load_params(two_by_two / "multi"), topology.load_params(two_by_two / "one")
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  multi, one = _summary(two_by_two / "multi"), _summary(two_by_two / "one")
  assert (multi["processes"], multi["devices"], one["processes"], one["devices"]) == (2, 4, 1, 1)
  assert multi["eval_examples"] == one["eval_examples"] == 10_000
  assert abs(multi["eval_loss"] - one["eval_loss"]) <= 1e-6  # Eval sums in device order.


def test_killed_multiprocess_run_resumes_from_its_checkpoint(two_by_two, real_data_dir, tmp_path):
  workdir = tmp_path / "killed"
  procs = _start(workdir, topology._free_port(), real_data_dir, STEPS, *MIXED)
  ckpt = workdir / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and not any(
    p.name.isdigit() for p in (ckpt.iterdir() if ckpt.exists() else [])
  ):
    time.sleep(0.2)
  for p in procs:
    os.killpg(p.pid, signal.SIGKILL)
  for p in procs:
    p.wait()
  assert not (workdir / "summary.json").exists(), "killed too late to test resuming"
  procs = _start(workdir, topology._free_port(), real_data_dir, STEPS, *MIXED)
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:]
  assert "Resumed from the checkpoint at step" in outs[0]
  # Same batches and updates as the uninterrupted runs: bit for bit.
  assert _summary(workdir)["eval_loss"] == _summary(two_by_two / "multi")["eval_loss"]
  a, b = topology.load_params(workdir), topology.load_params(two_by_two / "one")
  assert all(np.array_equal(a[k], b[k]) for k in b)


def test_streamed_batches_are_the_same_on_two_processes_and_any_worker_count(tmp_path):
  """Streamed variable-size JPEGs with random-resized crops: 2 processes x 2 devices with 2
  Grain workers each train bitwise the same parameters as 1 device with no workers, so
  every global batch was the same (topology_invariant_shards removes reduction order)."""
  from conftest import make_image_dataset

  make_image_dataset(tmp_path / "tfds", "flaxtrain_mp_jpeg", 256, 64)
  extra = [
    *TINY_FLAGS,
    f"--config.dataset.data_dir={tmp_path / 'tfds'}",
    "--config.dataset.name=flaxtrain_mp_jpeg",
    "--config.dataset.image_size=24",
    "--config.augment.random_resized_crop=true",
    "--config.augment.flip=true",
    "--config.topology_invariant_shards=4",
    "--config.eval_batch_size=40",
  ]
  topology.run_multi(
    tmp_path / "multi", 2, 2, 6, [*extra, "--config.dataset.workers=2"], timeout=600
  )
  topology.run_single(tmp_path / "one", 1, 6, [*extra, "--config.dataset.workers=0"], timeout=600)
  a, b = topology.load_params(tmp_path / "multi"), topology.load_params(tmp_path / "one")
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  multi, one = _summary(tmp_path / "multi"), _summary(tmp_path / "one")
  assert (multi["processes"], multi["devices"], one["devices"]) == (2, 4, 1)
  assert multi["eval_examples"] == one["eval_examples"] == 64  # Exact across hosts.
  assert "streamed" in multi["data_source"]


def test_a_bad_record_on_one_process_stops_every_process_in_one_sentence(tmp_path):
  """Only the process that reads the record sees it; the others must not wait forever."""
  from conftest import make_image_dataset

  make_image_dataset(tmp_path / "tfds", "flaxtrain_mp_bad", 256, 32, corrupt={5})
  cmd = topology._cmd(
    tmp_path / "w",
    8,
    [
      *TINY_FLAGS,
      "--config.dataset.name=flaxtrain_mp_bad",
      f"--config.dataset.data_dir={tmp_path / 'tfds'}",
      "--config.dataset.image_size=24",
      "--config.log_every_steps=2",
      "--config.dataset.workers=1",
    ],
  )
  port = topology._free_port()
  procs = [
    subprocess.Popen(
      cmd + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      env=topology._env(2),
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs, strict=True):
    errors = [line for line in out.splitlines() if line.startswith("flaxtrain: error:")]
    assert p.returncode == 1 and len(errors) == 1, out[-3000:]
    assert "Input failed" in errors[0], errors
  assert any("could not be decoded" in out for out in outs)


def test_missing_process_is_a_clear_error_within_the_timeout(real_data_dir, tmp_path):
  port = topology._free_port()
  start = time.time()
  (proc,) = _start(
    tmp_path / "w", port, real_data_dir, STEPS, "--initialization_timeout=10", ids=[0]
  )
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode != 0
  assert time.time() - start < 90
  errors = [line for line in out.splitlines() if line.startswith("flaxtrain: error:")]
  assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0], out[-3000:]
  assert "within 10 s" in errors[0]


def test_workdir_not_shared_between_processes_is_refused(real_data_dir, tmp_path):
  port = topology._free_port()
  procs = [
    subprocess.Popen(
      topology._cmd(tmp_path / f"local_disk_{i}", STEPS, _flags(real_data_dir))
      + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      env=topology._env(2),
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs, strict=True):
    assert p.returncode != 0
    assert "is not one storage shared by all 2 processes" in out, out[-3000:]
  assert not any((tmp_path / f"local_disk_{i}" / "checkpoints").exists() for i in range(2))


def test_scripts_parse_and_explain_themselves():
  for script in ("local_multiprocess.sh", "tpu_vm.sh"):
    path = ROOT / "scripts" / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    r = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "Usage" in r.stdout + r.stderr
  subprocess.run(["bash", "-n", str(ROOT / "scripts" / "slurm_gpu.sbatch")], check=True)


def test_shellcheck_is_clean():
  import shutil

  if not shutil.which("shellcheck"):
    pytest.skip("shellcheck not installed (CI installs it)")
  scripts = [str(p) for p in (ROOT / "scripts").iterdir() if p.suffix in (".sh", ".sbatch")]
  r = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
  assert r.returncode == 0, r.stdout


def test_tpu_vm_dry_run_prints_the_gcloud_commands():
  r = subprocess.run(
    [
      "bash",
      str(ROOT / "scripts" / "tpu_vm.sh"),
      "up",
      "--name=ft",
      "--zone=us-central2-b",
      "--project=my-project",
      "--tpu-type=v4-32",
      "--workdir=gs://my-bucket/runs/x",
      "--data-dir=gs://my-bucket/tfds",
      "--dry-run",
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  assert r.returncode == 0, r.stderr
  assert "gcloud compute tpus tpu-vm create ft" in r.stdout
  assert "--worker=all" in r.stdout and "flaxtrain" in r.stdout
  bad = subprocess.run(
    [
      "bash",
      str(ROOT / "scripts" / "tpu_vm.sh"),
      "up",
      "--name=ft",
      "--zone=us-central2-b",
      "--project=my-project",
      "--tpu-type=v4-32",
      "--workdir=/local/dir",
      "--dry-run",
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  assert bad.returncode != 0 and "gs://" in bad.stderr


def _tpu_vm_dry_run(*args):
  return subprocess.run(
    [
      "bash",
      str(ROOT / "scripts" / "tpu_vm.sh"),
      "--name=ft",
      "--zone=us-central2-b",
      "--project=my-project",
      "--dry-run",
      *args,
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
  )


def test_tpu_vm_data_bucket_is_mounted_with_gcsfuse_and_becomes_tfds_data_dir():
  r = _tpu_vm_dry_run(
    "up",
    "--tpu-type=v4-32",
    "--workdir=gs://my-bucket/runs/x",
    "--data-bucket=gs://my-bucket/tfds",
    "--",
    "--config.num_epochs=1",
  )
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  mount = [ln for ln in lines if "gcsfuse" in ln]
  assert len(mount) == 1 and "--worker=all" in mount[0], r.stdout
  assert "gcsfuse-$(lsb_release -c -s)" in mount[0]
  assert "apt-get -o DPkg::Lock::Timeout=600 install -y -q gcsfuse" in mount[0]
  assert 'mountpoint -q "$M"' in mount[0] and "M=/mnt/flaxtrain-data" in mount[0]
  assert (
    "gcsfuse --implicit-dirs -o ro --metadata-cache-ttl-secs=-1" in mount[0]
    and '--only-dir=tfds my-bucket "$M"' in mount[0]
  )
  assert 'ls -R "$M"' in mount[0]
  start = [ln for ln in lines if "bin/flaxtrain" in ln]
  assert len(start) == 1 and "--worker=all" in start[0], r.stdout
  assert "TFDS_DATA_DIR=/mnt/flaxtrain-data PYTHONUNBUFFERED=1 nohup" in start[0]
  assert "--config.dataset.data_dir" not in start[0]
  # Mounted (install) before flaxtrain starts (run), which first checks the mount.
  assert lines.index(mount[0]) < lines.index(start[0])
  assert any("mountpoint -q /mnt/flaxtrain-data" in ln for ln in lines[lines.index(mount[0]) + 1 :])

  # A data dir among the flaxtrain flags wins: no TFDS_DATA_DIR.
  r = _tpu_vm_dry_run(
    "run",
    "--tpu-type=v4-32",
    "--workdir=gs://my-bucket/runs/x",
    "--data-mount=/data/tfds",
    "--",
    "--config.dataset.data_dir=/other",
  )
  assert r.returncode == 0, r.stderr
  assert "TFDS_DATA_DIR" not in r.stdout and "--config.dataset.data_dir=/other" in r.stdout


@pytest.mark.parametrize(
  "bad",
  [
    ["--data-bucket=my-bucket/tfds"],
    ["--data-bucket=gs://my-bucket/tfds", "--data-dir=gs://my-bucket/tfds"],
    ["--data-bucket=gs://my-bucket/tfds", "--data-mount=relative/dir"],
  ],
)
def test_tpu_vm_bad_data_bucket_fails_before_any_gcloud_command(bad):
  r = _tpu_vm_dry_run("up", "--tpu-type=v4-32", "--workdir=gs://my-bucket/runs/x", *bad)
  assert r.returncode != 0
  assert r.stdout == ""  # no command printed, so none would have run
  err = r.stderr.strip()
  assert err.startswith("tpu_vm.sh: error: --data-") and "\n" not in err, err
  assert "gs://" in err or "absolute path" in err, err


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))


def test_a_tracker_that_cannot_start_stops_every_process(real_data_dir, tmp_path):
  """Only process 0 starts the trackers; the others must not wait for it forever."""
  port = topology._free_port()
  cmd = topology._cmd(
    tmp_path / "w", STEPS, _flags(real_data_dir, "--config.loggers=tensorboard,mlflow")
  )
  env = {**topology._env(2), "MLFLOW_TRACKING_URI": "nosuchscheme://nowhere"}
  procs = [
    _popen(
      cmd + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      env,
    )
    for i in range(2)
  ]
  try:
    outs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
  errors = [[x for x in out.splitlines() if x.startswith("flaxtrain: error:")] for out in outs]
  assert [p.returncode for p in procs] == [1, 1], outs[1][-3000:]
  assert len(errors[0]) == 1 and "MLFLOW_TRACKING_URI" in errors[0][0], outs[0][-3000:]
  assert errors[1] == [
    "flaxtrain: error: Process 0 could not start the experiment trackers (--config.loggers); "
    "its log says why: fix that and run again."
  ], outs[1][-3000:]


_LATE_COMPILE = """
import sys, time
import jax, numpy as np
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from flaxtrain import parallel
par = parallel.DataParallel()
psum = lambda x: jax.lax.psum(x, parallel.AXIS)
program = par.compile(psum, in_specs=(parallel.BATCH,), out_specs=parallel.REPLICATED)
x = par.put(np.ones(4, np.float32), parallel.BATCH)
if par.process_index == 1:
  time.sleep(35)  # Compiling on a busy host: past XLA's fixed 30 s for a first collective.
print("sum", float(par.to_host(program(x))[0]), flush=True)
"""


def test_a_process_that_compiles_35_s_late_does_not_fail_the_first_collective():
  address = f"127.0.0.1:{topology._free_port()}"
  procs = [
    _popen([sys.executable, "-c", _LATE_COMPILE, address, str(i)], topology._env(2))
    for i in range(2)
  ]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
  assert all("sum 4.0" in out for out in outs), outs
