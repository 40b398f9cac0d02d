"""What a run shows: quiet on a terminal, plain log lines when piped, everything in its log."""

import os
import pty
import re
import subprocess
import sys

import pytest
from conftest import ROOT, TINY_FLAGS


def _args(workdir, data_dir, steps):
  return [
    sys.executable,
    "-m",
    "flaxtrain",
    "--config=fashion_cnn",
    f"--workdir={workdir}",
    f"--config.dataset.data_dir={data_dir}",
    f"--config.num_train_steps={steps}",
    "--config.eval_every_steps=10",
    "--config.batch_size=64",
    *TINY_FLAGS,
  ]


def _env():
  return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "COLUMNS": "120"}


def _in_terminal(args) -> tuple[int, str]:
  """Runs `args` with stdout and stderr on a pseudo-terminal; returns (exit code, screen)."""
  leader, follower = pty.openpty()
  proc = subprocess.Popen(
    args, stdin=follower, stdout=follower, stderr=follower, env=_env(), cwd=ROOT
  )
  os.close(follower)
  out = b""
  while True:
    try:
      chunk = os.read(leader, 1 << 16)
    except OSError:  # EIO: the terminal's other side has closed.
      break
    if not chunk:
      break
    out += chunk
  os.close(leader)
  return proc.wait(timeout=300), out.decode(errors="replace")


def _screen_lines(text: str) -> list[str]:
  """The lines left on screen: each line's text after its last carriage return."""
  lines = []
  for raw in text.replace("\r\n", "\n").split("\n"):
    line = raw.split("\r")[-1].replace("\x1b[K", "")
    if line.strip():
      lines.append(line)
  return lines


def test_terminal_shows_the_bar_and_events_and_the_log_file_keeps_everything(
  tmp_path, real_data_dir
):
  workdir = tmp_path / "run"
  code, screen = _in_terminal(_args(workdir, real_data_dir, 20))
  assert code == 0, screen[-3000:]
  lines = _screen_lines(screen)
  assert re.fullmatch(
    r"Step 10: eval loss [\d.]+, accuracy [\d.]+.*\(10000 examples\); "
    r"checkpoint saved\.",
    lines[0],
  ), lines
  assert lines[1].startswith("Step 20: eval loss") and lines[2].startswith("[####")
  assert "step 20/20" in lines[2] and lines[3].startswith("flaxtrain: step 20:")
  assert f"log in {workdir}/flaxtrain.log" in lines[3]
  assert len(lines) == 4, lines  # Nothing else: no hparams, CLU notes, TF or XLA notes.
  for chatter in ("Hyperparameters", "oneDNN", "InitializeLog", "steps_per_sec", "libtpu"):
    assert chatter not in screen
  log = (workdir / "flaxtrain.log").read_text()
  # (TensorFlow's oneDNN note, where the CPU has AVX-512, goes there too: the test below.)
  for record in ("[Hyperparameters]", "steps_per_sec", "Step 20: eval loss", "Devices:"):
    assert record in log, record

  # Piped (a batch job): today's plain absl lines, still without TF's start-up notes; the
  # log file grows with the resumed run.
  piped = subprocess.run(
    _args(workdir, real_data_dir, 30),
    env=_env(),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert piped.returncode == 0, piped.stderr[-3000:]
  assert re.search(
    r"^I\d{4} .*loop\.py:\d+\] Resumed from the checkpoint at step 20\.$", piped.stderr, re.M
  ), piped.stderr[-3000:]
  assert "train_loss=" in piped.stderr and "oneDNN" not in piped.stderr
  log = (workdir / "flaxtrain.log").read_text()
  assert log.count("---- flaxtrain ") == 2 and "Step 30: eval loss" in log


def test_native_startup_notes_go_to_the_log_file_and_errors_keep_them(tmp_path, capfd):
  from absl import logging

  from flaxtrain import console

  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.INFO)  # As the command line sets it.
  handler = console.log_to_file(str(tmp_path), 0)
  try:
    with console.startup_notes_to_log():
      os.write(2, b"I0000 port.cc:153] oneDNN custom operations are on.\n")  # As C++ does.
      print("a Python line on stderr", file=sys.stderr)  # Python's own output still shows.
    with pytest.raises(RuntimeError), console.startup_notes_to_log():
      os.write(2, b"F0000 the native reason it failed\n")
      raise RuntimeError("backend failed")
  finally:
    console.close_log_file(handler)
    logging.set_verbosity(verbosity)
  err = capfd.readouterr().err
  assert "oneDNN" not in err and "a Python line on stderr" in err
  assert "the native reason it failed" in err  # A failure shows what was captured.
  assert "oneDNN custom operations" in (tmp_path / "flaxtrain.log").read_text()


def test_native_notes_in_a_script_without_app_run_end(tmp_path):
  """absl's logging puts a handler on fd 2 in a script without app.run (as `python -m
  flaxtrain.datasets` is): the reader's record of a note must not come back through the pipe
  (it did, without end, and `make data` hung with ~100 MB on stderr)."""
  script = (
    "import os, time\n"
    "from absl import logging\n"
    "from flaxtrain import console\n"
    "logging.set_verbosity(logging.INFO)\n"
    "logging.info('before')\n"  # absl's logging.basicConfig(): a root handler on stderr.
    "with console.startup_notes_to_log():\n"
    "  os.write(2, b'I0000 port.cc:153] oneDNN custom operations are on.\\n')\n"
    "  os.write(2, b'W0000 another note\\n')\n"
    "  time.sleep(1)\n"  # As TensorFlow's import takes a while: the reader runs meanwhile.
    "print('finished')\n"
  )
  r = subprocess.run(
    [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, cwd=tmp_path
  )
  assert r.returncode == 0 and r.stdout == "finished\n", r.stderr[-2000:]
  assert r.stderr.count("oneDNN custom operations") == 1, r.stderr[-2000:]
  assert len(r.stderr) < 2000
