"""Optimizer and learning-rate schedule registries over optax."""

from collections.abc import Callable

import jax
import ml_collections
import optax

from flaxtrain import registry
from flaxtrain.errors import UserError


def _constant(cfg, lr, steps_per_epoch, total_steps):
  return optax.constant_schedule(lr)


def _cosine(cfg, lr, steps_per_epoch, total_steps):
  return optax.cosine_decay_schedule(lr, max(total_steps, 1), alpha=cfg.end_factor)


def _warmup_cosine(cfg, lr, steps_per_epoch, total_steps):
  warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
  return optax.warmup_cosine_decay_schedule(
    0.0,
    lr,
    warmup_steps=warmup,
    decay_steps=max(total_steps, warmup + 1),
    end_value=lr * cfg.end_factor,
  )


def _piecewise(cfg, lr, steps_per_epoch, total_steps):
  boundaries = {int(round(e * steps_per_epoch)): cfg.decay_factor for e in cfg.boundaries_epochs}
  return optax.piecewise_constant_schedule(lr, boundaries)


SCHEDULES: dict[str, Callable[..., optax.Schedule]] = {
  "constant": _constant,
  "cosine": _cosine,
  "warmup_cosine": _warmup_cosine,
  "piecewise": _piecewise,
}


def _sgd(cfg, lr):
  return optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov)


def _adam(cfg, lr):
  return optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)


def _adamw(cfg, lr):
  # Decoupled weight decay is applied inside adamw, see `make`.
  return optax.adamw(
    lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=_decay_mask(cfg)
  )


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
  "sgd": _sgd,
  "adam": _adam,
  "adamw": _adamw,
}


def _decay_mask(cfg):
  if cfg.weight_decay_mask == "all":
    return None
  # Biases and norm scales/offsets are vectors; kernels have >= 2 dims.
  return lambda params: jax.tree.map(lambda p: p.ndim > 1, params)


def validate(opt_cfg: ml_collections.ConfigDict, sched_cfg: ml_collections.ConfigDict):
  """Fails on unknown names or impossible values before anything is built."""
  registry.lookup(OPTIMIZERS, opt_cfg.name, "optimizer", "optimizer.name")
  registry.lookup(SCHEDULES, sched_cfg.name, "schedule", "schedule.name")
  if not opt_cfg.learning_rate > 0:
    raise UserError(
      f"optimizer.learning_rate must be > 0, got {opt_cfg.learning_rate}: "
      "set --config.optimizer.learning_rate to a positive number."
    )
  if opt_cfg.weight_decay < 0:
    raise UserError(f"optimizer.weight_decay must be >= 0, got {opt_cfg.weight_decay}.")
  if opt_cfg.weight_decay_mask not in ("kernels", "all"):
    raise UserError(
      f"optimizer.weight_decay_mask must be 'kernels' or 'all', got {opt_cfg.weight_decay_mask!r}."
    )
  if opt_cfg.grad_clip_norm is not None and not opt_cfg.grad_clip_norm > 0:
    raise UserError(
      f"optimizer.grad_clip_norm must be > 0 (or unset), got {opt_cfg.grad_clip_norm}."
    )


def make(
  opt_cfg, sched_cfg, *, steps_per_epoch: int, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optimizer chain, learning-rate schedule)."""
  validate(opt_cfg, sched_cfg)
  schedule = SCHEDULES[sched_cfg.name](
    sched_cfg, opt_cfg.learning_rate, steps_per_epoch, total_steps
  )
  parts = []
  if opt_cfg.grad_clip_norm is not None:
    parts.append(optax.clip_by_global_norm(opt_cfg.grad_clip_norm))
  if opt_cfg.weight_decay and opt_cfg.name != "adamw":
    parts.append(optax.add_decayed_weights(opt_cfg.weight_decay, mask=_decay_mask(opt_cfg)))
  parts.append(OPTIMIZERS[opt_cfg.name](opt_cfg, schedule))
  return optax.chain(*parts), schedule
