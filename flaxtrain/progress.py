"""A live one-line progress bar for interactive terminals; a no-op everywhere else.

Logs, TensorBoard and `summary.json` stay the record of a run: the bar is only drawn on
process 0 when stderr is a terminal, so batch jobs, pipes and other processes get the
plain absl log lines and nothing more.
"""

import logging as logging_std
import shutil
import sys
import time

from absl import logging

_CLEAR = "\r\x1b[K"  # Back to the line start, then erase to its end.


class Progress:
  """`update(step, metrics)` after every train chunk redraws `step/total epoch loss ... ETA`."""

  def __init__(
    self,
    *,
    total_steps: int | None = None,
    steps_per_epoch: int | None = None,
    batch_size: int | None = None,
    process_index: int = 0,
    stream=None,
    min_interval_s: float = 0.1,
    clock=time.monotonic,
    log_handler=None,
  ):
    self.stream = stream or sys.stderr
    self.enabled = process_index == 0 and _interactive(self.stream)
    self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
    self.batch_size = batch_size
    self._min_interval_s, self._clock = min_interval_s, clock
    self._metrics = {}
    self._rate = None  # Steps per second; None until two updates with metrics were seen.
    self._synced = None  # (time, step) of the last update with metrics.
    self._drawn_at = None
    self._line = ""
    self._last_drawn = ""
    self._log_filter = _ClearLineBeforeLogs(self)
    # The handler that prints log lines on this terminal (default: absl's).
    self._log_handler = log_handler or logging.get_absl_handler()
    if self.enabled:
      self._log_handler.addFilter(self._log_filter)

  def start(self, *, total_steps: int, steps_per_epoch: int, batch_size: int):
    """What the bar needs for epochs, examples/s and the ETA, once the plan is known."""
    self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
    self.batch_size = batch_size

  def update(self, step: int, metrics: dict | None = None):
    if not self.enabled:
      return
    now = self._clock()
    if metrics:
      self._metrics = {k: float(v) for k, v in metrics.items()}
      # Steps are dispatched ahead of the device; the host waits for it only where metrics
      # are fetched. So the rate is measured between two such updates (never the first one,
      # which includes compilation), over all that happened between them.
      if self._synced is not None and step > self._synced[1] and now > self._synced[0]:
        self._rate = (step - self._synced[1]) / (now - self._synced[0])
      self._synced = (now, step)
    final = self.total_steps is not None and step >= self.total_steps
    if metrics or final or self._drawn_at is None or now - self._drawn_at >= self._min_interval_s:
      self._draw(self.line(step))
      self._drawn_at = now

  def line(self, step: int) -> str:
    parts = [f"step {step:,}" + (f"/{self.total_steps:,}" if self.total_steps else "")]
    if self.total_steps:
      parts[0] = f"{_bar(step / self.total_steps)} {parts[0]}"
    if self.steps_per_epoch:
      parts.append(f"epoch {step / self.steps_per_epoch:.2f}")
    for key, label, fmt in (("train_loss", "loss", "{:.4f}"), ("train_accuracy", "acc", "{:.4f}")):
      if key in self._metrics:
        parts.append(f"{label} {fmt.format(self._metrics[key])}")
    if self._rate and self.batch_size:
      parts.append(f"{self._rate * self.batch_size:,.0f} ex/s")
    if self._rate and self.total_steps and step < self.total_steps:
      parts.append(f"ETA {_duration((self.total_steps - step) / self._rate)}")
    return "  ".join(parts)

  def close(self):
    """Leaves the last line in place and stops touching the terminal."""
    if not self.enabled:
      return
    if not self._line and self._last_drawn:  # Erased by a log line after the last update.
      self._draw(self._last_drawn)
    if self._line:
      self.stream.write("\n")
      self.stream.flush()
    self._log_handler.removeFilter(self._log_filter)
    self.enabled = False

  def clear(self):
    """Erases the bar (before a log line); the next update draws it again."""
    if self._line:
      self.stream.write(_CLEAR)
      self.stream.flush()
      self._line = ""
      self._drawn_at = None

  def _draw(self, line: str):
    width = shutil.get_terminal_size((100, 20)).columns - 1
    self._line = self._last_drawn = line[:width]
    self.stream.write(_CLEAR + self._line)
    self.stream.flush()


class _ClearLineBeforeLogs(logging_std.Filter):
  """Erases the bar before absl writes a record, so log lines never start mid-bar."""

  def __init__(self, progress: Progress):
    super().__init__()
    self.progress = progress

  def filter(self, record):
    self.progress.clear()
    return True


def _interactive(stream) -> bool:
  isatty = getattr(stream, "isatty", None)
  return bool(isatty and isatty())


def _bar(fraction: float, width: int = 20) -> str:
  filled = int(round(max(0.0, min(1.0, fraction)) * width))
  return "[" + "#" * filled + "." * (width - filled) + "]"


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
