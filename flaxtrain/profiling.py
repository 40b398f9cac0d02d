"""The loop's profiler window: a `jax.profiler` trace of the steps `config.profile_steps` names."""

import contextlib
import os
import time

import jax
from absl import logging
from etils import epath

from flaxtrain import console


class Profile:
  """A `jax.profiler` trace of the plan's window (first, end): the chunks that run steps
  first+1..end, on the process `config.profile_process` names (-1: every process)."""

  def __init__(self, window, config, par, workdir: str):
    chosen = config.get("profile_process", 0) in (-1, par.process_index)
    self.window = window if chosen else None
    # TensorBoard finds <logdir>/plugins/profile/<run>/<host>.xplane.pb. Processes sharing
    # a host would write the same file name: with every process tracing, each but process 0
    # writes under its own subdirectory.
    self.logdir = workdir
    if config.get("profile_process", 0) == -1 and par.process_index > 0:
      self.logdir = os.path.join(workdir, f"process{par.process_index}")
    self.first = None  # The step the trace started after, while it runs.
    self.done = False

  def start_if_due(self, step: int) -> float:
    """Starts the trace at the window's start (or inside it, on a resume); returns the
    seconds that took."""
    if self.window is None or self.done or self.first is not None:
      return 0.0
    if not self.window[0] <= step < self.window[1]:
      return 0.0
    t = time.time()
    self.done = True  # One try: a trace that cannot start is not retried every chunk.
    try:
      jax.profiler.start_trace(self.logdir)
    except Exception as e:  # noqa: BLE001 - e.g. another trace runs: the run goes on.
      logging.warning("Could not start the profiler (%s): training goes on without it.", e)
      return time.time() - t
    self.first = step
    logging.info("Profiling the steps after step %d into %s.", step, self.logdir)
    return time.time() - t

  def annotate(self, step: int):
    """Around a chunk's dispatch: the trace viewer's steps (numbered from 0, like `step`)."""
    if self.first is None:
      return contextlib.nullcontext()
    return jax.profiler.StepTraceAnnotation("train", step_num=step)

  def stop_if_due(self, step: int, state, stop_signal: bool) -> float:
    """After a chunk: at the window's end (or a stop signal) waits for the traced steps to
    finish and writes the trace; returns the seconds that took."""
    if self.first is None or (step < self.window[1] and not stop_signal):
      return 0.0
    t = time.time()
    jax.block_until_ready(state)  # The device work of the last traced chunk, in the trace.
    self._stop(step)
    return time.time() - t

  def _stop(self, step: int | None):
    first, self.first = self.first, None
    try:
      jax.profiler.stop_trace()
    except Exception as e:  # noqa: BLE001 - A profile is never worth the run.
      logging.warning("Could not write the profile to %s (%s).", self.logdir, e)
      return
    files = sorted(epath.Path(self.logdir).glob("plugins/profile/*/*.xplane.pb"))
    where = files[-1] if files else self.logdir  # Run folders are named by the time.
    steps = f"steps {first + 1}-{step}" if step is not None else f"the steps after {first}"
    console.event("Wrote the profile of %s to %s (TensorBoard's Profile tab).", steps, where)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if self.first is not None:  # The run ended inside the window: keep what was traced.
      self._stop(None)
