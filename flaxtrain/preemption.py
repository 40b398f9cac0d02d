"""Stop signals: SIGTERM or a first Ctrl-C finish the step, save, and exit cleanly."""

import signal
import threading

import numpy as np
from absl import logging
from jax.experimental import multihost_utils


def _note_signal(name: str):
  logging.warning(
    "Received %s: finishing the current steps, then saving a checkpoint "
    "(press Ctrl-C again to abort without saving).",
    name,
  )


class Stopper:
  """Records SIGTERM/SIGINT; `should_stop` is agreed by all processes at the same step."""

  def __init__(self, par, check_every: int = 1):
    self._par = par
    self._check_every = check_every
    self._requested = threading.Event()
    self._installed = False
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
      self._installed = True

  def _handle(self, signum, frame):
    if self._requested.is_set() and signum == signal.SIGINT:
      raise KeyboardInterrupt  # A second Ctrl-C aborts at once.
    self._requested.set()
    # Logged by another thread: the signal may have come while this (the main) thread was
    # writing a log record, and a second write from the handler into the same file would be
    # a reentrant call (a RuntimeError and a traceback in the log); the thread waits for it.
    name = signal.Signals(signum).name
    threading.Thread(target=_note_signal, args=(name,), name="stop-signal-note").start()

  def should_stop(self, step: int) -> bool:
    local = self._requested.is_set()
    if self._par.num_processes == 1:
      return local
    if step % self._check_every:
      return False  # Agreeing costs a collective: only at log steps.
    # Every process must stop after the same step, or their collectives would deadlock.
    flags = multihost_utils.process_allgather(np.array(local, np.int32))
    return bool(np.any(flags))

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.restore()

  def restore(self):
    """Puts back the previous signal handlers (training is over)."""
    if self._installed:
      for s, handler in self._previous.items():
        signal.signal(s, handler)
      self._installed = False
