"""The training recipe: state, per-device train/eval steps, and `train_and_evaluate`.

Reads top to bottom in execution order: validate -> data -> model -> optimizer ->
workdir -> state -> restore -> loop (train chunks; log, eval, checkpoint exactly on
their steps) -> wait -> summary.
"""

import dataclasses
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions

from flaxtrain import (
  checkpointing,
  datasets,
  input_pipeline,
  models,
  optimizers,
  parallel,
  preemption,
  tasks,
  workdirs,
)
from flaxtrain.errors import UserError
from flaxtrain.metrics import EvalMetrics, TrainMetrics

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Test-only: make the loss NaN at this step, to exercise the non-finite handling.
NAN_STEP_ENV = "FLAXTRAIN_TEST_NAN_AT_STEP"


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any  # Non-param collections (e.g. {'batch_stats': ...}); {} if none.


class TrainingError(UserError):
  """Training itself failed (e.g. a NaN loss); the last good checkpoint is kept."""


# ------------------------------------------------------------------ the plan


@dataclasses.dataclass(frozen=True)
class Plan:
  steps_per_epoch: int
  total_steps: int
  log_every: int
  eval_every: int
  checkpoint_every: int
  steps_per_dispatch: int

  def next_stop(self, step: int) -> int:
    """The next step at which the host must log, evaluate, checkpoint or finish."""
    nxt = [self.total_steps]
    for every in (self.log_every, self.eval_every, self.checkpoint_every):
      nxt.append((step // every + 1) * every)
    return min(min(nxt), step + self.steps_per_dispatch)


def validate(config: ml_collections.ConfigDict, par: parallel.DataParallel):
  """Checks everything that can be checked before touching data or the workdir."""
  def positive(key, value, kind=int):
    if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
      raise UserError(f"{key} must be a positive {kind.__name__}, got {value!r}: "
                      f"set --config.{key}.")
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
        f"({par.describe()}): set --config.batch_size to a multiple of {par.num_devices}.")
  if config.nonfinite not in ("error", "skip"):
    raise UserError(f"nonfinite must be 'error' or 'skip', got {config.nonfinite!r}.")
  if config.compute_dtype not in DTYPES:
    raise UserError(f"compute_dtype must be one of {', '.join(DTYPES)}, got "
                    f"{config.compute_dtype!r}.")
  models.get(config.model, num_classes=2)  # Unknown names fail here, before any data.
  tasks.get(config.task, num_classes=2)
  optimizers.validate(config.optimizer, config.schedule)


def default_steps_per_dispatch(platform: str) -> int:
  # XLA:CPU runs convolutions inside loops ~15x slower (loop-carried kernels), and a CPU
  # step is long enough that dispatch costs nothing; accelerators gain from fewer launches.
  return 1 if platform == "cpu" else 25


def make_plan(config, steps_per_epoch: int, platform: str = "cpu") -> Plan:
  total = config.num_train_steps or config.num_epochs * steps_per_epoch
  dispatch = config.steps_per_dispatch or default_steps_per_dispatch(platform)
  return Plan(
      steps_per_epoch=steps_per_epoch,
      total_steps=total,
      log_every=config.log_every_steps,
      eval_every=config.eval_every_steps or steps_per_epoch,
      checkpoint_every=config.checkpoint_every_steps or config.eval_every_steps
      or steps_per_epoch,
      steps_per_dispatch=dispatch)


# ------------------------------------------------------------- per-device code


def preprocess(images, dtype):
  return images.astype(jnp.float32).astype(dtype) / 255.0


def make_train_chunk(model, tx, schedule, loss_fn, config, dtype, max_steps: int):
  """Per-device: runs up to `num_steps` (<= max_steps) train steps on the chunk's batches."""
  stop_on_nonfinite = config.nonfinite == "error"
  nan_step = int(os.environ.get(NAN_STEP_ENV, -1))
  base_key = jax.random.key(config.seed)

  def loss_and_aux(params, model_state, batch, rng):
    variables = {"params": params, **model_state}
    x = preprocess(batch["image"], dtype)
    mutable = list(model_state)
    out = model.apply(variables, x, train=True, rngs={"dropout": rng}, mutable=mutable or False)
    outputs, new_model_state = out if mutable else (out, {})
    per_example, extra = loss_fn(outputs, batch)
    return jnp.mean(per_example), (new_model_state, per_example, extra)

  def train_step(state, batch):
    # A fresh dropout key per step and device, a pure function of (seed, step).
    rng = jax.random.fold_in(jax.random.fold_in(base_key, state.step), parallel.device_index())
    grad_fn = jax.value_and_grad(loss_and_aux, has_aux=True)
    (loss, (model_state, per_example, extra)), grads = grad_fn(
        state.params, state.model_state, batch, rng)
    grads, loss = parallel.mean((grads, loss))
    if nan_step >= 0:
      loss = jnp.where(state.step == nan_step, jnp.nan, loss)
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                     opt_state=opt_state, model_state=model_state)
    # A non-finite step is never applied; in 'skip' mode only the step counter moves on.
    kept = state.replace(step=state.step + 1)
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, kept)
    first_device = (parallel.device_index() == 0).astype(jnp.float32)
    metrics = TrainMetrics.single_from_model_output(
        loss=per_example, accuracy=extra["accuracy"], learning_rate=schedule(state.step),
        nonfinite=(1.0 - finite.astype(jnp.float32)) * first_device)
    return new, metrics, finite

  def guarded_step(state, batch):
    new, metrics, finite = train_step(state, batch)
    bad = jnp.where(finite, -1, state.step).astype(jnp.int32)
    if stop_on_nonfinite:
      new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    else:
      bad = jnp.int32(-1)
    return new, metrics, bad

  def chunk(state, inputs, num_steps):
    if max_steps == 1:
      # No loop: XLA:CPU runs convolutions whose kernels are loop-carried ~15x slower.
      new, metrics, bad = guarded_step(state, input_pipeline.take(inputs, 0))
      return new, parallel.gather_metrics(metrics), bad

    def cond(carry):
      i, _, _, bad = carry
      return (i < num_steps) & (bad < 0)

    def body(carry):
      i, state, metrics, _ = carry
      new, step_metrics, bad = guarded_step(state, input_pipeline.take(inputs, i))
      return i + 1, new, metrics.merge(step_metrics), bad

    carry = (jnp.int32(0), state, TrainMetrics.empty(), jnp.int32(-1))
    _, state, metrics, bad = jax.lax.while_loop(cond, body, carry)
    return state, parallel.gather_metrics(metrics), bad

  return chunk


def make_eval(model, loss_fn, dtype, num_steps: int):
  """Per-device: evaluates all `num_steps` padded eval batches (masked rows ignored)."""

  def evaluate(state, inputs):
    variables = {"params": state.params, **state.model_state}

    def body(i, metrics):
      batch = input_pipeline.take(inputs, i)
      outputs = model.apply(variables, preprocess(batch["image"], dtype), train=False)
      per_example, extra = loss_fn(outputs, batch)
      return metrics.merge(EvalMetrics.single_from_model_output(
          loss=per_example, accuracy=extra["accuracy"], mask=batch["mask"]))

    metrics = jax.lax.fori_loop(0, num_steps, body, EvalMetrics.empty())
    return parallel.gather_metrics(metrics)

  return evaluate


def init_state(model, tx, image_shape, seed: int, par: parallel.DataParallel) -> TrainState:
  """Initializes the state on the host CPU once, then replicates it to every device."""

  def init():
    x = jnp.zeros((1, *image_shape), jnp.float32)
    variables = model.init({"params": jax.random.key(seed)}, x, train=False)
    params = variables.pop("params")
    return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                      model_state=dict(variables))

  state = jax.jit(init, out_shardings=par.sharding(parallel.REPLICATED))()
  return state


# ------------------------------------------------------------------- the loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       par: parallel.DataParallel | None = None) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the summary."""
  start_time = time.time()
  par = par or parallel.DataParallel()
  validate(config, par)
  _prepare_data_once(config, par)
  spec, train_data, eval_data = datasets.load(
      config.dataset.name, data_dir=config.dataset.data_dir,
      manual_dir=config.dataset.manual_dir, train_split=config.dataset.train_split,
      eval_split=config.dataset.eval_split)
  pipe = input_pipeline.Pipeline(
      train_data, eval_data, par=par, seed=config.seed, batch_size=config.batch_size,
      eval_batch_size=config.eval_batch_size, on_device=config.dataset.on_device)
  plan = make_plan(config, pipe.steps_per_epoch, par.devices[0].platform)
  dtype = DTYPES[config.compute_dtype]
  model = models.get(config.model, spec.num_classes, dtype)
  loss_fn = tasks.get(config.task, spec.num_classes)
  tx, schedule = optimizers.make(config.optimizer, config.schedule,
                                 steps_per_epoch=plan.steps_per_epoch,
                                 total_steps=plan.total_steps)
  logging.info("Devices: %s; global batch %d = %d per device; %d steps (%d per epoch); "
               "data %s.", par.describe(), config.batch_size,
               config.batch_size // par.num_devices, plan.total_steps, plan.steps_per_epoch,
               "on device" if pipe.on_device else "gathered on host")

  # Everything the user can get wrong has been checked: only now touch the workdir.
  workdirs.prepare(workdir, par)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=par.process_index > 0, asynchronous=True)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    keep=config.keep_checkpoints)
  state = init_state(model, tx, spec.image_shape, config.seed, par)
  # The newest readable checkpoint: an unreadable one is reported, moved aside and the
  # previous one used; one of another model or optimizer is a UserError.
  restored, start_step = ckpt.restore_latest(state)
  if restored is not None:
    state = restored
    logging.info("Resumed from the checkpoint at step %d.", start_step)
  else:
    if config.init_from:  # Only for a new run: resuming continues the run's own state.
      params = checkpointing.load_params(config.init_from, state.params)
      opt_init = jax.jit(tx.init, out_shardings=par.sharding(parallel.REPLICATED))
      state = state.replace(params=params, opt_state=opt_init(params))
      logging.info("Initialized the params from %s.", config.init_from)
    workdirs.write_config(workdir, config, par)
    writer.write_hparams(workdirs.flat_config(config))
    parameter_overview.log_parameter_overview(par.to_host(state.params))
  step = int(par.to_host(state.step))

  chunk_fn = make_train_chunk(model, tx, schedule, loss_fn, config, dtype,
                              plan.steps_per_dispatch)
  train_chunk = None  # Compiled at the first chunk, with the input layout's specs.
  eval_batches = pipe.eval_batches()
  eval_steps = eval_batches.inputs["mask"].shape[0]
  evaluate_fn = par.compile(make_eval(model, loss_fn, dtype, eval_steps),
                            in_specs=(parallel.REPLICATED, eval_batches.specs),
                            out_specs=parallel.REPLICATED)

  def evaluate(state):
    m = par.to_host(evaluate_fn(state, eval_batches.inputs)).compute()
    return {"eval_loss": float(m["loss"]), "eval_accuracy": float(m["accuracy"]),
            "eval_examples": int(m["examples"])}

  report = periodic_actions.ReportProgress(num_train_steps=plan.total_steps, writer=writer,
                                           every_steps=config.log_every_steps)
  # Signal handlers only while training: they are put back on every way out.
  with preemption.Stopper(par, check_every=plan.log_every) as stopper:
    train_metrics = None
    timing = {"steady_s": 0.0, "steady_steps": 0, "first_step_s": None, "compile_s": None}
    eval_result = None
    while step < plan.total_steps:
      n = plan.next_stop(step) - step
      batches = pipe.train_batches(step, n, plan.steps_per_dispatch)
      if train_chunk is None:
        train_chunk = par.compile(chunk_fn, in_specs=(parallel.REPLICATED, batches.specs,
                                                      parallel.REPLICATED),
                                  out_specs=parallel.REPLICATED, donate_argnums=(0,))
      t = time.time()
      state, chunk_metrics, bad = train_chunk(state, batches.inputs, np.int32(n))
      bad = int(par.to_host(bad))
      elapsed = time.time() - t
      if timing["first_step_s"] is None:
        timing["first_step_s"] = time.time() - start_time
        timing["compile_s"] = elapsed
      else:
        timing["steady_s"] += elapsed
        timing["steady_steps"] += n
      if bad >= 0:
        _fail_nonfinite(bad, par.to_host(chunk_metrics).compute(), ckpt, writer)
      for s in range(step + 1, step + n + 1):  # ReportProgress wants every step.
        report(s)
      step += n
      train_metrics = chunk_metrics if train_metrics is None else train_metrics.merge(chunk_metrics)
      if step % plan.log_every == 0 or step == plan.total_steps:
        values = par.to_host(train_metrics).compute()
        writer.write_scalars(step, {f"train_{k}": v for k, v in values.items()})
        train_metrics = None
      eval_result = None
      if step % plan.eval_every == 0 or step == plan.total_steps:
        with report.timed("eval"):
          eval_result = evaluate(state)
        writer.write_scalars(step, {k: v for k, v in eval_result.items() if k != "eval_examples"})
        logging.info("Step %d: eval loss %.4f, accuracy %.4f (%d examples).", step,
                     eval_result["eval_loss"], eval_result["eval_accuracy"],
                     eval_result["eval_examples"])
      stop = stopper.should_stop(step)
      if step % plan.checkpoint_every == 0 or step == plan.total_steps or stop:
        with report.timed("checkpoint"):
          metrics = {checkpointing.BEST_METRIC: eval_result["eval_accuracy"]} \
              if eval_result else None
          ckpt.save(step, state, metrics=metrics, force=True)
      if stop:
        ckpt.wait()
        writer.flush()
        logging.info("Stopped at step %d after a stop signal; the checkpoint is saved: run the "
                     "same command to resume.", step)
        return {"step": step, "stopped": True}

    if timing["first_step_s"] is None:  # Finished before this invocation: nothing to do.
      ckpt.close()
      previous = workdirs.read_summary(workdir)
      logging.info("The run in %s already finished at step %d; nothing more to train.",
                   workdir, step)
      if previous is None:  # Killed after the last checkpoint, before the summary.
        previous = {"step": step, **evaluate(state), "wall_s": time.time() - start_time,
                    "devices": par.num_devices, "processes": par.num_processes,
                    "batch_size": config.batch_size}
        workdirs.write_summary(workdir, previous, par)
      return previous
    ckpt.wait()
    ckpt.close()
    writer.flush()
    steady = timing["steady_steps"] * config.batch_size / timing["steady_s"] \
        if timing["steady_s"] else None
    summary = {
        "step": step, **eval_result, "train_examples_per_sec": steady,
        "wall_s": time.time() - start_time, "time_to_first_step_s": timing["first_step_s"],
        "first_dispatch_s": timing["compile_s"], "devices": par.num_devices,
        "processes": par.num_processes, "batch_size": config.batch_size,
    }
    workdirs.write_summary(workdir, summary, par)
    return summary


def _prepare_data_once(config, par):
  """Multi-process: process 0 prepares the dataset alone, then everyone reads it."""
  if par.num_processes == 1:
    return
  from jax.experimental import multihost_utils

  error = None
  if par.process_index == 0:
    try:
      datasets.prepare(config.dataset.name, data_dir=config.dataset.data_dir,
                       manual_dir=config.dataset.manual_dir)
    except UserError as e:
      error = e
  # Agreed by all, so that no process waits forever for one that failed.
  failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
  if error is not None:
    raise error
  if int(failed):
    raise UserError(f"Process 0 could not prepare dataset {config.dataset.name!r}; see its "
                    "log for the reason.")


def _fail_nonfinite(bad_step, values, ckpt, writer):
  ckpt.wait()
  writer.flush()
  latest = ckpt.latest_step()
  raise TrainingError(
      f"The loss or gradient became non-finite at step {bad_step} (loss {values['loss']:.4g}), "
      f"so training stopped without applying it; the last good checkpoint "
      f"({'step ' + str(latest) if latest is not None else 'none yet'}) is kept: lower the "
      "learning rate, add --config.optimizer.grad_clip_norm, or set "
      "--config.nonfinite=skip.")
