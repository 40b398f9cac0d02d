"""The experiment: config -> validated plan, data, model, task, optimizer, compiled steps.

`Experiment` touches no workdir, so training (`loop.train_and_evaluate`) and every other
mode (describe, eval, report, export) build the same thing from the same config.
"""

import dataclasses
import os
import time

import jax
import ml_collections
import numpy as np

from flaxtrain import checkpointing, models, optimizers, parallel, steps, tasks
from flaxtrain import metrics as metrics_lib
from flaxtrain.data import mix, sources
from flaxtrain.errors import UserError
from flaxtrain.models import analysis
from flaxtrain.steps import DTYPES, TrainState


@dataclasses.dataclass(frozen=True)
class Plan:
  steps_per_epoch: int
  total_steps: int
  log_every: int
  eval_every: int
  checkpoint_every: int
  steps_per_dispatch: int
  # The profiler's window (first, end): it traces steps first+1..end, so it starts and
  # stops between chunks. None: no trace.
  profile: tuple[int, int] | None = None

  def next_stop(self, step: int) -> int:
    """The next step at which the host must log, evaluate, checkpoint, start or stop the
    profiler, or finish."""
    nxt = min(
      self.total_steps,
      step + self.steps_per_dispatch,
      (step // self.log_every + 1) * self.log_every,
      (step // self.eval_every + 1) * self.eval_every,
      (step // self.checkpoint_every + 1) * self.checkpoint_every,
    )
    if self.profile is None:  # The common case, kept cheap: the loop asks at every chunk.
      return nxt
    return min([nxt, *(edge for edge in self.profile if edge > step)])


def validate(config: ml_collections.ConfigDict, par: parallel.DataParallel):
  """Checks everything that can be checked before touching data or the workdir."""

  def positive(key, value, kind=int):
    if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
      raise UserError(
        f"{key} must be a positive {kind.__name__}, got {value!r}: set --config.{key}."
      )

  if not isinstance(config.seed, int) or isinstance(config.seed, bool) or config.seed < 0:
    raise UserError(f"seed must be a non-negative integer, got {config.seed!r}: set --config.seed.")
  positive("batch_size", config.batch_size)
  positive("eval_batch_size", config.eval_batch_size)
  positive("num_epochs", config.num_epochs)
  positive("log_every_steps", config.log_every_steps)
  for key in ("num_train_steps", "eval_every_steps", "checkpoint_every_steps"):
    if config[key] is not None:
      positive(key, config[key])
  positive("keep_checkpoints", config.keep_checkpoints)
  if config.steps_per_dispatch < 0:
    raise UserError("steps_per_dispatch must be >= 0 (0 picks a default).")
  if config.batch_size % par.num_devices:
    raise UserError(
      f"batch_size {config.batch_size} does not divide by the {par.num_devices} devices "
      f"({par.describe()}): set --config.batch_size to a multiple of {par.num_devices}."
    )
  if config.nonfinite not in ("error", "skip"):
    raise UserError(f"nonfinite must be 'error' or 'skip', got {config.nonfinite!r}.")
  positive("grad_accum_steps", config.grad_accum_steps)
  per_device = config.batch_size // par.num_devices
  if per_device % config.grad_accum_steps:
    raise UserError(
      f"grad_accum_steps {config.grad_accum_steps} does not divide the per-device batch "
      f"{per_device} (batch_size {config.batch_size} over {par.num_devices} devices): set "
      "--config.grad_accum_steps to a divisor of it."
    )
  shards = config.topology_invariant_shards
  if shards:
    if (
      not isinstance(shards, int) or shards < 0 or shards & (shards - 1) or shards % par.num_devices
    ):
      raise UserError(
        f"topology_invariant_shards must be 0 (off) or a power of two that is a multiple of "
        f"the {par.num_devices} devices, got {shards!r}: set "
        f"--config.topology_invariant_shards to e.g. {max(8, par.num_devices)}."
      )
    if config.batch_size % shards:
      raise UserError(
        f"topology_invariant_shards {shards} does not divide batch_size "
        f"{config.batch_size}: set --config.batch_size to a multiple of {shards}."
      )
    if config.grad_accum_steps != 1:
      raise UserError(
        "topology_invariant_shards already splits the batch into sequential "
        "shards: set --config.grad_accum_steps=1."
      )
  if not 0.0 <= config.ema_decay < 1.0:
    raise UserError(f"ema_decay must be in [0, 1) (0 turns EMA off), got {config.ema_decay}.")
  if config.compute_dtype not in DTYPES:
    raise UserError(
      f"compute_dtype must be one of {', '.join(DTYPES)}, got {config.compute_dtype!r}."
    )
  _validate_profile(config, par)
  sources.validate(config)
  models.get(config.model, num_classes=2)  # Unknown names fail here, before any data.
  task = tasks.get(config.task, num_classes=2)
  mix.validate(config.augment, config.task.name, task.kind, per_device, par.num_devices)
  optimizers.validate(config.optimizer, config.schedule)


def _validate_profile(config, par):
  window = config.get("profile_steps")  # .get: a config.json of an older run lacks them.
  if window is not None and not (
    isinstance(window, tuple | list)
    and len(window) == 2
    and all(isinstance(v, int) and not isinstance(v, bool) for v in window)
    and window[0] >= 0
    and window[1] >= 1
  ):
    raise UserError(
      f"profile_steps must be (start, count) with start >= 0 and count >= 1, got "
      f"{window!r}: set e.g. --config.profile_steps='(100, 5)' for the 5 steps after step 100."
    )
  process = config.get("profile_process", 0)
  if (
    not isinstance(process, int)
    or isinstance(process, bool)
    or not -1 <= process < par.num_processes
  ):
    raise UserError(
      f"profile_process must be -1 (every process) or a process index below "
      f"{par.num_processes}, got {process!r}: set --config.profile_process."
    )


def default_steps_per_dispatch(platform: str, convolutions) -> int:
  """25 train steps per device launch (fewer launches, fewer host round trips), except on
  the CPU for a model with convolutions: XLA:CPU runs those ~11x slower inside a loop
  (fashion_cnn: 267 against 3,088 examples/s), and their steps are long enough that a
  launch per step costs little. The MLP of configs/fashion_mlp.py runs ~1.7x faster at 25
  than at 1 on a CPU (scripts/bench_overhead.py). `convolutions()` says whether the model
  has any; it is asked only on a CPU (it traces the model)."""
  return 1 if platform == "cpu" and convolutions() else 25


def make_plan(
  config, steps_per_epoch: int, platform: str = "cpu", convolutions=lambda: True
) -> Plan:
  total = config.num_train_steps or config.num_epochs * steps_per_epoch
  dispatch = config.steps_per_dispatch or default_steps_per_dispatch(platform, convolutions)
  profile = None
  if config.get("profile_steps") is not None:
    start, count = config.profile_steps
    if start >= total:
      raise UserError(
        f"profile_steps starts after step {start}, but the run has {total} steps: set "
        f"--config.profile_steps to a start below {total}."
      )
    profile = (start, min(start + count, total))
  return Plan(
    steps_per_epoch=steps_per_epoch,
    total_steps=total,
    log_every=config.log_every_steps,
    eval_every=config.eval_every_steps or steps_per_epoch,
    checkpoint_every=config.checkpoint_every_steps or config.eval_every_steps or steps_per_epoch,
    steps_per_dispatch=dispatch,
    profile=profile,
  )


class Experiment:
  """Everything a run is built from: data, model, task, optimizer and compiled steps.

  Constructing one validates the config and loads the data but touches no workdir,
  so `describe`, `eval`, `report` and `export` share it with training.
  """

  def __init__(self, config: ml_collections.ConfigDict, par: parallel.DataParallel | None = None):
    self.config = config
    self.par = par = par or parallel.DataParallel()
    validate(config, par)
    _prepare_data_once(config, par)
    self.spec, self.data = sources.make(config, par)
    self.dtype = DTYPES[config.compute_dtype]
    self.norm = steps.normalization(config)
    model_cfg = config.model
    if config.topology_invariant_shards and model_cfg.get("conv") == "auto":
      # 'auto' picks the CNN's convolution by the process's device count: pinned here, so
      # every topology runs the same code and gets the same bits.
      model_cfg = ml_collections.ConfigDict({**model_cfg.to_dict(), "conv": "xla"})
    self.model = models.get(model_cfg, self.spec.num_classes, self.dtype, self.spec.image_shape)
    self.plan = make_plan(
      config,
      self.data.plan.steps_per_epoch,
      par.devices[0].platform,
      lambda: analysis.has_convolutions(self.model, self.spec.image_shape),
    )
    self.task = tasks.get(config.task, self.spec.num_classes)
    self.tx, self.schedule = optimizers.make(
      config.optimizer,
      config.schedule,
      steps_per_epoch=self.plan.steps_per_epoch,
      total_steps=self.plan.total_steps,
      # Shapes only, traced only for optimizer.layer_decay/freeze (they read the paths).
      params=lambda: analysis.param_shapes(self.model, self.spec.image_shape),
    )
    self.train_metrics = metrics_lib.train_metrics(self.task.metric_names)
    self.eval_metrics = metrics_lib.eval_metrics(self.task.metric_names)
    self._chunk_fn = steps.make_train_chunk(
      self.model,
      self.tx,
      self.schedule,
      self.task,
      config,
      self.dtype,
      self.plan.steps_per_dispatch,
      self.train_metrics,
      par.num_devices,
    )
    self._train_chunk = self._no_metrics = self._no_bad = None
    self._num_steps = {}  # Chunk lengths as device scalars: no transfer per chunk.
    self._evaluate, self._predict = {}, {}  # Compiled per eval chunk length.

  # ------------------------------------------------------------- state

  def init_state(self) -> TrainState:
    return steps.init_state(
      self.model,
      self.tx,
      self.spec.image_shape,
      self.config.seed,
      self.par,
      ema=bool(self.config.ema_decay),
    )

  def checkpointer(self, workdir: str) -> checkpointing.Checkpointer:
    return checkpointing.Checkpointer(
      os.path.join(workdir, "checkpoints"),
      keep=self.config.keep_checkpoints,
      best_metric=self.task.best_metric,
      best_mode=self.task.best_mode,
    )

  def restore(self, workdir: str, step: int | str | None = None) -> tuple[TrainState, int]:
    """The checkpoint at `step` (an int, None/'latest' or 'best') of a run's workdir.

    Read-only: safe on a run that is still training in that workdir.
    """
    return checkpointing.read(
      os.path.join(workdir, "checkpoints"),
      self.init_state(),
      step,
      best_metric=self.task.best_metric,
      best_mode=self.task.best_mode,
    )

  # ------------------------------------------------------------- steps

  def train_chunk(
    self, state: TrainState, start_step: int, num_steps: int, so_far=None, bad_so_far=None
  ):
    """Runs steps start_step+1..start_step+num_steps; returns (state, metrics, bad step).

    The metrics (`metrics.Packed`) are this chunk's merged into `so_far` (metrics a
    previous call returned; None: nothing yet), on the device: the loop reads them only
    when it logs. Likewise `bad_so_far`, the bad step a previous call returned: if it is
    one (>= 0), this chunk applies no step and returns it, so the loop need not read it
    after every chunk.
    """
    batches = self.data.train_batches(start_step, num_steps, self.plan.steps_per_dispatch)
    if self._train_chunk is None:  # Compiled at the first chunk, with the input's specs.
      self._train_chunk = self.par.compile(
        self._chunk_fn,
        in_specs=(parallel.REPLICATED, batches.specs, *[parallel.REPLICATED] * 3),
        out_specs=parallel.REPLICATED,
        donate_argnums=(0,),
      )
      # Never donated: one copy starts every log period.
      self._no_metrics = self.par.replicate(metrics_lib.Packed.of(self.train_metrics.empty()))
      self._no_bad = self.par.replicate(np.int32(-1))
    so_far = self._no_metrics if so_far is None else so_far
    bad_so_far = self._no_bad if bad_so_far is None else bad_so_far
    if (length := self._num_steps.get(num_steps)) is None:
      length = self._num_steps[num_steps] = self.par.replicate(np.int32(num_steps))
    return self._train_chunk(state, batches.inputs, length, so_far, bad_so_far)

  def evaluate(self, state: TrainState) -> dict:
    """Exact metrics over the whole eval split: every example counted once."""
    total = None
    for batches in self.data.eval_batches():
      num_steps = batches.inputs["mask"].shape[0]
      if num_steps not in self._evaluate:
        self._evaluate[num_steps] = self.par.compile(
          steps.make_eval(
            self.model, self.task, self.dtype, num_steps, self.eval_metrics, self.norm
          ),
          in_specs=(parallel.REPLICATED, batches.specs),
          out_specs=parallel.REPLICATED,
        )
      chunk = self._evaluate[num_steps](state, batches.inputs)
      # The host prepares the next chunk while this one runs, but waits for the one before
      # it: each chunk and its merge are a dozen computations, and XLA:CPU admits 32 in
      # flight per device before it can deadlock a collective (see loop.MAX_CHUNKS_AHEAD).
      if total is not None:
        jax.block_until_ready(total)
      total = chunk if total is None else total.merge(chunk)
    self.data.raise_if_failed()
    values = self.par.to_host(total).compute()
    out = {f"eval_{k}": float(v) for k, v in values.items() if k != "examples"}
    out["eval_examples"] = int(values["examples"])
    return out

  def predict(self, state: TrainState, num: int | None = None) -> dict:
    """Host arrays over the first `num` eval examples: image, label, output."""
    num = self.data.plan.num_eval if num is None else min(num, self.data.plan.num_eval)
    outputs, rows = [], 0
    for batches in self.data.eval_batches():
      num_steps = batches.inputs["mask"].shape[0]
      if num_steps not in self._predict:
        self._predict[num_steps] = self.par.compile(
          steps.make_predict(self.model, self.task, self.dtype, num_steps, self.norm),
          in_specs=(parallel.REPLICATED, batches.specs),
          out_specs=parallel.STEPS_BATCH,
        )
      out = self._predict[num_steps](state, batches.inputs)
      if self.par.num_processes > 1:
        from jax.experimental import multihost_utils

        out = multihost_utils.process_allgather(out, tiled=True)
      out = np.asarray(out)
      outputs.append(out.reshape((-1, *out.shape[2:])))
      rows += outputs[-1].shape[0]
      if rows >= num:
        break
    return {**self.data.eval_examples(num), "output": np.concatenate(outputs)[:num]}

  def eval_variables(self, state: TrainState) -> dict:
    """Host variables for `model.apply`: the evaluated params plus the model state."""
    return self.par.to_host({"params": steps.eval_params(state), **state.model_state})

  # ----------------------------------------------------------- measuring

  def time_train_steps(self, num_steps: int = 5) -> float:
    """Seconds per train step after compilation, from a fresh state (no workdir)."""
    state = self.init_state()
    state, _, _ = self.train_chunk(state, 0, 1)  # Compiles.
    jax.block_until_ready(state)
    t = time.perf_counter()
    step = 1
    while step < 1 + num_steps:
      n = min(self.plan.steps_per_dispatch, 1 + num_steps - step)
      state, _, _ = self.train_chunk(state, step, n)
      step += n
    jax.block_until_ready(state)
    return (time.perf_counter() - t) / num_steps

  def train_step_flops(self) -> float | None:
    """XLA's FLOPs of one global train step (forward and backward, all devices)."""
    flops = analysis.step_flops(
      self.model,
      self.task,
      self.spec.image_shape,
      self.config.batch_size // self.par.num_devices,
      self.dtype,
    )
    return flops * self.par.num_devices if flops else None


def _prepare_data_once(config, par):
  """Multi-process: process 0 prepares the dataset alone, then everyone reads it."""
  if par.num_processes == 1:
    return
  from jax.experimental import multihost_utils

  error = None
  if par.process_index == 0:
    try:
      sources.prepare_data(config)
    except Exception as e:  # Any failure must reach the broadcast, or the others hang.
      error = (
        e
        if isinstance(e, UserError)
        else UserError(
          f"Could not prepare dataset {config.dataset.name!r} ({type(e).__name__}: "
          f"{' '.join(str(e).split())[:200]}): fix the cause and run again."
        )
      )
  # Agreed by all, so that no process waits forever for one that failed.
  failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
  if error is not None:
    raise error
  if int(failed):
    raise UserError(
      f"Process 0 could not prepare dataset {config.dataset.name!r}; see its log for the reason."
    )
