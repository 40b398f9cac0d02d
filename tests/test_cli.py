"""The command line as a user meets it: one-sentence errors, nothing written on bad input."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT


def flaxtrain(*args, env=None, cwd=ROOT, timeout=300):
  full_env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", **(env or {})}
  return subprocess.run(
    [sys.executable, "-m", "flaxtrain.main", *args],
    cwd=cwd,
    env=full_env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


BAD_INPUT = [
  (["--config.optimizer.nmae=x"], "did you mean --config.optimizer.name?"),
  (["--config.model.name=nope"], "Unknown model 'nope'"),
  (["--config.optimizer.name=adamx"], "Unknown optimizer 'adamx'"),
  (["--config.schedule.name=linear"], "Unknown schedule 'linear'"),
  (["--config.dataset.name=fashon_mnist"], "fashion_mnist"),
  (["--config.batch_size=abc"], "--config.batch_size=abc"),
  (["--config.batch_size=0"], "batch_size must be a positive int"),
  (["--config.batch_size=-8"], "batch_size must be a positive int"),
  (["--config.batch_size=66"], "does not divide by the 4 devices"),
  (["--config.num_epochs=0"], "num_epochs must be a positive int"),
  (["--config.optimizer.learning_rate=-0.1"], "learning_rate must be > 0"),
  (["--config=configs/nope.py"], "does not exist"),
  (["--config.nonfinite=ignore"], "nonfinite must be 'error' or 'skip'"),
  (["--config.compute_dtype=float8"], "compute_dtype must be one of"),
  (["--bogus=1"], "Unknown command line flag 'bogus'"),
  (["--config.dataset.manual_dir=/nonexistent/dir"], "/nonexistent/dir"),
  (["--config.dataset.manual_dir=/etc"], "lacks t10k-images-idx3-ubyte.gz"),
  (["--config.dataset.eval_split=validation"], "has no split 'validation'"),
  (["--config.num_epochs=1.5"], "--config.num_epochs=1.5"),
  (["--config.eval_batch_size=0"], "eval_batch_size must be a positive int"),
  (["--config.log_every_steps=0"], "log_every_steps must be a positive int"),
  (["--config.optimizer.weight_decay_mask=some"], "weight_decay_mask must be"),
  (["--config.optimizer.grad_clip_norm=-1"], "grad_clip_norm must be > 0"),
  (["--config.dataset.on_device=maybe"], "dataset.on_device must be"),
  (["--workdir=/proc/flaxtrain_cannot_write_here"], "Cannot write to --workdir"),
  (["--num_processes=2"], "need all of --coordinator_address"),
  (
    ["--config.dataset.name=mnist", "--config.dataset.data_dir={tmp}/empty"],
    "--config.dataset.manual_dir",
  ),
]


# The cases that reach the stack (TFDS names, splits and files, the device count,
# jax.distributed's flags) also run on the newest stack (make test-newest); the other checks
# are our own code (the model and optimizer registries too), the same on any stack: there
# they are left to make test.
ON_EVERY_STACK = (
  "--config.dataset.name=fashon_mnist",
  "--config.batch_size=66",
  "--config.dataset.manual_dir=/etc",
  "--config.dataset.eval_split=validation",
  "--num_processes=2",
)


@pytest.mark.parametrize(
  "args,needle",
  [
    pytest.param(a, n, marks=() if a[0] in ON_EVERY_STACK else pytest.mark.slow)
    for a, n in BAD_INPUT
  ],
  ids=[" ".join(a) for a, _ in BAD_INPUT],
)
def test_bad_input_is_one_sentence_and_writes_nothing(tmp_path, real_data_dir, args, needle):
  workdir = tmp_path / "run"
  args = [a.replace("{tmp}", str(tmp_path)) for a in args]
  if not any(a.startswith("--workdir") for a in args):
    args.append(f"--workdir={workdir}")
  # num_train_steps keeps a missed case short: it would train two steps and fail below.
  r = flaxtrain(*args, "--config.num_train_steps=2", env={"TFDS_DATA_DIR": real_data_dir})
  assert r.returncode != 0
  errors = [line for line in r.stderr.splitlines() if line.startswith("flaxtrain: error:")]
  assert len(errors) == 1, r.stderr[-3000:]
  assert needle in errors[0]
  assert "Traceback" not in r.stderr
  assert not workdir.exists()


@pytest.mark.slow  # Our own check, the same on every stack.
def test_workdir_that_is_a_file(tmp_path):
  path = tmp_path / "file"
  path.write_text("keep me")
  r = flaxtrain("--config.num_train_steps=1", f"--workdir={path}")
  assert r.returncode != 0 and "is a file, not a directory" in r.stderr
  assert path.read_text() == "keep me"
