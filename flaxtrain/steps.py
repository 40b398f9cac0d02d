"""Per-device code: the train state and the train/eval/predict step builders.

Everything here runs inside `parallel.DataParallel.compile` (jit + shard_map): one
device's share of the batch, collectives through `parallel`. `experiment.Experiment`
builds and compiles these; the loop never calls them directly.
"""

import functools
import os
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from flaxtrain import metrics as metrics_lib
from flaxtrain import optimizers, parallel
from flaxtrain.data import augment, mix
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


def all_finite(loss, grads) -> jax.Array:
  """Whether the loss and every gradient are free of NaN and +-inf, never a false alarm
  from large finite values (no sum of them can overflow)."""
  leaves = jax.tree.leaves(grads)
  if not leaves:
    return jnp.isfinite(loss)
  finite = jax.lax.platform_dependent(
    *leaves, cpu=_finite_by_products, default=_finite_by_reduction
  )
  return jnp.isfinite(loss) & finite


def _finite_by_reduction(*leaves):
  """all(isfinite) per leaf: one fused pass over each on an accelerator."""
  return functools.reduce(jnp.logical_and, [jnp.all(jnp.isfinite(g)) for g in leaves])


def _finite_by_products(*leaves):
  """The same on XLA:CPU, ~3x faster: each leaf times a vector of zeros, as a matrix-vector
  product (a vectorised library kernel, where XLA:CPU's own reductions are scalar loops).
  A product is 0 for a finite entry and NaN for a NaN or an infinity (inf * 0), so the
  sum of the products is finite exactly when every entry is, and cannot overflow."""
  total = jnp.float32(0.0)
  for g in leaves:
    m = g.reshape((-1, g.shape[-1]) if g.ndim else (1, 1))
    total = total + jnp.sum(m @ jnp.zeros((m.shape[1],), g.dtype)).astype(jnp.float32)
  return jnp.isfinite(total)


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
  mixing = mix.enabled(aug_cfg)
  ema_decay = config.ema_decay
  norm = normalization(config)
  # A linear probe (optimizer.freeze='backbone') runs the frozen backbone as it is
  # evaluated: BatchNorm with its running statistics, which stay as they are, and no
  # dropout or stochastic depth (as MoCo's and timm's linear probes put it in eval mode).
  freeze = config.optimizer.get("freeze", "none")
  probe = freeze == "backbone"
  # A regex freeze keeps the frozen BatchNorm layers' statistics too (models/adapters.py).
  norms = {} if freeze in ("none", "backbone") else {"frozen_norms": re.compile(freeze).search}

  # Frozen parameters (optimizer.freeze) get no gradient at all: the backward pass stops at
  # them (a linear probe runs the backbone forward only), and the gradients that are
  # summed, averaged across devices and checked for NaN are a list of the trained leaves.
  def frozen_flags(tree) -> list[bool]:
    if freeze == "none":
      return [False] * len(jax.tree.leaves(tree))
    return jax.tree.leaves(optimizers.frozen(tree, freeze))

  def trained(tree) -> list:
    """The leaves of a params-like tree that the optimizer trains."""
    return [x for x, f in zip(jax.tree.leaves(tree), frozen_flags(tree), strict=True) if not f]

  def with_zeros(params, leaves):
    """`params`' tree with the trained `leaves` and zeros for the frozen ones."""
    flat, treedef = jax.tree.flatten(params)
    it = iter(leaves)
    return treedef.unflatten(
      [
        jnp.zeros_like(p) if f else next(it)
        for p, f in zip(flat, frozen_flags(params), strict=True)
      ]
    )

  def micro_loss(params, model_state, x, batch, rng):
    if freeze != "none":
      frozen = optimizers.frozen(params, freeze)
      params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
    variables = {"params": params, **model_state}
    mutable = [*model_state, "losses"]
    outputs, new_vars = model.apply(
      variables, x, train=not probe, rngs={"dropout": rng}, mutable=mutable, **norms
    )
    aux = _sum_losses(new_vars.get("losses", {}))
    new_state = model_state if probe else {k: v for k, v in new_vars.items() if k != "losses"}
    per_example, task_metrics = task.loss(outputs, batch, x)
    loss = jnp.mean(per_example) + aux
    return loss, (new_state, per_example, task_metrics, aux)

  value_and_grad = jax.value_and_grad(micro_loss, has_aux=True)

  def grad_fn(params, *args):
    """(loss, aux), the gradients of the trained leaves (a list)."""
    out, grads = value_and_grad(params, *args)
    return out, trained(grads)

  def gradients(params, model_state, x, batch, rng):
    """Mean loss gradients (of the trained leaves) over this device's batch, in `accum`
    sequential micro-batches."""
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

    zeros = [jnp.zeros_like(p) for p in trained(params)]
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

  def train_step(state, batch, allowed):
    """-> (state after the step, metrics, finite). Only a finite step that is `allowed` is
    applied; otherwise params, optimizer state, model state and EMA stay as they were."""
    # Random draws are pure functions of (seed, step) and the example's (for augmentation
    # and mixing) or the device's (for dropout) position, so resumed runs repeat them exactly.
    step_key = jax.random.fold_in(base_key, state.step)
    device = parallel.device_index()
    local_batch = batch["label"].shape[0]
    # Augmented in [0, 1] (zero padding is black, erasing noise uniform), then normalised.
    x = preprocess(batch["image"], jnp.float32)
    x = augment.apply(x, jax.random.fold_in(step_key, 1), device * local_batch, aug_cfg)
    if mixing:  # Before normalising, which commutes with mixing; pairs stay on the device.
      x, target, label = mix.apply(
        x,
        batch["label"],
        jax.random.fold_in(step_key, 3),
        device * local_batch,
        aug_cfg,
        task.num_classes,
        config.task.label_smoothing,
      )
      batch = {**batch, "target": target, "label": label}
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
    # From the averaged loss and gradients: every device decides the same.
    finite = all_finite(loss, grads)
    applied = finite & allowed  # The same on every device: both are.
    grads = with_zeros(state.params, grads)  # The optimizer's tree.

    def update(grads, params, opt_state, ema_params):
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      if ema_decay:  # A frozen param's average is the param (both start equal): kept.
        d = ema_decay_at(state.step, ema_decay)
        flat, treedef = jax.tree.flatten(ema_params)
        ema_params = treedef.unflatten(
          [
            e if f else d * e + (1.0 - d) * p
            for e, p, f in zip(flat, jax.tree.leaves(params), frozen_flags(params), strict=True)
          ]
        )
      return params, opt_state, ema_params

    def keep(grads, params, opt_state, ema_params):
      return params, opt_state, ema_params

    def conditional(*operands):
      # No select over the whole state: no copies of the old state inside the loop.
      return jax.lax.cond(applied, update, keep, *operands)

    def selected(*operands):
      # An accelerator would wait on the predicate before either branch: a select instead.
      return jax.tree.map(lambda n, o: jnp.where(applied, n, o), update(*operands), keep(*operands))

    operands = (grads, state.params, state.opt_state, state.ema_params)
    if shards:
      # XLA:CPU contracts a*b + c into one fused multiply-add depending on what else a
      # fusion holds, e.g. the gradient sum, which differs by topology. A conditional's
      # branch is a fusion boundary: the update compiles to the same code on every topology.
      params, opt_state, ema_params = conditional(*operands)
    else:
      # Picked when the program is lowered, for the platform it is lowered for (describe
      # --topology lowers for an accelerator): the conditional on the CPU.
      params, opt_state, ema_params = jax.lax.platform_dependent(
        *operands, cpu=conditional, default=selected
      )
    if stop_on_nonfinite:  # 'error' keeps the step; 'skip' only moves the counter on.
      next_step = jnp.where(applied, state.step + 1, state.step)
    else:
      next_step = state.step + 1
    new = TrainState(
      step=next_step,
      params=params,
      opt_state=opt_state,
      model_state=jax.tree.map(
        lambda n, o: jnp.where(applied, n, o), model_state, state.model_state
      ),
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

  def guarded_step(state, batch, bad_before):
    """A non-finite step is never applied (`train_step` keeps params, optimizer and model
    state): 'error' also keeps the step counter, reports the step in `bad` and applies no
    step after it; 'skip' only moves the step counter on. `bad_before`: the first bad step
    so far (-1: none)."""
    if stop_on_nonfinite:
      allowed = bad_before < 0
      new, metrics, finite = train_step(state, batch, allowed)
      return new, metrics, jnp.where(allowed & ~finite, state.step, bad_before)
    new, metrics, _ = train_step(state, batch, jnp.bool_(True))
    return new, metrics, bad_before

  def chunk(state, inputs, num_steps, so_far=None, bad_so_far=None):
    """-> (state, metrics, first bad step or -1); the metrics (`metrics.Packed`) merged
    into `so_far` (e.g. those since the last log) if given. With `bad_so_far` >= 0 (a
    previous chunk's bad step, not yet read by the host) no step is applied and it is
    returned as it is."""
    bad = jnp.int32(-1) if bad_so_far is None else bad_so_far
    # The state's step is the chunk's first (a chunk after a bad step applies nothing).
    state, metrics, bad = steps_of(state, plan_lib.at_step(inputs, state.step), num_steps, bad)
    metrics = parallel.gather_metrics(metrics)
    if so_far is not None:
      metrics = so_far.unpack().merge(metrics)
    return state, metrics_lib.Packed.of(metrics), bad

  def steps_of(state, inputs, num_steps, bad):
    if max_steps == 1:
      # No loop: XLA:CPU runs convolutions whose kernels are loop-carried ~15x slower.
      return guarded_step(state, plan_lib.take(inputs, 0), bad)

    def cond(carry):
      i, _, _, bad = carry
      return (i < num_steps) & (bad < 0)

    def body(carry):
      i, state, metrics, bad = carry
      new, step_metrics, bad = guarded_step(state, plan_lib.take(inputs, i), bad)
      return i + 1, new, metrics.merge(step_metrics), bad

    carry = (jnp.int32(0), state, metrics_cls.empty(), bad)
    _, state, metrics, bad = jax.lax.while_loop(cond, body, carry)
    return state, metrics, bad

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

  jitted = jax.jit(init, out_shardings=par.sharding(parallel.REPLICATED))
  options = _INIT_OPTIONS.get(par.devices[0].platform)
  if options is None:  # Also where it is only traced (describe --topology's eval_shape).
    return jitted()
  return jitted.lower().compile(compiler_options=options)()


# The initializer runs once: on the CPU, XLA's full LLVM pipeline spends seconds on its
# random-number code (threefry); level 1 compiles fashion_cnn's in 0.96 s instead of 5.1 s,
# with bitwise the same values (tests/test_models.py checks it).
_INIT_OPTIONS = {"cpu": {"xla_backend_optimization_level": 1}}
