"""Mixup and CutMix on the device, in the train step, with timm's per-example semantics.

timm's `Mixup(mode='elem')`: with probability `mix_prob` an example is mixed at all; when
both alphas are > 0, CutMix is chosen with probability `mix_switch_prob`, else Mixup;
lam ~ Beta(alpha, alpha) of the chosen kind. Mixup blends the image with its partner's,
lam x + (1 - lam) x'; CutMix pastes the partner's pixels into a box of area ~(1 - lam),
clipped to the image, and lam becomes the area actually kept (timm's `correct_lam`).
Targets are label-smoothed one-hots, mixed with the same lam: lam y + (1 - lam) y'.

The partner of global example g is g ^ 1 (timm pairs i with the batch flipped): with an
even per-device batch it is always on the same device. Each example's draws come from
`(key, g)`, so mixed batches do not depend on the number of devices or processes.
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax

from flaxtrain.errors import UserError

# .get: a config.json of a run from before these keys lacks them.
DEFAULTS = {"mixup_alpha": 0.0, "cutmix_alpha": 0.0, "mix_prob": 1.0, "mix_switch_prob": 0.5}


def enabled(cfg: ml_collections.ConfigDict) -> bool:
  return cfg.get("mixup_alpha", 0.0) > 0 or cfg.get("cutmix_alpha", 0.0) > 0


def validate(
  cfg: ml_collections.ConfigDict, task_name: str, task_kind: str, per_device: int, num_devices: int
):
  """cfg: config.augment; per_device: the per-device batch size on num_devices devices."""
  for key in ("mixup_alpha", "cutmix_alpha"):
    v = cfg.get(key, DEFAULTS[key])
    if not isinstance(v, int | float) or isinstance(v, bool) or not v >= 0:
      raise UserError(f"augment.{key} must be a number >= 0 (0: off), got {v!r}.")
  for key in ("mix_prob", "mix_switch_prob"):
    v = cfg.get(key, DEFAULTS[key])
    if not isinstance(v, int | float) or isinstance(v, bool) or not 0 <= v <= 1:
      raise UserError(f"augment.{key} must be in [0, 1], got {v!r}.")
  if not enabled(cfg):
    return
  if task_kind != "classification":
    raise UserError(
      f"Mixup and CutMix mix class labels, which task {task_name!r} does not have: set "
      "--config.augment.mixup_alpha=0 and --config.augment.cutmix_alpha=0."
    )
  if per_device % 2:
    raise UserError(
      f"Mixup and CutMix pair each example with a neighbour on its device, so the "
      f"per-device batch must be even, got {per_device}: set --config.batch_size to a "
      f"multiple of {2 * num_devices}."
    )


def draw(key, image_hw, cfg):
  """One example's (lam, cutmix, box=(y0, y1, x0, x1)); lam is 1 when it is not mixed."""
  h, w = image_hw
  k_switch, k_lam, k_apply, k_y, k_x = jax.random.split(key, 5)
  if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
    cutmix = jax.random.uniform(k_switch) < cfg.mix_switch_prob
  else:
    cutmix = jnp.asarray(cfg.cutmix_alpha > 0)
  alpha = jnp.where(cutmix, jnp.float32(cfg.cutmix_alpha), jnp.float32(cfg.mixup_alpha))
  lam = jax.random.beta(k_lam, alpha, alpha, dtype=jnp.float32)
  lam = jnp.where(jax.random.uniform(k_apply) < cfg.mix_prob, lam, 1.0)
  # timm's rand_bbox: a box of sides ~sqrt(1 - lam) around a uniform centre, clipped.
  ratio = jnp.sqrt(1.0 - lam)
  half_h = jnp.floor(h * ratio).astype(jnp.int32) // 2
  half_w = jnp.floor(w * ratio).astype(jnp.int32) // 2
  cy = jax.random.randint(k_y, (), 0, h)
  cx = jax.random.randint(k_x, (), 0, w)
  box = (
    jnp.clip(cy - half_h, 0, h),
    jnp.clip(cy + half_h, 0, h),
    jnp.clip(cx - half_w, 0, w),
    jnp.clip(cx + half_w, 0, w),
  )
  area = (box[1] - box[0]) * (box[3] - box[2])
  lam = jnp.where(cutmix, 1.0 - area.astype(jnp.float32) / (h * w), lam)
  return lam, cutmix, box


def partner(v):
  """Rows swapped in neighbouring pairs: row i becomes row i ^ 1."""
  return v.reshape((v.shape[0] // 2, 2, *v.shape[1:]))[:, ::-1].reshape(v.shape)


def _blend(images, one_hot, draws):
  lam, cutmix, (y0, y1, x0, x1) = draws
  _, h, w, _ = images.shape
  other = partner(images)
  col = lambda v: v[:, None, None, None]  # noqa: E731
  ys = jnp.arange(h)[None, :, None, None]
  xs = jnp.arange(w)[None, None, :, None]
  inside = (ys >= col(y0)) & (ys < col(y1)) & (xs >= col(x0)) & (xs < col(x1))
  lam4 = col(lam).astype(images.dtype)
  blended = images * lam4 + other * (1 - lam4)
  mixed = jnp.where(col(cutmix), jnp.where(inside, other, images), blended)
  targets = lam[:, None] * one_hot + (1.0 - lam[:, None]) * partner(one_hot)
  return mixed, targets


def apply(images, labels, key, first_index, cfg, num_classes: int, smoothing: float = 0.0):
  """Mixes one device's batch; row i is global example first_index + i (first_index even).

  images: float [B, H, W, C]; labels: int [B]. Returns the mixed images, the soft targets
  [B, num_classes] (float32, label smoothing applied) and each row's dominant label (its
  own when lam >= 1/2, else its partner's), for accuracy.
  """
  b, h, w, _ = images.shape
  rows = first_index + jnp.arange(b)
  draws = jax.vmap(lambda r: draw(jax.random.fold_in(key, r), (h, w), cfg))(rows)
  lam = draws[0]
  one_hot = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
  # A conditional's branch is a fusion boundary on XLA:CPU, which would otherwise fuse the
  # blend into each topology's own slices of the batch and contract a*b + c into fused
  # multiply-adds differently: the branch keeps mixed batches bitwise topology-invariant.
  mixed, targets = jax.lax.cond(
    jnp.any(lam < 1), _blend, lambda x, y, _: (x, y), images, one_hot, draws
  )
  dominant = jnp.where(lam >= 0.5, labels, partner(labels))
  return mixed, targets, dominant
