"""RandAugment (Cubuk et al. 2019) in JAX, per example on the device.

Op set: timm's `_RAND_TRANSFORMS` (big_vision/TF autoaugment.py less Cutout, which is
flaxtrain's `augment.erase_prob`): AutoContrast, Equalize, Invert, Rotate, Posterize,
Solarize, SolarizeAdd, Color, Contrast, Brightness, Sharpness, ShearX, ShearY,
TranslateXRel, TranslateYRel. Each image draws `num_ops` ops uniformly with replacement
(as timm) and applies every one of them, in order (as big_vision/TF; timm applies each
with probability 1/2).

Magnitude m (timm's `_LEVEL_DENOM` = 10 scale; values up to 30 extrapolate as timm's
`mmax` and TF's uncapped levels do, clamped to each op's valid range). Levels follow
timm's "increasing" functions, so that m = 0 is the identity for every op:
  Rotate +-30 m/10 degrees; ShearX/Y +-0.3 m/10; TranslateX/YRel +-0.45 m/10 of the
  width/height; Color, Contrast, Brightness, Sharpness factor max(0.1, 1 +- 0.9 m/10);
  Solarize threshold 256 - int(256 m/10); SolarizeAdd +int(110 m/10) below 128;
  Posterize keeps 8 - int(4 m/10) bits (torchvision's 8 -> 4 bits; timm's increasing
  4 - int(4 m/10) keeps 4 bits at m = 0 and 0 bits, a black image, at m = 10).
Signs are random with probability 1/2. Geometric ops sample bilinearly (one of timm's two
random choices; TF uses nearest) with PIL's conventions (pixel centres, affine about the
top-left corner, rotation about the centre) and fill with 128/255 grey (TF/big_vision's
128; timm fills with the normalisation mean, 128 by default).

flaxtrain's deviation: AutoContrast, Equalize and Invert have no magnitude in timm or
big_vision. Here each is applied with probability min(1, m/10) (the standard op at
m >= 10, the identity at 0), the probability of an op as in timm's AugmentOp. Blending
the result with weight m/10 would be the other choice, but it turns Invert at m = 5 into
flat grey.

Pixels are floats in [0, 1] in and out. Posterize, Solarize(Add) and Equalize act on
round(255 x) as PIL's uint8 ops do (Equalize's 256-bin histograms and lookup table are
PIL's exactly); the other ops stay continuous. One channel (grey) works: Color is then
the identity and the rest act per channel.

Why on the device: streamed batches arrive there anyway, the draws stay a pure function
of (seed, step, example), and on a GPU/TPU these memory-bound ops cost microseconds per
image, whereas PIL on the host costs milliseconds per 224 image per core, with a few
host cores per chip. The price of vmap: every branch of the switch runs for every image
(the five geometric ops share one warp), and all branch outputs are live at once. Measured
on this shared 2-core CPU (jitted, num_ops=2, rough): 0.02 ms per 28x28x1 image, 0.2 ms
per 32x32x3 and 9-11 ms per 224x224x3 image (half of it Equalize's histogram scatter),
against 0.09 and 2.2 ms for two PIL ops on one host core: on a CPU-only run the host
would be ~4x cheaper at 224, which matters little at the small image sizes trained there.
"""

import jax
import jax.numpy as jnp

OPS = (
  "AutoContrast",
  "Equalize",
  "Invert",
  "Rotate",
  "Posterize",
  "Solarize",
  "SolarizeAdd",
  "Color",
  "Contrast",
  "Brightness",
  "Sharpness",
  "ShearX",
  "ShearY",
  "TranslateXRel",
  "TranslateYRel",
)
MAX_MAGNITUDE = 30.0
FILL = 128 / 255
_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
_UNLEVELLED = ("AutoContrast", "Equalize", "Invert")


# ------------------------------------------------------------- pixel ops


def _levels(x):
  """round(255 x) as int32: PIL's uint8 value of a float pixel."""
  return jnp.clip(jnp.round(x * 255), 0, 255).astype(jnp.int32)


def _blend(degenerate, image, factor):
  """PIL's ImageEnhance: factor 1 is the image, 0 the degenerate one; clipped to [0, 1]."""
  return jnp.clip(factor * image + (1 - factor) * degenerate, 0.0, 1.0)


def _grey(image):
  """PIL's "L" conversion (ITU-R 601-2 luma), [H, W, 1]."""
  if image.shape[-1] == 1:
    return image
  return image @ jnp.array([[0.299], [0.587], [0.114]], image.dtype)


def auto_contrast(image):
  lo = image.min(axis=(0, 1), keepdims=True)
  hi = image.max(axis=(0, 1), keepdims=True)
  scaled = (image - lo) / jnp.where(hi > lo, hi - lo, 1.0)
  return jnp.where(hi > lo, scaled, image)


def equalize(image):
  """PIL's ImageOps.equalize per channel; a channel with step 0 is left as it is."""
  q = _levels(image)

  def channel(qc):
    hist = jnp.bincount(qc.ravel(), length=256)
    step = (qc.size - hist[qc.max()]) // 255
    before = jnp.cumsum(hist) - hist  # Pixels below each level.
    lut = jnp.clip((step // 2 + before) // jnp.maximum(step, 1), 0, 255)
    return lut[qc], step > 0

  out, changed = jax.vmap(channel, in_axes=-1, out_axes=-1)(q)
  return jnp.where(changed, out.astype(image.dtype) / 255, image)


def invert(image):
  return 1.0 - image


def posterize(image, bits: int):
  if bits >= 8:
    return image
  shift = 8 - max(bits, 0)
  return ((_levels(image) >> shift) << shift).astype(image.dtype) / 255


def solarize(image, threshold):
  return jnp.where(_levels(image) < threshold, image, 1.0 - image)


def solarize_add(image, add, threshold=128):
  return jnp.where(_levels(image) < threshold, jnp.minimum(image + add / 255, 1.0), image)


def color(image, factor):
  if image.shape[-1] == 1:
    return image  # Saturation of grey.
  return _blend(_grey(image), image, factor)


def contrast(image, factor):
  mean = jnp.round(_grey(image).mean() * 255) / 255  # PIL rounds the grey mean.
  return _blend(mean, image, factor)


def brightness(image, factor):
  return jnp.clip(factor * image, 0.0, 1.0)


def sharpness(image, factor):
  """PIL's ImageEnhance.Sharpness: blend with the SMOOTH filter, border pixels unchanged."""
  h, w, _ = image.shape
  kernel = ((1, 1, 1), (1, 5, 1), (1, 1, 1))
  padded = jnp.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
  smooth = sum(
    kernel[dy][dx] * padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)
  )
  smooth = smooth / 13
  ys = jnp.arange(h)[:, None, None]
  xs = jnp.arange(w)[None, :, None]
  interior = (ys > 0) & (ys < h - 1) & (xs > 0) & (xs < w - 1)
  return _blend(jnp.where(interior, smooth, image), image, factor)


# ------------------------------------------------------------- geometric ops


def warp(image, matrix, fill=FILL):
  """PIL's Image.transform(AFFINE, matrix, BILINEAR, fillcolor): output pixel centre
  (x, y) samples the input at (a x + b y + c, d x + e y + f); outside the input: fill."""
  h, w, _ = image.shape
  a, b, c, d, e, f = (matrix[i] for i in range(6))
  yo = jnp.arange(h, dtype=jnp.float32)[:, None] + 0.5
  xo = jnp.arange(w, dtype=jnp.float32)[None, :] + 0.5
  xi = a * xo + b * yo + c
  yi = d * xo + e * yo + f
  inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
  u, v = xi - 0.5, yi - 0.5
  x0, y0 = jnp.floor(u), jnp.floor(v)
  fx, fy = (u - x0)[..., None], (v - y0)[..., None]
  # Neighbours past the edge repeat it (PIL); only centres outside the image take the fill.
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  x0, x1 = jnp.clip(x0, 0, w - 1), jnp.clip(x0 + 1, 0, w - 1)
  y0, y1 = jnp.clip(y0, 0, h - 1), jnp.clip(y0 + 1, 0, h - 1)
  top = (1 - fx) * image[y0, x0] + fx * image[y0, x1]
  bottom = (1 - fx) * image[y1, x0] + fx * image[y1, x1]
  out = (1 - fy) * top + fy * bottom
  return jnp.where(inside[..., None], out, jnp.asarray(fill, image.dtype))


def rotate_matrix(degrees, h, w):
  """PIL's Image.rotate(degrees): counter-clockwise about the centre."""
  angle = -jnp.deg2rad(degrees)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  cx, cy = w / 2, h / 2
  return jnp.stack(
    [cos, sin, -cos * cx - sin * cy + cx, -sin, cos, sin * cx - cos * cy + cy]
  ).astype(jnp.float32)


def _affine(*rows):
  return jnp.stack([jnp.asarray(r, jnp.float32) for r in rows])


def _matrix(name, level, h, w):
  """The affine matrix of a geometric op at a signed level (timm's argument)."""
  if name == "Rotate":
    return rotate_matrix(level, h, w)
  if name == "ShearX":
    return _affine(1, level, 0, 0, 1, 0)
  if name == "ShearY":
    return _affine(1, 0, 0, level, 1, 0)
  if name == "TranslateXRel":
    return _affine(1, 0, level * w, 0, 1, 0)
  return _affine(1, 0, 0, 0, 1, level * h)  # TranslateYRel


# ------------------------------------------------------------- RandAugment


def _magnitudes(magnitude: float):
  """timm's increasing level -> argument rules; sign-free parts, static per run."""
  m = magnitude / 10
  return {
    "Rotate": 30 * m,
    "ShearX": 0.3 * m,
    "ShearY": 0.3 * m,
    "TranslateXRel": 0.45 * m,
    "TranslateYRel": 0.45 * m,
    "enhance": 0.9 * m,
    "Posterize": 8 - int(4 * m),
    "Solarize": max(256 - int(256 * m), 0),
    "SolarizeAdd": int(110 * m),
    "apply": min(m, 1.0),
  }


def _ops(shape, magnitude: float, sign, applied):
  """name -> (image -> image) for every op at `magnitude`, with a drawn sign and, for the
  magnitude-free ops, a drawn decision to apply."""
  h, w, _ = shape
  lv = _magnitudes(magnitude)
  factor = jnp.maximum(0.1, 1.0 + sign * lv["enhance"])
  maybe = lambda f: lambda im: jnp.where(applied, f(im), im)
  geometric = lambda name: lambda im: warp(im, _matrix(name, sign * lv[name], h, w))
  ops = {
    "AutoContrast": maybe(auto_contrast),
    "Equalize": maybe(equalize),
    "Invert": maybe(invert),
    "Posterize": lambda im: posterize(im, lv["Posterize"]),
    "Solarize": lambda im: solarize(im, lv["Solarize"]),
    "SolarizeAdd": lambda im: solarize_add(im, lv["SolarizeAdd"]),
    "Color": lambda im: color(im, factor),
    "Contrast": lambda im: contrast(im, factor),
    "Brightness": lambda im: brightness(im, factor),
    "Sharpness": lambda im: sharpness(im, factor),
  }
  ops.update({name: geometric(name) for name in _GEOMETRIC})
  return ops


def _draws(u):
  """Three uniform numbers -> (op index, sign, number to compare with the apply chance)."""
  op = jnp.minimum(jnp.floor(u[0] * len(OPS)), len(OPS) - 1).astype(jnp.int32)
  return op, jnp.where(u[1] < 0.5, -1.0, 1.0), u[2]


def apply_op(image, name: str, key, magnitude: float):
  """One named op at `magnitude`, its random sign (and application) drawn from `key`."""
  _, sign, u = _draws(jax.random.uniform(key, (3,)))
  return _ops(image.shape, magnitude, sign, u < _magnitudes(magnitude)["apply"])[name](image)


def _random_op(image, draws, magnitude: float):
  h, w, _ = image.shape
  op, sign, u = _draws(draws)
  lv = _magnitudes(magnitude)
  ops = _ops(image.shape, magnitude, sign, u < lv["apply"])
  # Under vmap every branch runs for every image, so the five geometric ops share one
  # warp whose matrix is picked from a table (identity rows for the other ops).
  identity = _affine(1, 0, 0, 0, 1, 0)
  table = jnp.stack([_matrix(n, sign * lv[n], h, w) if n in _GEOMETRIC else identity for n in OPS])
  names = [n for n in OPS if n not in _GEOMETRIC]
  branches = [ops[n] for n in names] + [lambda im: warp(im, table[op])]
  branch_of_op = jnp.array([names.index(n) if n in names else len(names) for n in OPS])
  return jax.lax.switch(branch_of_op[op], branches, image)


def apply(image, key, num_ops: int, magnitude: float):
  """RandAugments one float image [H, W, C] in [0, 1] (C is 1 or 3): num_ops random ops."""
  # One draw of all the numbers: each random call adds a threefry hash to compile and run.
  draws = jax.random.uniform(key, (num_ops, 3))
  image, _ = jax.lax.scan(lambda im, d: (_random_op(im, d, magnitude), None), image, draws)
  return image
