"""The training loop: `train_and_evaluate(config, workdir)`.

Reads top to bottom: experiment (validated config, data, compiled steps) -> workdir ->
state -> restore -> loop (train chunks; log, eval, checkpoint exactly on their steps) ->
wait -> summary. The loop never asks which data source or model it has.
"""

import collections
import concurrent.futures
import contextlib
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import asynclib, parameter_overview, platform

from flaxtrain import (
  checkpointing,
  console,
  loggers,
  parallel,
  preemption,
  profiling,
  resources,
  workdirs,
)
from flaxtrain.errors import UserError
from flaxtrain.experiment import Experiment

# How many chunks the host may dispatch ahead of the device. XLA:CPU admits at most 32
# computations in flight per device, and a program whose launch on one device waits for a
# slot there, while a later program took it, leaves the other devices in its collective
# rendezvous forever (3 of 4 devices arrive; XLA aborts after 40 s): the host must not run
# that far ahead. A few chunks keep the device busy as well as more would. With more in
# flight, the host waits until half of them are done: one wait every few chunks, as each
# costs the host a thread wake-up (~17 us of CPU on 2 cores), which a tiny step feels.
MAX_CHUNKS_AHEAD = 4


class TrainingError(UserError):
  """Training itself failed (e.g. a NaN loss); the last good checkpoint is kept."""


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  par: parallel.DataParallel | None = None,
  progress=None,
) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the summary.

  `progress`, if given, gets `start(total_steps=, steps_per_epoch=, batch_size=)`,
  `update(step, metrics_or_None)` after every chunk and `close()` at the end (e.g. a
  terminal progress bar).
  """
  start_time = time.time()
  loggers.check(config)  # Unknown trackers, missing packages: before any data is loaded.
  exp = Experiment(config, par)
  par, plan = exp.par, exp.plan
  logging.info(
    "Devices: %s; global batch %d = %d per device; %d steps (%d per epoch, up to %d per "
    "dispatch); data %s.",
    par.describe(),
    config.batch_size,
    config.batch_size // par.num_devices,
    plan.total_steps,
    plan.steps_per_epoch,
    plan.steps_per_dispatch,
    exp.data.description,
  )
  if progress is not None:
    progress.start(
      total_steps=plan.total_steps,
      steps_per_epoch=plan.steps_per_epoch,
      batch_size=config.batch_size,
    )

  # Everything the user can get wrong has been checked: only now touch the workdir.
  workdirs.prepare(workdir, par)
  log_file = console.log_to_file(workdir, par.process_index)
  writer = None
  try:
    workdirs.write_spec(workdir, exp.spec, par)
    writer = _create_writer(config, workdir, par)
    return _train(exp, workdir, writer, progress, start_time)
  except BaseException as e:  # Why the run ended goes into its log file too.
    console.file_only("The run ended: %s", _ending(e), exc_info=not isinstance(e, UserError))
    raise
  finally:
    if writer is not None:
      writer.abort()  # Ends the tracker runs as failed, unless the run closed them.
    exp.data.close()  # Stops the input workers of a streamed source.
    console.close_log_file(log_file)


def _create_writer(config, workdir: str, par):
  """The metric writers; a tracker that cannot start (only process 0 starts them) stops
  every process, not only process 0, which the others would wait for forever."""
  error = None
  try:
    writer = loggers.create_writer(config, workdir, process_index=par.process_index)
  except UserError as e:
    error, writer = e, None
  if par.num_processes > 1:
    from jax.experimental import multihost_utils

    failed = multihost_utils.process_allgather(np.int32(error is not None))
    if error is None and np.any(failed):
      writer.abort()
      error = UserError(
        "Process 0 could not start the experiment trackers (--config.loggers); its log says "
        "why: fix that and run again."
      )
  if error is not None:
    raise error
  return writer


def _ending(e: BaseException) -> str:
  if isinstance(e, KeyboardInterrupt):
    return "interrupted (a second Ctrl-C)"
  return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _train(exp: Experiment, workdir: str, writer, progress, start_time: float) -> dict:
  """The run itself, once its workdir and metric writers exist: restore, loop, summary."""
  config, par, plan = exp.config, exp.par, exp.plan
  ckpt = exp.checkpointer(workdir)
  state = exp.init_state()
  # The newest readable checkpoint: an unreadable one is reported, moved aside and the
  # previous one used; one of another model or optimizer is a UserError.
  restored, start_step = ckpt.restore_latest(state)
  if restored is not None:
    state = restored
    console.event("Resumed from the checkpoint at step %d.", start_step)
  else:
    if config.init_from:  # Only for a new run: resuming continues the run's own state.
      # Another run's checkpoint or a torchvision/timm weights file; BatchNorm statistics
      # come with the params.
      params, model_state = checkpointing.load_init(
        config.init_from, state.params, state.model_state, config.model.name
      )
      opt_init = jax.jit(exp.tx.init, out_shardings=par.sharding(parallel.REPLICATED))
      state = state.replace(params=params, model_state=model_state, opt_state=opt_init(params))
      if jax.tree.leaves(state.ema_params):
        state = state.replace(ema_params=params)
      logging.info("Initialized the params from %s.", config.init_from)
    workdirs.write_config(workdir, config, par)
    writer.write_hparams(workdirs.flat_config(config))
    parameter_overview.log_parameter_overview(par.to_host(state.params))
  step = int(par.to_host(state.step))

  report = _ChunkProgress(num_train_steps=plan.total_steps)
  best_key = exp.task.best_metric
  # Signal handlers and the profiler only while training: both end on every way out.
  try:
    with (
      preemption.Stopper(par, check_every=plan.log_every) as stopper,
      profiling.Profile(plan.profile, config, par, workdir) as profile,
    ):
      train_metrics = None
      timing = {
        "first_step_s": None,
        "compile_s": None,
        "steady_start": None,
        "steady_steps": 0,
        "paused_s": 0.0,
        "epoch_ends": [],
      }
      eval_result = None
      # The first non-finite step since the last check (-1: none), on the device: each
      # chunk passes it to the next, which applies no step after one. Read before anything
      # is evaluated or saved, and with each log's metrics; a bad step is never applied, and
      # nothing after it is saved. In between, the host only waits for chunks to finish
      # (MAX_CHUNKS_AHEAD; no transfer).
      bad = None
      in_flight = collections.deque()
      # Logs not yet read: (step, the metrics of the steps up to it, the flag then, the
      # loop's pace up to it). A log's values are read at the next log, when its chunks are
      # done, so logging never drains the device's queue; evals, saves and the last step
      # read every one first.
      pending_logs = collections.deque()

      def check(flag, metrics):
        """Raises if the non-finite flag (None: nothing since the last check) holds a step."""
        if flag is not None and (first := int(par.to_host(flag))) >= 0:
          _fail_nonfinite(first, par.to_host(metrics).compute(), ckpt, writer)

      def write_logs(entries) -> dict:
        for log_step, metrics, _, pace in entries:
          values = par.to_host(metrics).compute()
          logged = {f"train_{k}": float(v) for k, v in sorted(values.items())}
          writer.write_scalars(log_step, {**logged, **(pace or {})})  # One write per log.
        return logged

      while step < plan.total_steps:
        n = plan.next_stop(step) - step
        profiling_s = profile.start_if_due(step)  # The plan stops at the window's edges.
        t = time.time()
        with profile.annotate(step):
          # The metrics since the last log stay on the device, merged there chunk by chunk.
          state, train_metrics, bad = exp.train_chunk(state, step, n, train_metrics, bad)
        in_flight.append(bad)
        if len(in_flight) > MAX_CHUNKS_AHEAD:
          keep = MAX_CHUNKS_AHEAD // 2
          jax.block_until_ready(in_flight[-keep - 1])  # And those before it: each feeds the next.
          while len(in_flight) > keep:
            in_flight.popleft()
        if timing["first_step_s"] is None:  # The first chunk compiles: time it alone.
          check(bad, train_metrics)
          in_flight.clear()
          bad = None
          timing["first_step_s"] = time.time() - start_time
          timing["compile_s"] = time.time() - t
          timing["steady_start"] = time.time()
          timing["input_wait_start"] = exp.data.input_wait_s
        else:
          timing["steady_steps"] += n
          timing["paused_s"] += profiling_s
        step += n
        logged = None
        stop = stopper.should_stop(step)
        timing["paused_s"] += profile.stop_if_due(step, state, stop)
        log_due = step % plan.log_every == 0 or step == plan.total_steps
        eval_due = step % plan.eval_every == 0 or step == plan.total_steps
        save_due = step % plan.checkpoint_every == 0 or step == plan.total_steps or stop
        pace = report(step, log=log_due)  # Steps/s and uptime, written with the log.
        if log_due:
          pending_logs.append((step, train_metrics, bad, pace))
          train_metrics = None
        if eval_due or save_due:  # Every flag and log read before anything is evaluated or saved.
          in_flight.clear()  # Reading the newest flag waits for every chunk before it.
          ready, pending_logs = list(pending_logs), collections.deque()
          # Off a log step, the steps since the last log have a flag but no log of their own.
          flags = ready if log_due else [*ready, (step, train_metrics, bad, None)]
          bad = None
        elif len(pending_logs) > 1:  # The previous log: its chunks are done or nearly.
          ready = flags = [pending_logs.popleft()]
        else:
          ready = flags = []
        for _, metrics, flag, _ in flags:
          check(flag, metrics)
        if flags:
          exp.data.raise_if_failed()  # Agreed by all processes: no blank batch is saved.
        if ready:
          logged = write_logs(ready)
        if progress is not None:
          progress.update(step, logged)
        eval_result = None
        paused = time.time()
        if eval_due:
          with report.timed("eval"):
            eval_result = exp.evaluate(state)
          writer.write_scalars(
            step, {k: v for k, v in sorted(eval_result.items()) if k != "eval_examples"}
          )
        saved = False
        if save_due:
          with report.timed("checkpoint"):
            metrics = {best_key: eval_result[best_key]} if eval_result else None
            saved = ckpt.save(step, state, metrics=metrics, force=True)
        if eval_result is not None or saved:
          console.event("%s", _step_line(step, eval_result, saved))
        timing["paused_s"] += time.time() - paused
        if step % plan.steps_per_epoch == 0:  # After its eval and the save's blocking part.
          timing["epoch_ends"].append(time.time())
        if stop:
          ckpt.wait()
          writer.close(status="KILLED")
          if progress is not None:
            progress.close()
          console.event(
            "Stopped at step %d after a stop signal; the checkpoint is saved: run the "
            "same command to resume.",
            step,
          )
          return {"step": step, "stopped": True}
      timing["train_end"] = time.time()
      if progress is not None:
        progress.close()

      if timing["first_step_s"] is None:  # Finished before this invocation: nothing to do.
        ckpt.close()
        previous = workdirs.read_summary(workdir)
        console.event(
          "The run in %s already finished at step %d; nothing more to train.", workdir, step
        )
        if previous is None:  # Killed after the last checkpoint, before the summary.
          previous = {
            "step": step,
            **exp.evaluate(state),
            "wall_s": time.time() - start_time,
            "devices": par.num_devices,
            "processes": par.num_processes,
            "batch_size": config.batch_size,
            **resources.peaks(par),
          }
          workdirs.write_summary(workdir, previous, par)
        writer.close()
        return previous
      ckpt.wait()
      ckpt.close()
      writer.flush()
      # Train throughput after the first (compiling) chunk, eval and checkpoint time excluded.
      steady_s = timing["train_end"] - timing["steady_start"] - timing["paused_s"]
      steady = (
        timing["steady_steps"] * config.batch_size / steady_s if timing["steady_steps"] else None
      )
      # Share of the steady train time the loop spent blocked waiting for input batches.
      wait_share = None
      if exp.data.input_wait_s is not None and timing["steady_steps"] and steady_s > 0:
        wait_share = (exp.data.input_wait_s - timing["input_wait_start"]) / steady_s
      summary = {
        "step": step,
        **eval_result,
        "train_examples_per_sec": steady,
        "wall_s": time.time() - start_time,
        "time_to_first_step_s": timing["first_step_s"],
        "first_dispatch_s": timing["compile_s"],
        "devices": par.num_devices,
        "processes": par.num_processes,
        "batch_size": config.batch_size,
        "input_wait_share": wait_share,
        # When each epoch this invocation ran ended (after its eval and the save's blocking
        # part), in seconds since the invocation started: per-epoch times are differences.
        "epoch_end_s": [t - start_time for t in timing["epoch_ends"]],
        "data_source": exp.data.description,
        # This invocation's peaks (a resumed run's: since the resume), the max over processes.
        **resources.peaks(par),
      }
      workdirs.write_summary(workdir, summary, par)
      writer.write_summary(summary)
      writer.close()
      return summary
  except asynclib.AsyncError as e:  # Metric writes failed (a full disk, a tracker).
    _fail_writing_metrics(e, ckpt, workdir)


class _ChunkProgress:
  """CLU's ReportProgress (which imports TensorFlow with CLU's writers), called after each
  chunk. At a log step it returns the loop's pace since the previous one, `steps_per_sec`
  and `uptime`, for the loop to write with that log's metrics: one write per log. At most
  once every `every_secs` (CLU's default cadence) and at the last step, the work unit's
  note (a line in the log file) says steps/s, progress, ETA and the share of the time spent
  in each `timed` part."""

  def __init__(self, *, num_train_steps: int, every_secs: float = 60.0):
    self.num_train_steps, self.every_secs = num_train_steps, every_secs
    self.start = time.monotonic()
    # (step, time) of the last log and of the last note, or of the first call (after the
    # chunk that compiles).
    self.last_log = self.last_note = None
    self.time_per_part = collections.defaultdict(float)
    self.timer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="timed")

  def __call__(self, step: int, log: bool) -> dict | None:
    t = time.monotonic()
    if self.last_log is None:
      self.last_log = self.last_note = (step, t)
      return None
    last = step == self.num_train_steps
    pace = None
    if log and step > self.last_log[0]:
      pace = {"steps_per_sec": _rate(self.last_log, step, t), "uptime": t - self.start}
      self.last_log = (step, t)
    if (last or t - self.last_note[1] >= self.every_secs) and step > self.last_note[0]:
      self._note(step, _rate(self.last_note, step, t), t)
      self.last_note = (step, t)
    return pace

  def _note(self, step: int, steps_per_sec: float, t: float):
    message = f"{steps_per_sec:.1f} steps/s"
    if self.num_train_steps:
      eta = (self.num_train_steps - step) / steps_per_sec
      message += (
        f", {100 * step / self.num_train_steps:.1f}% ({step}/{self.num_train_steps}), "
        f"ETA: {_format_secs(eta)}"
      )
    if self.time_per_part:
      total = t - self.start
      parts = ", ".join(
        f"{100 * dt / total:.1f}% {name}" for name, dt in sorted(self.time_per_part.items())
      )
      message += f" ({_format_secs(total)} : {parts})"
    platform.work_unit().set_notes(message)

  @contextlib.contextmanager
  def timed(self, name: str):
    """Adds the block's time to `name`'s: from the end of the device work queued before it
    to the end of the device work it queued, measured in a helper thread (as CLU does)."""
    start = self.timer.submit(_done_at, _tick(np.float32(0)))
    yield
    self.timer.submit(self._add, name, start, _tick(np.float32(0)))

  def _add(self, name: str, start, barrier):
    self.time_per_part[name] += _done_at(barrier) - start.result()


@jax.jit
def _tick(x):
  """A tiny computation: done once the device work queued before it is (CLU's barrier)."""
  return x * x


def _rate(since: tuple, step: int, t: float) -> float:
  """Steps per second from `since`, a (step, time), to (step, t)."""
  return (step - since[0]) / (t - since[1])


def _done_at(barrier) -> float:
  barrier.block_until_ready()
  return time.monotonic()


def _format_secs(secs: float) -> str:
  """CLU's format: 123456.7 -> '1d10h17m'."""
  days, secs = divmod(secs, 86400)
  hours, secs = divmod(secs, 3600)
  return (
    (f"{int(days)}d" if days else "") + (f"{int(hours)}h" if hours else "") + f"{int(secs // 60)}m"
  )


def _step_line(step: int, eval_result: dict | None, saved: bool) -> str:
  """'Step 936: eval loss 0.3265, accuracy 0.8830 (10000 examples); checkpoint saved.'"""
  text = f"Step {step}:"
  if eval_result is not None:
    metrics = ", ".join(
      f"{k[5:].replace('_', ' ')} {v:.4f}" for k, v in eval_result.items() if k != "eval_examples"
    )
    text += f" eval {metrics} ({eval_result['eval_examples']} examples)"
  if saved:
    text += "; checkpoint saved" if eval_result is not None else " checkpoint saved"
  return text + "."


def _fail_writing_metrics(error, ckpt, workdir):
  ckpt.wait()  # A failed checkpoint save (e.g. the disk is full) is the clearer message.
  raise UserError(loggers.failure_message(error, workdir)) from error


def _fail_nonfinite(bad_step, values, ckpt, writer):
  ckpt.wait()
  writer.flush()
  latest = ckpt.latest_step()
  raise TrainingError(
    f"The loss or gradient became non-finite at step {bad_step} (loss {values['loss']:.4g}), "
    f"so training stopped without applying it; the last good checkpoint "
    f"({'step ' + str(latest) if latest is not None else 'none yet'}) is kept: lower the "
    "learning rate, add --config.optimizer.grad_clip_norm, or set "
    "--config.nonfinite=skip."
  )
