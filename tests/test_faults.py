"""Faults lose nothing: kills, preemption, corrupt checkpoints, wrong configs, a full disk.

The subprocess tests run the real CLI on a slice of the real Fashion-MNIST with a tiny
model and compare every interrupted run with one uninterrupted run of the same command:
on CPU with the same device count the results must be bitwise equal.
"""

import errno
import json
import os
import pathlib
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, patch_synthetic, tiny_config

from flaxtrain import checkpointing, loop
from flaxtrain.data import prepare
from flaxtrain.errors import UserError

# Reading a damaged checkpoint leaves Orbax coroutines that complain when collected.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

# The same command for every subprocess run: 120 steps (2.6 epochs of a 10% slice),
# checkpoints every 25 steps, evals at 40, 80 and 120, a log line every 5 steps.
STEPS = 120
COMMAND = [
  "--config.model.features=(8,16)",
  "--config.model.dense=(32,)",
  f"--config.num_train_steps={STEPS}",
  "--config.checkpoint_every_steps=25",
  "--config.eval_every_steps=40",
  "--config.log_every_steps=5",
  "--config.dataset.train_split=train[:10%]",
  "--config.dataset.eval_split=test[:1000]",
]
DEVICES = 4
TRAINING = r"\[\d+\] train_.*train_loss="  # The first train metrics: training runs.
TIMEOUT = 300


# ---------------------------------------------------------------- helpers


class Cli:
  """`python -m flaxtrain.main COMMAND --workdir=W`, with its output read as it comes."""

  def __init__(self, workdir, *extra):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}"}
    self.workdir = pathlib.Path(workdir)
    self.proc = subprocess.Popen(
      [sys.executable, "-m", "flaxtrain.main", *COMMAND, *extra, f"--workdir={workdir}"],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    self.stdout, self.stderr = [], []
    self._lines = queue.Queue()
    self._readers = [
      threading.Thread(target=self._read, args=(s, out), daemon=True)
      for s, out in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr))
    ]
    for r in self._readers:
      r.start()

  def _read(self, stream, out):
    for line in stream:
      out.append(line)
      self._lines.put(line)
    self._lines.put(None)

  def wait_for(self, pattern, timeout=TIMEOUT) -> re.Match:
    """Blocks until a line of output matches `pattern`."""
    deadline, ended = time.time() + timeout, 0
    while time.time() < deadline:
      try:
        line = self._lines.get(timeout=1)
      except queue.Empty:
        continue
      if line is None:
        ended += 1
        if ended == 2:
          break
        continue
      if m := re.search(pattern, line):
        return m
    raise AssertionError(f"no line matching {pattern!r}; the run said:\n{self.log[-4000:]}")

  def signal(self, signum):
    self.proc.send_signal(signum)

  def finish(self, timeout=TIMEOUT) -> int:
    rc = self.proc.wait(timeout=timeout)
    for r in self._readers:
      r.join(timeout=10)
    return rc

  @property
  def log(self) -> str:
    return "".join(self.stderr) + "".join(self.stdout)


def run_cli(workdir, *extra) -> Cli:
  cli = Cli(workdir, *extra)
  rc = cli.finish()
  assert rc == 0, cli.log[-4000:]
  return cli


def summary(workdir) -> dict:
  return json.loads((pathlib.Path(workdir) / "summary.json").read_text())


def assert_same_result(workdir, reference):
  got, want = summary(workdir), summary(reference)
  assert got["step"] == want["step"] == STEPS
  assert got["eval_loss"] == want["eval_loss"]
  assert got["eval_accuracy"] == want["eval_accuracy"]


def checkpoint_dir(workdir) -> pathlib.Path:
  return pathlib.Path(workdir) / "checkpoints"


def latest_step(workdir):
  return checkpointing.Checkpointer(str(checkpoint_dir(workdir))).latest_step()


def temporary_dirs(workdir) -> list[str]:
  d = checkpoint_dir(workdir)
  return [p.name for p in d.iterdir() if checkpointing.TMP_MARKER in p.name] if d.exists() else []


def metadata_target(step_dir: pathlib.Path):
  """Zeros shaped like the arrays saved in `step_dir`: a restore target without a model."""
  import orbax.checkpoint as ocp

  meta = ocp.PyTreeCheckpointHandler().metadata(step_dir / checkpointing.ITEM_NAME)
  return jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), meta.tree)


@pytest.fixture(scope="module")
def data_dir():
  if not os.path.isdir(prepare.SYSTEM_COPIES["fashion_mnist"]) and not os.environ.get(
    "TFDS_DATA_DIR"
  ):
    pytest.skip("needs Debian's dataset-fashion-mnist (CI installs it) or a TFDS_DATA_DIR")


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  """One uninterrupted run of COMMAND, shared by every subprocess test."""
  workdir = tmp_path_factory.mktemp("reference")
  run_cli(workdir)
  assert summary(workdir)["step"] == STEPS
  return workdir


# ------------------------------------------------------- preemption and kills


@pytest.mark.slow
def test_sigterm_saves_where_it_stopped_and_the_same_command_resumes(reference, tmp_path):
  cli = Cli(tmp_path)
  cli.wait_for(TRAINING)
  cli.signal(signal.SIGTERM)
  assert cli.finish() == 0, cli.log[-4000:]
  m = re.search(
    r"Stopped at step (\d+) after a stop signal.*run the same command to resume", cli.log
  )
  assert m, cli.log[-4000:]
  stopped = int(m.group(1))
  assert 0 < stopped < STEPS
  # The checkpoint is the stop step itself, not the last one on the 25-step cadence.
  assert latest_step(tmp_path) == stopped
  assert not (tmp_path / "summary.json").exists()

  again = run_cli(tmp_path)
  assert f"Resumed from the checkpoint at step {stopped}" in again.log
  assert_same_result(tmp_path, reference)


@pytest.mark.slow
def test_sigkill_before_the_first_checkpoint_then_rerun(reference, tmp_path):
  cli = Cli(tmp_path)
  cli.wait_for(TRAINING)  # Training runs; the first checkpoint is at step 25.
  cli.signal(signal.SIGKILL)
  assert cli.finish() == -signal.SIGKILL
  assert latest_step(tmp_path) is None
  assert (tmp_path / "config.json").exists()

  run_cli(tmp_path)
  assert_same_result(tmp_path, reference)


@pytest.mark.slow
def test_sigkill_mid_save_and_late_then_rerun_loses_nothing(reference, tmp_path):
  # Right after a save started: as soon as Orbax's temporary directory of the save at
  # step 50 or later appears (the one at 25 is complete by then).
  cli = Cli(tmp_path)
  seen = None
  while seen is None and cli.proc.poll() is None:
    if checkpoint_dir(tmp_path).exists():
      seen = next((n for n in temporary_dirs(tmp_path) if int(n.split(".")[0]) >= 50), None)
    time.sleep(0.002)
  cli.signal(signal.SIGKILL)
  assert cli.finish() == -signal.SIGKILL, cli.log[-4000:]
  assert seen is not None, "the run ended before its save at step 50 was seen"
  killed_at = int(seen.split(".")[0])
  # That save is either lost whole (still a temporary directory) or complete: never half.
  assert latest_step(tmp_path) in (killed_at - 25, killed_at)

  # Late: after the eval at step 80, once the async save at step 75 has completed.
  cli = Cli(tmp_path)
  cli.wait_for(r"Step 80: eval loss")
  while not (checkpoint_dir(tmp_path) / "75").exists() and cli.proc.poll() is None:
    time.sleep(0.002)
  cli.signal(signal.SIGKILL)
  assert cli.finish() == -signal.SIGKILL
  assert latest_step(tmp_path) >= 75

  # The same command finishes the run, exactly as if nothing had happened.
  run_cli(tmp_path)
  assert_same_result(tmp_path, reference)
  assert temporary_dirs(tmp_path) == []


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  (workdir / "summary.json").unlink()
  steps = sorted(int(p.name) for p in checkpoint_dir(workdir).iterdir() if p.name.isdigit())
  assert steps[-2:] == [100, STEPS]
  # Truncate the newest checkpoint's array data, as a partial copy would.
  for f in (checkpoint_dir(workdir) / str(STEPS) / "default").rglob("d/*"):
    with open(f, "r+b") as fh:
      fh.truncate(f.stat().st_size // 2)

  cli = run_cli(workdir)
  assert re.search(
    rf"The checkpoint at step {STEPS} in \S+ cannot be read \(.+\); trying the "
    "previous one",
    cli.log,
  ), cli.log[-4000:]
  assert f"Restored the checkpoint at step 100 instead of step {STEPS}" in cli.log
  assert_same_result(workdir, reference)
  aside = [p.name for p in checkpoint_dir(workdir).iterdir() if ".unreadable-" in p.name]
  assert len(aside) == 1 and aside[0].startswith(f"{STEPS}.")


@pytest.mark.slow
def test_disk_full_on_a_real_small_filesystem(data_dir, tmp_path):
  if os.geteuid() != 0 or not shutil.which("mount"):
    pytest.skip("needs root to mount a small tmpfs")
  mnt = tmp_path / "small"
  mnt.mkdir()
  # Room for the run's files and two checkpoints of the tiny model (~390 KiB each).
  r = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", "size=1000k", "tmpfs", str(mnt)], capture_output=True, text=True
  )
  if r.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
  try:
    cli = Cli(mnt / "run")
    rc = cli.finish()
    assert rc == 1, cli.log[-4000:]
    errors = [line for line in cli.stderr if line.startswith("flaxtrain: error:")]
    assert len(errors) == 1, cli.log[-4000:]
    assert cli.stderr[-1] == errors[0]  # The run ends with that sentence, no traceback.
    assert "UserError" not in cli.log
    m = re.fullmatch(
      r"flaxtrain: error: No space left on device while saving the checkpoint "
      r"at step (\d+) in (\S+); the last complete checkpoint \(step (\d+)\) is "
      r"kept: free space or use another --workdir\.\n",
      errors[0],
    )
    assert m, errors[0]
    failed, kept = int(m.group(1)), int(m.group(3))
    assert m.group(2) == str(mnt / "run" / "checkpoints")
    assert kept == failed - 25
    assert not (mnt / "run" / "summary.json").exists()
    assert temporary_dirs(mnt / "run") == []  # The failed save's files are removed.
    ckpt = checkpointing.Checkpointer(str(mnt / "run" / "checkpoints"))
    assert ckpt.latest_step() == kept
    state, step = ckpt.restore_latest(metadata_target(checkpoint_dir(mnt / "run") / str(kept)))
    assert step == kept and int(state["step"]) == kept
  finally:
    subprocess.run(["umount", str(mnt)], check=False)


# --------------------------------------------------- in-process: disk full


def test_disk_full_in_a_background_save_ends_in_one_sentence(synthetic_data, tmp_path, monkeypatch):
  from orbax.checkpoint._src.checkpointers import async_checkpointer as orbax_async

  commit = orbax_async._on_commit_callback

  def full_disk(tmpdir, *args, **kwargs):  # Runs in Orbax's background thread.
    if int(tmpdir.get_final().name) >= 16:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmpdir.get()))
    return commit(tmpdir, *args, **kwargs)

  monkeypatch.setattr(orbax_async, "_on_commit_callback", full_disk)
  c = tiny_config(num_train_steps=24, checkpoint_every_steps=8)
  directory = tmp_path / "checkpoints"
  with pytest.raises(UserError) as e:
    loop.train_and_evaluate(c, str(tmp_path))
  assert str(e.value) == (
    f"No space left on device while saving the checkpoint at step 16 in {directory}; the "
    "last complete checkpoint (step 8) is kept: free space or use another --workdir."
  )
  assert not (tmp_path / "summary.json").exists()
  assert sorted(p.name for p in directory.iterdir()) == ["8"]

  # With space again, the same config resumes from step 8 and finishes.
  monkeypatch.setattr(orbax_async, "_on_commit_callback", commit)
  done = loop.train_and_evaluate(c, str(tmp_path))
  assert done["step"] == 24


def test_save_errors_other_than_storage_are_not_hidden():
  assert checkpointing.storage_error(ValueError("a bug")) is None
  assert checkpointing.storage_error(KeyError("params")) is None
  nested = ValueError("wrapper")
  nested.__context__ = ValueError(
    "RESOURCE_EXHAUSTED: Failed to write 5709 bytes to file 4: "
    "No space left on device [os_error_code='28']"
  )
  assert checkpointing.storage_error(nested) == "No space left on device"
  assert checkpointing.storage_error(OSError(errno.EDQUOT, "quota")) == "Disk quota exceeded"
  assert checkpointing.storage_error(OSError(errno.EACCES, "no")) == "Permission denied"


# ------------------------------------------- in-process: corrupt checkpoints


def _small_state(step):
  return {
    "step": jnp.int32(step),
    "params": {"w": jnp.arange(1000.0) + step, "b": jnp.ones(7) * step},
  }


def _two_checkpoints(directory):
  c = checkpointing.Checkpointer(str(directory))
  for s in (10, 20):
    c.save(s, _small_state(s))
  c.close()


def _truncate(pattern):
  def damage(step_dir):
    files = [f for f in step_dir.glob(pattern) if f.is_file()]
    assert files, pattern
    for f in files:
      with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)

  return damage


def _delete(pattern):
  def damage(step_dir):
    paths = list(step_dir.glob(pattern))
    assert paths, pattern
    for p in paths:
      shutil.rmtree(p) if p.is_dir() else p.unlink()

  return damage


def _flip_a_bit(step_dir):
  # Orbax reads a flipped bit back without complaint; the recorded checksums catch it.
  for f in step_dir.glob("default/ocdbt.process_0/d/*"):
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x01
    f.write_bytes(bytes(data))


DAMAGE = {
  "truncated data": _truncate("default/ocdbt.process_0/d/*"),
  "deleted data": _delete("default/ocdbt.process_0/d/*"),
  "truncated manifest": _truncate("default/manifest.ocdbt"),
  "truncated array metadata": _truncate("default/_METADATA"),
  "deleted step metadata": _delete("_CHECKPOINT_METADATA"),
  "empty step directory": _delete("*"),
  "flipped bit": _flip_a_bit,
}


@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_unreadable_latest_warns_and_restores_the_previous(tmp_path, damage, caplog):
  _two_checkpoints(tmp_path)
  DAMAGE[damage](tmp_path / "20")
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  assert ckpt.latest_step() == 20
  with caplog.at_level("WARNING"):
    state, step = ckpt.restore_latest(_small_state(0))
  assert step == 10
  np.testing.assert_array_equal(state["params"]["w"], np.arange(1000.0) + 10)
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert any(
    re.search(
      r"checkpoint at step 20 in .* cannot be read \(.+\); trying the "
      "previous one",
      w,
    )
    for w in warnings
  ), warnings
  # Moved aside, so that the run can save step 20 again.
  assert ckpt.latest_step() == 10
  assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == ["10", "20.unreadable"]
  ckpt.save(20, _small_state(20))
  ckpt.wait()
  assert ckpt.restore_latest(_small_state(0))[1] == 20


def test_restore_of_a_step_falls_back_too(tmp_path):
  # loop.py calls restore(latest_step(), state): the state's own step says what it got.
  _two_checkpoints(tmp_path)
  _truncate("default/ocdbt.process_0/d/*")(tmp_path / "20")
  state = checkpointing.Checkpointer(str(tmp_path)).restore(20, _small_state(0))
  assert int(state["step"]) == 10


def test_no_readable_checkpoint_is_a_user_error(tmp_path):
  _two_checkpoints(tmp_path)
  for step in ("10", "20"):
    _truncate("default/ocdbt.process_0/d/*")(tmp_path / step)
  with pytest.raises(
    UserError,
    match=r"None of the checkpoints in .* can be read \(steps 20, "
    r"10; step 20: .*\): use a new --workdir",
  ):
    checkpointing.Checkpointer(str(tmp_path)).restore_latest(_small_state(0))
  assert checkpointing.Checkpointer(str(tmp_path / "empty")).restore_latest(_small_state(0)) == (
    None,
    None,
  )


def test_leftover_temporary_directories_are_ignored_and_removed(tmp_path):
  _two_checkpoints(tmp_path)
  # What a kill in the middle of the save at step 30 leaves behind.
  shutil.copytree(tmp_path / "20", tmp_path / "30.orbax-checkpoint-tmp-1234")
  (tmp_path / "30.orbax-checkpoint-tmp-1234" / "commit_success.txt").unlink(missing_ok=True)
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  assert ckpt.latest_step() == 20
  assert ckpt.restore_latest(_small_state(0))[1] == 20
  ckpt.save(30, _small_state(30))
  ckpt.wait()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["10", "20", "30"]


# ------------------------------------------------ in-process: wrong structure


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """8 steps of the tiny CNN with AdamW on synthetic data."""
  workdir = tmp_path_factory.mktemp("trained")
  with pytest.MonkeyPatch.context() as mp:
    patch_synthetic(mp)
    loop.train_and_evaluate(tiny_config(num_train_steps=8), str(workdir))
  return workdir


def _rerun_in(trained, tmp_path, **overrides):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  loop.train_and_evaluate(tiny_config(num_train_steps=16, **overrides), str(workdir))


def test_other_model_width_names_the_entry_and_both_shapes(trained, synthetic_data, tmp_path):
  with pytest.raises(UserError) as e:
    _rerun_in(trained, tmp_path, **{"model.dense": (64,)})
  message = str(e.value)
  assert "(the model differs)" in message
  assert "entry params/Dense_0/bias is (32,) in the checkpoint but (64,) in the config" in message
  assert "params/Dense_0/kernel: (784, 32) vs (784, 64)" in message
  assert message.endswith("use a new --workdir or the config that wrote it.")


# Only in make test; on the newest stack test_other_model_width_names_the_entry_... covers it.
@pytest.mark.slow
def test_other_optimizer_is_caught(trained, synthetic_data, tmp_path):
  with pytest.raises(UserError) as e:
    _rerun_in(trained, tmp_path, **{"optimizer.name": "sgd"})
  message = str(e.value)
  assert "(the optimizer differs)" in message
  assert re.search(
    r"entry opt_state/\S+ is (\(.*\)|missing) in the checkpoint but "
    r"(\(.*\)|missing) in the config",
    message,
  ), message
  assert "use a new --workdir" in message


# ------------------------------------------------------------- init_from


def _replicated(tree):
  from flaxtrain import parallel

  par = parallel.DataParallel()
  return jax.device_put(tree, par.sharding(parallel.REPLICATED))


def test_load_params_from_a_workdir_or_a_step(trained):
  saved = metadata_target(trained / "checkpoints" / "8")
  want = checkpointing.Checkpointer(str(trained / "checkpoints")).restore_latest(saved)[0]
  target = _replicated(saved["params"])  # Zeros, on all 4 devices.
  for path in (trained, trained / "checkpoints", trained / "checkpoints" / "8"):
    params = checkpointing.load_params(str(path), target)
    jax.tree.map(np.testing.assert_array_equal, params, want["params"])
    for got, like in zip(jax.tree.leaves(params), jax.tree.leaves(target), strict=True):
      assert got.sharding == like.sharding
  wider = dict(target, Dense_0={"bias": jnp.zeros(64), "kernel": jnp.zeros((784, 64))})
  with pytest.raises(
    UserError,
    match=r"\(the model differs\): entry params/Dense_0/bias is "
    r"\(32,\) in the checkpoint but \(64,\) in the config.*pass a checkpoint "
    "of the same model in init_from",
  ):
    checkpointing.load_params(str(trained), wider)
  with pytest.raises(UserError, match="does not exist"):
    checkpointing.load_params(str(trained / "nope"), target)


def test_load_params_falls_back_but_not_for_a_named_step(tmp_path):
  _two_checkpoints(tmp_path)
  _truncate("default/ocdbt.process_0/d/*")(tmp_path / "20")
  target = _small_state(0)["params"]
  params = checkpointing.load_params(str(tmp_path), target)
  np.testing.assert_array_equal(params["w"], np.arange(1000.0) + 10)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["10", "20"]  # Nothing written.
  with pytest.raises(
    UserError,
    match=r"The checkpoint at step 20 in .* cannot be read "
    r"\(.+\): pass another checkpoint in init_from",
  ):
    checkpointing.load_params(str(tmp_path / "20"), target)


# ------------------------------------------------------- the best checkpoint


def test_best_checkpoint_is_kept_after_a_restart(tmp_path):
  c = checkpointing.Checkpointer(str(tmp_path), keep=1)
  c.save(1, _small_state(1), {"eval_accuracy": 0.9})
  c.save(2, _small_state(2), {"eval_accuracy": 0.5})
  c.close()
  c = checkpointing.Checkpointer(str(tmp_path), keep=1)  # A new run in the same workdir.
  c.save(3, _small_state(3))
  c.save(4, _small_state(4))
  c.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "4"]


def test_damaged_metrics_file_does_not_stop_a_run(tmp_path, caplog):
  _two_checkpoints(tmp_path)
  (tmp_path / "20" / "metrics" / "metrics").write_text('{"eval_acc')
  with caplog.at_level("WARNING"):
    ckpt = checkpointing.Checkpointer(str(tmp_path))
  assert "Ignoring the unreadable metrics of the checkpoint at step 20" in caplog.text
  assert ckpt.restore_latest(_small_state(0))[1] == 20
