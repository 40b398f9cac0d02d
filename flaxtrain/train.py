"""The training recipe: state, per-device train/eval steps, and `train_and_evaluate`.

Reads top to bottom: validate -> per-device steps (train chunk, eval, predict) ->
`Experiment` (data, model, task, optimizer, compiled steps; no workdir) ->
`train_and_evaluate`: workdir -> state -> restore -> loop (train chunks; log, eval,
checkpoint exactly on their steps) -> wait -> summary.
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
from clu import asynclib, metric_writers, parameter_overview, periodic_actions

from flaxtrain import (
  checkpointing,
  models,
  optimizers,
  parallel,
  preemption,
  tasks,
  workdirs,
)
from flaxtrain import metrics as metrics_lib
from flaxtrain.data import augment, sources
from flaxtrain.data import plan as plan_lib
from flaxtrain.errors import UserError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Collections a model fills during a call; never part of the train state.
TRANSIENT_COLLECTIONS = ("losses", "intermediates")
# Test-only: make the loss NaN at this step, to exercise the non-finite handling.
NAN_STEP_ENV = "FLAXTRAIN_TEST_NAN_AT_STEP"


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any  # Non-param collections (e.g. {'batch_stats': ...}); {} if none.
  ema_params: Any  # Moving average of params when config.ema_decay > 0, else {}.


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
  sources.validate(config)
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
    checkpoint_every=config.checkpoint_every_steps or config.eval_every_steps or steps_per_epoch,
    steps_per_dispatch=dispatch,
  )


# ------------------------------------------------------------- per-device code


def preprocess(images, dtype=jnp.float32, norm=None):
  """uint8 images -> floats of `dtype`: in [0, 1], or (x - mean) / std with norm=(mean, std)."""
  if norm is None:
    return images.astype(jnp.float32).astype(dtype) / 255.0
  return normalize(images.astype(jnp.float32) / 255.0, norm).astype(dtype)


def normalize(x, norm):
  """float32 pixels in [0, 1] -> (255 x - mean) / std, with mean and std in pixel units."""
  if norm is None:
    return x
  mean, std = (jnp.asarray(v, jnp.float32) for v in norm)
  return (x * 255.0 - mean) / std


def normalization(config):
  """(mean, std) in pixel units from config.dataset, or None for x / 255."""
  ds = config.dataset
  return None if ds.mean is None else (tuple(ds.mean), tuple(ds.std))


def _sum_losses(collection) -> jax.Array:
  """The sum of every value a model sowed into its 'losses' collection (0 if none)."""
  leaves = jax.tree.leaves(collection)
  return sum((jnp.sum(x.astype(jnp.float32)) for x in leaves), jnp.float32(0.0))


def ema_decay_at(step, decay: float):
  """EMA decay with warm-up: early averages are not dominated by the random init."""
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def _balanced_sum(trees):
  """Sum of a power-of-two list of pytrees as a balanced binary tree, neighbours first."""
  while len(trees) > 1:
    trees = [jax.tree.map(jnp.add, a, b) for a, b in zip(trees[::2], trees[1::2], strict=True)]
  return trees[0]


def make_train_chunk(
  model, tx, schedule, task, config, dtype, max_steps: int, metrics_cls, num_devices: int
):
  """Per-device: runs up to `num_steps` (<= max_steps) train steps on the chunk's batches."""
  stop_on_nonfinite = config.nonfinite == "error"
  nan_step = int(os.environ.get(NAN_STEP_ENV, -1))
  base_key = jax.random.key(config.seed)
  accum = config.grad_accum_steps
  aug_cfg = config.augment
  ema_decay = config.ema_decay
  norm = normalization(config)

  def micro_loss(params, model_state, x, batch, rng):
    variables = {"params": params, **model_state}
    mutable = [*model_state, "losses"]
    outputs, new_vars = model.apply(
      variables, x, train=True, rngs={"dropout": rng}, mutable=mutable
    )
    aux = _sum_losses(new_vars.get("losses", {}))
    new_state = {k: v for k, v in new_vars.items() if k != "losses"}
    per_example, task_metrics = task.loss(outputs, batch, x)
    loss = jnp.mean(per_example) + aux
    return loss, (new_state, per_example, task_metrics, aux)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def gradients(params, model_state, x, batch, rng):
    """Mean loss gradient over this device's batch, in `accum` sequential micro-batches."""
    if accum == 1:
      (_, (model_state, per_example, task_metrics, aux)), grads = grad_fn(
        params, model_state, x, batch, rng
      )
      return grads, model_state, per_example, task_metrics, aux

    def split(v):
      return v.reshape((accum, v.shape[0] // accum, *v.shape[1:]))

    def body(carry, inputs):
      grads_sum, model_state, aux_sum = carry
      j, xj, bj = inputs
      (_, (model_state, per_example, task_metrics, aux)), grads = grad_fn(
        params, model_state, xj, bj, jax.random.fold_in(rng, j)
      )
      grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
      return (grads_sum, model_state, aux_sum + aux), (per_example, task_metrics)

    zeros = jax.tree.map(jnp.zeros_like, params)
    carry = (zeros, model_state, jnp.float32(0.0))
    (grads, model_state, aux), (per_example, task_metrics) = jax.lax.scan(
      body, carry, (jnp.arange(accum), split(x), jax.tree.map(split, batch))
    )
    grads = jax.tree.map(lambda g: g / accum, grads)
    flat = lambda v: v.reshape((-1, *v.shape[2:]))  # noqa: E731
    return grads, model_state, flat(per_example), jax.tree.map(flat, task_metrics), aux / accum

  shards = config.topology_invariant_shards

  def invariant_gradients(params, model_state, x, batch, dropout_key, device):
    """Gradients that are bitwise the same on any topology (config.topology_invariant_shards).

    Each of the global batch's fixed shards gets its own gradient (same shapes, same
    dropout key, whichever device computes it); a balanced tree sums them, within the
    device over its consecutive shards, then across devices (`parallel.tree_sum`).
    Unrolled, not scanned: XLA:CPU runs convolutions inside loops far slower.
    """
    if jax.tree.leaves(model_state):
      raise UserError(
        "topology_invariant_shards does not cover models with running statistics (e.g. "
        "BatchNorm, whose batch statistics are all-reduced): set "
        "--config.topology_invariant_shards=0."
      )
    local = shards // num_devices
    size = x.shape[0] // local
    grads, per_example, task_metrics, aux = [], [], [], []
    for j in range(local):
      piece = lambda v, j=j: v[j * size : (j + 1) * size]  # noqa: E731
      (_, (_, pe, tm, a)), g = grad_fn(
        params,
        model_state,
        piece(x),
        jax.tree.map(piece, batch),
        jax.random.fold_in(dropout_key, device * local + j),
      )
      grads.append(g)
      per_example.append(pe)
      task_metrics.append(tm)
      aux.append(a)
    grads = jax.tree.map(lambda g: g / shards, parallel.tree_sum(_balanced_sum(grads), num_devices))
    cat = lambda *v: jnp.concatenate(v)  # noqa: E731
    return (
      grads,
      model_state,
      cat(*per_example),
      jax.tree.map(cat, *task_metrics),
      sum(aux) / local,
    )

  def train_step(state, batch):
    # Random draws are pure functions of (seed, step) and the example's (for augmentation)
    # or the device's (for dropout) position, so resumed runs repeat them exactly.
    step_key = jax.random.fold_in(base_key, state.step)
    device = parallel.device_index()
    local_batch = batch["label"].shape[0]
    # Augmented in [0, 1] (zero padding is black, erasing noise uniform), then normalised.
    x = preprocess(batch["image"], jnp.float32)
    x = augment.apply(x, jax.random.fold_in(step_key, 1), device * local_batch, aug_cfg)
    x = normalize(x, norm).astype(dtype)
    dropout_key = jax.random.fold_in(step_key, 2)
    if shards:
      grads, model_state, per_example, task_metrics, aux = invariant_gradients(
        state.params, state.model_state, x, batch, dropout_key, device
      )
      loss = parallel.mean(jnp.mean(per_example) + aux)  # Reported only; grads are summed.
    else:
      grads, model_state, per_example, task_metrics, aux = gradients(
        state.params, state.model_state, x, batch, jax.random.fold_in(dropout_key, device)
      )
      loss = jnp.mean(per_example) + aux
      # Running statistics (e.g. BatchNorm's) are averaged too: replicas stay identical.
      grads, loss, model_state = parallel.mean((grads, loss, model_state))
    if nan_step >= 0:
      loss = jnp.where(state.step == nan_step, jnp.nan, loss)
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))

    def update(grads, params, opt_state, ema_params):
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      if ema_decay:
        d = ema_decay_at(state.step, ema_decay)
        ema_params = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema_params, params)
      return params, opt_state, ema_params

    operands = (grads, state.params, state.opt_state, state.ema_params)
    if shards:
      # XLA:CPU contracts a*b + c into one fused multiply-add depending on what else a
      # fusion holds, e.g. the gradient sum, which differs by topology. A conditional's
      # branch is a fusion boundary: the update compiles to the same code on every topology.
      params, opt_state, ema_params = jax.lax.cond(
        finite, update, lambda g, p, o, e: (p, o, e), *operands
      )
    else:
      params, opt_state, ema_params = update(*operands)
    new = TrainState(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      model_state=model_state,
      ema_params=ema_params,
    )
    first_device = (device == 0).astype(jnp.float32)
    metrics = metrics_cls.single_from_model_output(
      loss=per_example + aux,
      aux_loss=aux,
      learning_rate=schedule(state.step),
      nonfinite=(1.0 - finite.astype(jnp.float32)) * first_device,
      **task_metrics,
    )
    return new, metrics, finite

  def guarded_step(state, batch):
    """A non-finite step is never applied: 'error' keeps the state as it was and reports
    the step in `bad`; 'skip' only moves the step counter on."""
    new, metrics, finite = train_step(state, batch)
    if stop_on_nonfinite:
      kept, bad = state, jnp.where(finite, -1, state.step).astype(jnp.int32)
    else:
      kept, bad = state.replace(step=state.step + 1), jnp.int32(-1)
    # One select over the whole state, fused by XLA into the update.
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, kept)
    return new, metrics, bad

  def chunk(state, inputs, num_steps):
    if max_steps == 1:
      # No loop: XLA:CPU runs convolutions whose kernels are loop-carried ~15x slower.
      new, metrics, bad = guarded_step(state, plan_lib.take(inputs, 0))
      return new, parallel.gather_metrics(metrics), bad

    def cond(carry):
      i, _, _, bad = carry
      return (i < num_steps) & (bad < 0)

    def body(carry):
      i, state, metrics, _ = carry
      new, step_metrics, bad = guarded_step(state, plan_lib.take(inputs, i))
      return i + 1, new, metrics.merge(step_metrics), bad

    carry = (jnp.int32(0), state, metrics_cls.empty(), jnp.int32(-1))
    _, state, metrics, bad = jax.lax.while_loop(cond, body, carry)
    return state, parallel.gather_metrics(metrics), bad

  return chunk


def eval_params(state: TrainState):
  """The parameters evaluated and exported: the EMA when there is one."""
  return state.ema_params if jax.tree.leaves(state.ema_params) else state.params


def make_eval(model, task, dtype, num_steps: int, metrics_cls, norm=None):
  """Per-device: evaluates all `num_steps` padded eval batches (masked rows ignored)."""

  def evaluate(state, inputs):
    variables = {"params": eval_params(state), **state.model_state}

    def body(i, metrics):
      batch = plan_lib.take(inputs, i)
      x = preprocess(batch["image"], dtype, norm)
      per_example, task_metrics = task.loss(model.apply(variables, x, train=False), batch, x)
      return metrics.merge(
        metrics_cls.single_from_model_output(loss=per_example, mask=batch["mask"], **task_metrics)
      )

    metrics = jax.lax.fori_loop(0, num_steps, body, metrics_cls.empty())
    return parallel.gather_metrics(metrics)

  return evaluate


def make_predict(model, task, dtype, num_steps: int, norm=None):
  """Per-device: the task's predictions for every eval batch, [steps, local batch, ...]."""

  def predict(state, inputs):
    variables = {"params": eval_params(state), **state.model_state}

    def one(i):
      batch = plan_lib.take(inputs, i)
      x = preprocess(batch["image"], dtype, norm)
      return task.predict(model.apply(variables, x, train=False))

    return jax.lax.map(one, jnp.arange(num_steps))

  return predict


def init_state(
  model, tx, image_shape, seed: int, par: parallel.DataParallel, ema: bool = False
) -> TrainState:
  """Initializes the state on the host CPU once, then replicates it to every device."""

  def init():
    x = jnp.zeros((1, *image_shape), jnp.float32)
    variables = model.init({"params": jax.random.key(seed)}, x, train=False)
    params = variables.pop("params")
    # Sown per-call values (auxiliary losses) are not state.
    model_state = {k: v for k, v in variables.items() if k not in TRANSIENT_COLLECTIONS}
    return TrainState(
      step=jnp.int32(0),
      params=params,
      opt_state=tx.init(params),
      model_state=model_state,
      ema_params=jax.tree.map(jnp.copy, params) if ema else {},
    )

  return jax.jit(init, out_shardings=par.sharding(parallel.REPLICATED))()


# ------------------------------------------------------------- the experiment


def step_flops(model, task, image_shape, per_device_batch: int, dtype) -> float | None:
  """XLA's cost-analysis FLOPs of the loss's forward and backward on one device's batch."""
  variables = jax.eval_shape(
    lambda: model.init(  # Shapes only: no initializer compiled.
      jax.random.key(0), jnp.zeros((1, *image_shape)), train=False
    )
  )
  x = jax.ShapeDtypeStruct((per_device_batch, *image_shape), dtype)
  y = jax.ShapeDtypeStruct((per_device_batch,), jnp.int32)

  def loss(variables, x, label):
    out = model.apply(variables, x, train=False)
    return jnp.mean(task.loss(out, {"label": label}, x)[0])

  compiled = jax.jit(jax.value_and_grad(loss)).lower(variables, x, y).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, list):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


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
    self.plan = make_plan(config, self.data.plan.steps_per_epoch, par.devices[0].platform)
    self.dtype = DTYPES[config.compute_dtype]
    self.norm = normalization(config)
    model_cfg = config.model
    if config.topology_invariant_shards and model_cfg.get("conv") == "auto":
      # 'auto' picks the CNN's convolution by the process's device count: pinned here, so
      # every topology runs the same code and gets the same bits.
      model_cfg = ml_collections.ConfigDict({**model_cfg.to_dict(), "conv": "xla"})
    self.model = models.get(model_cfg, self.spec.num_classes, self.dtype, self.spec.image_shape)
    self.task = tasks.get(config.task, self.spec.num_classes)
    self.tx, self.schedule = optimizers.make(
      config.optimizer,
      config.schedule,
      steps_per_epoch=self.plan.steps_per_epoch,
      total_steps=self.plan.total_steps,
    )
    self.train_metrics = metrics_lib.train_metrics(self.task.metric_names)
    self.eval_metrics = metrics_lib.eval_metrics(self.task.metric_names)
    self._chunk_fn = make_train_chunk(
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
    self._train_chunk = None
    self._evaluate, self._predict = {}, {}  # Compiled per eval chunk length.

  # ------------------------------------------------------------- state

  def init_state(self) -> TrainState:
    return init_state(
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

  def train_chunk(self, state: TrainState, start_step: int, num_steps: int):
    """Runs steps start_step+1..start_step+num_steps; returns (state, metrics, bad step)."""
    batches = self.data.train_batches(start_step, num_steps, self.plan.steps_per_dispatch)
    if self._train_chunk is None:  # Compiled at the first chunk, with the input's specs.
      self._train_chunk = self.par.compile(
        self._chunk_fn,
        in_specs=(parallel.REPLICATED, batches.specs, parallel.REPLICATED),
        out_specs=parallel.REPLICATED,
        donate_argnums=(0,),
      )
    return self._train_chunk(state, batches.inputs, np.int32(num_steps))

  def evaluate(self, state: TrainState) -> dict:
    """Exact metrics over the whole eval split: every example counted once."""
    total = None
    for batches in self.data.eval_batches():
      steps = batches.inputs["mask"].shape[0]
      if steps not in self._evaluate:
        self._evaluate[steps] = self.par.compile(
          make_eval(self.model, self.task, self.dtype, steps, self.eval_metrics, self.norm),
          in_specs=(parallel.REPLICATED, batches.specs),
          out_specs=parallel.REPLICATED,
        )
      chunk = self._evaluate[steps](state, batches.inputs)  # No host wait between chunks.
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
      steps = batches.inputs["mask"].shape[0]
      if steps not in self._predict:
        self._predict[steps] = self.par.compile(
          make_predict(self.model, self.task, self.dtype, steps, self.norm),
          in_specs=(parallel.REPLICATED, batches.specs),
          out_specs=parallel.STEPS_BATCH,
        )
      out = self._predict[steps](state, batches.inputs)
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
    return self.par.to_host({"params": eval_params(state), **state.model_state})

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
    flops = step_flops(
      self.model,
      self.task,
      self.spec.image_shape,
      self.config.batch_size // self.par.num_devices,
      self.dtype,
    )
    return flops * self.par.num_devices if flops else None


# ------------------------------------------------------------------- the loop


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
  exp = Experiment(config, par)
  par, plan = exp.par, exp.plan
  logging.info(
    "Devices: %s; global batch %d = %d per device; %d steps (%d per epoch); data %s.",
    par.describe(),
    config.batch_size,
    config.batch_size // par.num_devices,
    plan.total_steps,
    plan.steps_per_epoch,
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
  writer = metric_writers.create_default_writer(
    workdir, just_logging=par.process_index > 0, asynchronous=True
  )
  ckpt = exp.checkpointer(workdir)
  state = exp.init_state()
  # The newest readable checkpoint: an unreadable one is reported, moved aside and the
  # previous one used; one of another model or optimizer is a UserError.
  restored, start_step = ckpt.restore_latest(state)
  if restored is not None:
    state = restored
    logging.info("Resumed from the checkpoint at step %d.", start_step)
  else:
    if config.init_from:  # Only for a new run: resuming continues the run's own state.
      params = checkpointing.load_params(config.init_from, state.params)
      opt_init = jax.jit(exp.tx.init, out_shardings=par.sharding(parallel.REPLICATED))
      state = state.replace(params=params, opt_state=opt_init(params))
      if jax.tree.leaves(state.ema_params):
        state = state.replace(ema_params=params)
      logging.info("Initialized the params from %s.", config.init_from)
    workdirs.write_config(workdir, config, par)
    writer.write_hparams(workdirs.flat_config(config))
    parameter_overview.log_parameter_overview(par.to_host(state.params))
  step = int(par.to_host(state.step))

  report = periodic_actions.ReportProgress(
    num_train_steps=plan.total_steps, writer=writer, every_steps=config.log_every_steps
  )
  best_key = exp.task.best_metric
  # Signal handlers only while training: they are put back on every way out.
  try:
    with preemption.Stopper(par, check_every=plan.log_every) as stopper:
      train_metrics = None
      timing = {
        "first_step_s": None,
        "compile_s": None,
        "steady_start": None,
        "steady_steps": 0,
        "paused_s": 0.0,
      }
      eval_result = None
      # The non-finite flag of the chunk before this one: checked after the next chunk is
      # dispatched, so the host never waits for the device inside the loop (at most two
      # chunks in flight). A bad chunk is never saved: every save checks first.
      unchecked = None

      def check(chunk):
        if chunk is not None:
          bad, chunk_metrics = chunk
          bad = int(par.to_host(bad))
          if bad >= 0:
            _fail_nonfinite(bad, par.to_host(chunk_metrics).compute(), ckpt, writer)

      while step < plan.total_steps:
        n = plan.next_stop(step) - step
        t = time.time()
        state, chunk_metrics, bad = exp.train_chunk(state, step, n)
        check(unchecked)
        unchecked = (bad, chunk_metrics)
        if timing["first_step_s"] is None:  # The first chunk compiles: time it alone.
          check(unchecked)
          unchecked = None
          timing["first_step_s"] = time.time() - start_time
          timing["compile_s"] = time.time() - t
          timing["steady_start"] = time.time()
          timing["input_wait_start"] = exp.data.input_wait_s
        else:
          timing["steady_steps"] += n
        for s in range(step + 1, step + n + 1):  # ReportProgress wants every step.
          report(s)
        step += n
        train_metrics = (
          chunk_metrics if train_metrics is None else train_metrics.merge(chunk_metrics)
        )
        logged = None
        stop = stopper.should_stop(step)
        if (
          step % plan.log_every == 0
          or step == plan.total_steps
          or stop
          or step % plan.eval_every == 0
          or step % plan.checkpoint_every == 0
        ):
          check(unchecked)  # Before anything is logged, evaluated or saved.
          unchecked = None
          exp.data.raise_if_failed()  # Agreed by all processes: no blank batch is saved.
        if step % plan.log_every == 0 or step == plan.total_steps:
          values = par.to_host(train_metrics).compute()
          logged = {f"train_{k}": float(v) for k, v in values.items()}
          writer.write_scalars(step, logged)
          train_metrics = None
        if progress is not None:
          progress.update(step, logged)
        eval_result = None
        paused = time.time()
        if step % plan.eval_every == 0 or step == plan.total_steps:
          with report.timed("eval"):
            eval_result = exp.evaluate(state)
          writer.write_scalars(step, {k: v for k, v in eval_result.items() if k != "eval_examples"})
          logging.info(
            "Step %d: eval %s (%d examples).",
            step,
            ", ".join(
              f"{k[5:].replace('_', ' ')} {v:.4f}"
              for k, v in eval_result.items()
              if k != "eval_examples"
            ),
            eval_result["eval_examples"],
          )
        if step % plan.checkpoint_every == 0 or step == plan.total_steps or stop:
          with report.timed("checkpoint"):
            metrics = {best_key: eval_result[best_key]} if eval_result else None
            ckpt.save(step, state, metrics=metrics, force=True)
        timing["paused_s"] += time.time() - paused
        if stop:
          ckpt.wait()
          writer.flush()
          if progress is not None:
            progress.close()
          logging.info(
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
        logging.info(
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
          }
          workdirs.write_summary(workdir, previous, par)
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
        "data_source": exp.data.description,
      }
      workdirs.write_summary(workdir, summary, par)
      return summary
  except asynclib.AsyncError as e:  # TensorBoard writes failed (e.g. a full disk).
    _fail_writing_metrics(e, ckpt, workdir)
  finally:
    exp.data.close()  # Stops the input workers of a streamed source.


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


def _fail_writing_metrics(error, ckpt, workdir):
  ckpt.wait()  # A failed checkpoint save (e.g. the disk is full) is the clearer message.
  cause = error.__cause__ or error
  raise UserError(
    f"Could not write the TensorBoard metrics in {workdir} ("
    f"{' '.join(str(cause).split())[:200]}): free space or use another --workdir; the last "
    "complete checkpoint is kept."
  ) from error


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
