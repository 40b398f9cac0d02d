"""The terminal progress bar: drawn in place on a TTY of process 0, silent everywhere else."""

import io
import logging as logging_std

import pytest
from absl import logging

from flaxtrain import progress


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch):
  """The bar is cut to the terminal's width: pinned, whatever runs the tests (pytest-xdist
  workers see 80 columns)."""
  monkeypatch.setenv("COLUMNS", "120")


class _Terminal(io.StringIO):
  def isatty(self):
    return True


class _Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def _bar(stream, clock, process_index=0):
  return progress.Progress(
    total_steps=100,
    steps_per_epoch=10,
    batch_size=32,
    stream=stream,
    process_index=process_index,
    min_interval_s=0.0,
    clock=clock,
  )


def _last_line(text: str) -> str:
  return text.split("\r\x1b[K")[-1]


def test_line_shows_step_epoch_metrics_speed_and_eta():
  stream, clock = _Terminal(), _Clock()
  bar = _bar(stream, clock)
  for step in range(1, 11):  # One step per second after the first (compiling) one.
    clock.now = 5.0 + step
    logged = step in (1, 5, 10)  # Where the host fetches metrics: the rate is measured there.
    bar.update(step, {"train_loss": 0.5, "train_accuracy": 0.8} if logged else None)
  line = _last_line(stream.getvalue())
  assert "\n" not in stream.getvalue()  # Redrawn in place.
  assert "[##..................] step 10/100" in line
  for part in ("epoch 1.00", "loss 0.5000", "acc 0.8000", "32 ex/s", "ETA 1:30"):
    assert part in line, line
  bar.close()
  assert stream.getvalue().endswith(line + "\n")
  bar.update(11)  # Closed: nothing more.
  assert stream.getvalue().endswith(line + "\n")


def test_the_rate_ignores_dispatch_bursts_between_log_steps():
  stream, clock = _Terminal(), _Clock()
  bar = _bar(stream, clock)
  bar.update(1, {"train_loss": 1.0})  # After compiling.
  for step in range(2, 10):  # Dispatched ahead of the device: 8 steps in 0.08 s ...
    clock.now += 0.01
    bar.update(step)
  assert "ex/s" not in _last_line(stream.getvalue())
  clock.now = 9.0  # ... then the host waits for the device to fetch the metrics.
  bar.update(10, {"train_loss": 0.9})
  assert "32 ex/s" in _last_line(stream.getvalue())  # 9 steps in 9 s at batch 32.
  bar.close()


def test_metrics_persist_between_log_steps_and_no_eta_at_the_end():
  stream, clock = _Terminal(), _Clock()
  bar = _bar(stream, clock)
  bar.update(50, {"train_loss": 0.25})
  clock.now = 1.0
  bar.update(100)
  line = _last_line(stream.getvalue())
  assert "step 100/100" in line and "loss 0.2500" in line and "ETA" not in line
  bar.close()


def test_silent_when_not_a_terminal_or_not_process_0():
  for stream, index in ((io.StringIO(), 0), (_Terminal(), 1)):
    bar = _bar(stream, _Clock(), process_index=index)
    bar.update(1, {"train_loss": 1.0})
    bar.close()
    assert stream.getvalue() == ""


def test_log_records_erase_the_bar_first():
  stream, clock = _Terminal(), _Clock()
  bar = _bar(stream, clock)
  bar.update(3)
  record = logging_std.LogRecord("absl", logging_std.INFO, __file__, 1, "hello", None, None)
  assert logging.get_absl_handler().filter(record)
  assert stream.getvalue().endswith("\r\x1b[K")
  bar.close()  # The bar a log line erased is drawn again, to stay above what follows.
  assert stream.getvalue().endswith("\r\x1b[K" + bar.line(3) + "\n")
  assert not any(isinstance(f, type(bar._log_filter)) for f in logging.get_absl_handler().filters)


def test_without_a_plan_the_bar_still_counts_steps():
  stream, clock = _Terminal(), _Clock()
  bar = progress.Progress(stream=stream, clock=clock, min_interval_s=0.0)
  bar.update(7)
  assert _last_line(stream.getvalue()) == "step 7"
  bar.start(total_steps=70, steps_per_epoch=7, batch_size=8)
  clock.now = 1.0
  bar.update(14)
  assert "step 14/70" in _last_line(stream.getvalue())
  bar.close()
