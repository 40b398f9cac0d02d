"""Data augmentation on the device, per example, on the fly (train only).

Each example's random draws come from `(seed, step, position in the global batch)`,
so augmented batches, like the batches themselves, do not depend on the number of
devices or processes, and a resumed run sees exactly the same ones.

Options (`config.augment`):
  crop_padding: pad by this many pixels (zeros) and crop back at a random offset;
  flip: mirror left-right with probability 1/2;
  randaugment_num_ops, randaugment_magnitude: RandAugment, after crop and flip and
    before erasing as in timm (flaxtrain/data/randaugment.py; 0 ops: off);
  erase_prob: with this probability, fill a random rectangle (2%-33% of the image,
    aspect 0.3-3.3) with uniform noise (random erasing, Zhong et al. 2017).
"""

import jax
import jax.numpy as jnp
import ml_collections

from flaxtrain.data import randaugment
from flaxtrain.errors import UserError

# RandAugment's key is folded from the example's key, so that the crop, flip and erasing
# draws (split from that key) are the same with RandAugment on or off.
_RANDAUGMENT_STREAM = 0x52414E44  # "RAND"


def validate(cfg: ml_collections.ConfigDict, image_shape):
  h, w, _ = image_shape
  p = cfg.crop_padding
  if not isinstance(p, int) or isinstance(p, bool) or p < 0 or p >= min(h, w):
    raise UserError(f"augment.crop_padding must be an integer in [0, {min(h, w)}), got {p!r}.")
  if not 0.0 <= cfg.erase_prob <= 1.0:
    raise UserError(f"augment.erase_prob must be in [0, 1], got {cfg.erase_prob}.")
  n = cfg.get("randaugment_num_ops", 0)
  if not isinstance(n, int) or isinstance(n, bool) or n < 0:
    raise UserError(f"augment.randaugment_num_ops must be an integer >= 0 (0: off), got {n!r}.")
  m = cfg.get("randaugment_magnitude", 0.0)
  top = randaugment.MAX_MAGNITUDE
  if isinstance(m, bool) or not isinstance(m, int | float) or not 0 <= m <= top:
    raise UserError(
      f"augment.randaugment_magnitude must be a number in [0, {top:g}] (timm's scale:"
      f" 10 is the full standard op), got {m!r}."
    )
  if n and image_shape[-1] not in (1, 3):
    raise UserError(
      f"RandAugment needs images with 1 or 3 channels, got {image_shape[-1]};"
      " set augment.randaugment_num_ops=0."
    )


def enabled(cfg) -> bool:
  return bool(cfg.crop_padding or cfg.flip or cfg.erase_prob or cfg.get("randaugment_num_ops"))


def _one(image, key, cfg):
  """image: float [H, W, C] in [0, 1]."""
  h, w, c = image.shape
  k_crop, k_flip, k_erase = jax.random.split(key, 3)
  if cfg.crop_padding:
    p = cfg.crop_padding
    padded = jnp.pad(image, ((p, p), (p, p), (0, 0)))
    dy, dx = jax.random.randint(k_crop, (2,), 0, 2 * p + 1)
    image = jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, c))
  if cfg.flip:
    image = jnp.where(jax.random.bernoulli(k_flip), image[:, ::-1, :], image)
  if cfg.get("randaugment_num_ops"):
    k_ra = jax.random.fold_in(key, _RANDAUGMENT_STREAM)
    image = randaugment.apply(
      image, k_ra, cfg.randaugment_num_ops, float(cfg.randaugment_magnitude)
    )
  if cfg.erase_prob:
    k_do, k_area, k_aspect, k_y, k_x, k_fill = jax.random.split(k_erase, 6)
    area = jax.random.uniform(k_area, (), minval=0.02, maxval=0.33) * h * w
    aspect = jnp.exp(jax.random.uniform(k_aspect, (), minval=jnp.log(0.3), maxval=jnp.log(1 / 0.3)))
    eh = jnp.clip(jnp.round(jnp.sqrt(area * aspect)), 1, h).astype(jnp.int32)
    ew = jnp.clip(jnp.round(jnp.sqrt(area / aspect)), 1, w).astype(jnp.int32)
    y0 = jax.random.randint(k_y, (), 0, h - eh + 1)
    x0 = jax.random.randint(k_x, (), 0, w - ew + 1)
    ys = jnp.arange(h)[:, None, None]
    xs = jnp.arange(w)[None, :, None]
    inside = (ys >= y0) & (ys < y0 + eh) & (xs >= x0) & (xs < x0 + ew)
    inside &= jax.random.bernoulli(k_do, cfg.erase_prob)
    noise = jax.random.uniform(k_fill, image.shape, image.dtype)
    image = jnp.where(inside, noise, image)
  return image


def apply(images, key, first_index, cfg):
  """Augments a per-device batch [B, H, W, C]; row i is global example first_index + i."""
  if not enabled(cfg):
    return images
  rows = first_index + jnp.arange(images.shape[0])
  keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(rows)
  return jax.vmap(lambda im, k: _one(im, k, cfg))(images, keys).astype(images.dtype)
