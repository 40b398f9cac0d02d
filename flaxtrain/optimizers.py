"""Optimizer and learning-rate schedule registries over optax; layer-wise LR decay and
frozen parameters for fine-tuning.

layer_decay < 1 scales each parameter's update as timm/BEiT's `param_groups_layer_decay`
scales its group's learning rate: with n blocks, the head (and final norm) gets 1, block
k (0-based) decay ** (n - k), the embeddings (a ViT's patch_embed/cls_token/pos_embed, a
ResNet's stem) decay ** (n + 1). Scaling the final update is scaling the learning rate:
the schedule and AdamW's decoupled weight decay (which torch also multiplies by the
group's rate) scale with it.

freeze: frozen parameters get zero updates, no weight decay and no optimizer state
(`optax.multi_transform` with `optax.set_to_zero`).
"""

import re
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
  decay = opt_cfg.get("layer_decay", 1.0)
  if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 < decay <= 1:
    raise UserError(
      f"optimizer.layer_decay must be in (0, 1] (1.0 turns it off), got {decay!r}: e.g. "
      "--config.optimizer.layer_decay=0.65 to fine-tune a ViT-B."
    )
  freeze = opt_cfg.get("freeze", "none")
  if not isinstance(freeze, str) or not freeze:
    raise UserError(
      f"optimizer.freeze must be 'none', 'backbone' or a regular expression, got {freeze!r}."
    )
  if freeze not in ("none", "backbone"):
    try:
      re.compile(freeze)
    except re.error as e:
      raise UserError(
        f"optimizer.freeze {freeze!r} is not a regular expression ({e}): pass 'none', "
        "'backbone' or a pattern of 'a/b/c' parameter paths, e.g. 'conv_init|bn_init'."
      ) from None


# ------------------------------------------------------------ layer decay and freezing

# A ViT's blocks (blocks/<i>/...) or a ResNet's residual blocks (BasicBlock_<i>, ...).
_BLOCK = re.compile(r"^(?:blocks/(\d+)|(?:BasicBlock|Bottleneck|WideBlock)_(\d+))(?:/|$)")
# Embeddings (ViT) and stems (ResNet, WideResNet): the layer below the first block.
_EMBED = re.compile(r"^(?:patch_embed|cls_token|pos_embed|reg_token|conv_init|bn_init)(?:/|$)")


def path_str(path) -> str:
  """A key path as 'a/b/c' (dict keys, sequence indices and attributes alike)."""
  parts = (getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
  return "/".join(str(p) for p in parts)


def _paths(params) -> list[str]:
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _block_id(path: str) -> int | None:
  m = _BLOCK.match(path)
  return None if m is None else int(m.group(1) or m.group(2))


def _layer_scale(params, decay: float) -> Callable[[str], float]:
  """'a/b/c' path -> its learning-rate factor under timm's layer decay."""
  blocks = [b for b in map(_block_id, _paths(params)) if b is not None]
  if not blocks:
    raise UserError(
      "optimizer.layer_decay needs a model made of blocks (a ViT's blocks/<i> or a "
      "ResNet's residual blocks) and this model has none: set "
      "--config.optimizer.layer_decay=1.0."
    )
  n = max(blocks) + 1

  def scale(path: str) -> float:
    block = _block_id(path)
    layer = 0 if _EMBED.match(path) else n + 1 if block is None else block + 1
    return decay ** (n + 1 - layer)

  return scale


def layer_scales(params, decay: float):
  """The learning-rate factor of every leaf of `params` (timm's layer decay)."""
  return _map_paths(_layer_scale(params, decay), params)


def head_name(params) -> str:
  """The classifier: a top-level 'head', else the last top-level linen Dense_<k>."""
  if "head" in params:
    return "head"
  dense = [k for k in params if re.fullmatch(r"Dense_\d+", str(k))]
  if not dense:
    raise UserError(
      "optimizer.freeze='backbone' trains only the head, and this model has none (no "
      "top-level 'head' or Dense layer): pass a regular expression of the parameters to "
      "freeze instead."
    )
  return max(dense, key=lambda k: int(k.split("_")[1]))


def frozen(params, freeze: str):
  """A tree of bools like `params`: True where optimizer.freeze freezes the leaf."""
  if freeze == "backbone":
    head = head_name(params)
    is_frozen = lambda path: path.split("/")[0] != head
  else:
    pattern = re.compile(freeze)
    is_frozen = lambda path: pattern.search(path) is not None
  tree = _map_paths(is_frozen, params)
  flags = jax.tree.leaves(tree)
  if freeze != "backbone" and not any(flags):
    raise UserError(
      f"optimizer.freeze {freeze!r} matches no parameter: match 'a/b/c' paths such as "
      f"{', '.join(_paths(params)[:3])}."
    )
  if all(flags):
    raise UserError(
      f"optimizer.freeze {freeze!r} freezes every parameter, so nothing would train: "
      "leave some unmatched."
    )
  return tree


def _map_paths(fn, params):
  return jax.tree_util.tree_map_with_path(lambda p, _: fn(path_str(p)), params)


def _scale_by_path(scale: Callable[[str], float]) -> optax.GradientTransformation:
  """Multiplies each update by `scale` of its 'a/b/c' path (leaves masked out by
  `multi_transform` are absent from `updates`, so paths, not a fixed tree)."""

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(lambda p, u: u * scale(path_str(p)), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make(
  opt_cfg, sched_cfg, *, steps_per_epoch: int, total_steps: int, params=None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optimizer chain, learning-rate schedule).

  `params`: the model's params tree (shapes suffice) or a function that returns it; read
  only for optimizer.layer_decay and optimizer.freeze.
  """
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
  decay, freeze = opt_cfg.get("layer_decay", 1.0), opt_cfg.get("freeze", "none")
  if decay == 1.0 and freeze == "none":
    return optax.chain(*parts), schedule
  params = params() if callable(params) else params
  if params is None:
    raise ValueError("optimizers.make needs `params` for layer_decay or freeze.")
  if decay != 1.0:
    parts.append(_scale_by_path(_layer_scale(params, decay)))
  tx = optax.chain(*parts)
  if freeze != "none":
    frozen(params, freeze)  # Fails here, at start-up, if the setting selects nothing.
    labels = lambda p: jax.tree.map(lambda f: "frozen" if f else "train", frozen(p, freeze))
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule
