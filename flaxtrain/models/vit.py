"""Vision Transformer in Flax NNX: big_vision's plain ViT and the classic (timm) ViT.

pool='gap', posemb='sincos2d' is big_vision's plain ViT (no class token, fixed 2-D
sin-cos position embedding, final LayerNorm, global average pool, zero-init head).
pool='token', posemb='learn' is the classic ViT of the paper and timm's
`vit_*_patch*_224` (class token, learned position embedding over 1 + N tokens); its
parameters load from a timm state dict with `params_from_timm`.

Submodule names follow timm's state-dict keys (patch_embed, cls_token, pos_embed,
blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm, head). Dropout and
stochastic depth draw from the 'dropout' stream of the constructor's `rngs`; build the
model with `nnx.Rngs(params=..., dropout=...)` so that `nnx.reseed(model, dropout=key)`
reaches every stream. `model.train()` / `model.eval()` switch them on and off.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxtrain import pretrained
from flaxtrain.errors import UserError

# width, depth, heads, mlp_dim: Table 2 of https://arxiv.org/abs/2106.04560 (as timm).
VARIANTS = {
  "Ti": (192, 12, 3, 768),
  "S": (384, 12, 6, 1536),
  "B": (768, 12, 12, 3072),
  "L": (1024, 24, 16, 4096),
}
PATCH_SIZES = (8, 14, 16, 32)
POOLS = ("gap", "token")
POSEMBS = ("sincos2d", "learn")

_xavier = nnx.initializers.xavier_uniform()
_tiny_normal = nnx.initializers.normal(stddev=1e-6)


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """big_vision's fixed 2-D sin-cos position embedding (MoCo v3), shape [1, h*w, width]."""
  y, x = np.mgrid[:h, :w]
  omega = np.arange(width // 4) / (width // 4 - 1)
  omega = 1.0 / temperature**omega
  y = y.reshape(-1)[:, None] * omega[None, :]
  x = x.reshape(-1)[:, None] * omega[None, :]
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return pe[None].astype(np.float32)


class DropPath(nnx.Module):
  """Stochastic depth: zeroes whole examples of a residual branch with probability `rate`.

  Kept examples are scaled by 1 / (1 - rate). `eval()` sets `deterministic` and turns it off.
  """

  def __init__(self, rate: float, *, deterministic: bool = False, rngs: nnx.Rngs):
    self.rate = rate
    self.deterministic = deterministic
    # A stream of its own forked from 'dropout', as nnx.Dropout does, keeps the tag
    # 'dropout' so nnx.reseed(model, dropout=key) reaches it.
    self.rngs = rngs["dropout"].fork()

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.rngs(), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


class Attention(nnx.Module):
  """Multi-head self-attention with a fused qkv projection (timm's layout: [3, heads, head_dim])."""

  def __init__(self, width: int, heads: int, dropout: float, *, dtype, rngs: nnx.Rngs):
    self.heads = heads
    linear = dict(dtype=dtype, param_dtype=jnp.float32, kernel_init=_xavier, rngs=rngs)
    self.qkv = nnx.Linear(width, 3 * width, **linear)
    self.proj = nnx.Linear(width, width, **linear)
    self.proj_drop = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads)
    # Logits and softmax run in float32 inside dot_product_attention, also for bf16 inputs.
    y = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    return self.proj_drop(self.proj(y.reshape(b, n, d)))


class Mlp(nnx.Module):
  """fc1 -> exact (erf) GELU, as torch's nn.GELU in timm -> dropout -> fc2 -> dropout."""

  def __init__(self, width: int, mlp_dim: int, dropout: float, *, dtype, rngs: nnx.Rngs):
    linear = dict(
      dtype=dtype, param_dtype=jnp.float32, kernel_init=_xavier, bias_init=_tiny_normal, rngs=rngs
    )
    self.fc1 = nnx.Linear(width, mlp_dim, **linear)
    self.drop1 = nnx.Dropout(dropout, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_dim, width, **linear)
    self.drop2 = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.drop1(jax.nn.gelu(self.fc1(x), approximate=False))
    return self.drop2(self.fc2(x))


class Block(nnx.Module):
  """Pre-LayerNorm transformer block with stochastic depth on both residual branches."""

  def __init__(
    self, width, heads, mlp_dim, *, dropout: float, drop_path: float, dtype, rngs: nnx.Rngs
  ):
    norm = dict(epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.norm1 = nnx.LayerNorm(width, **norm)
    self.attn = Attention(width, heads, dropout, dtype=dtype, rngs=rngs)
    self.drop_path1 = DropPath(drop_path, rngs=rngs)
    self.norm2 = nnx.LayerNorm(width, **norm)
    self.mlp = Mlp(width, mlp_dim, dropout, dtype=dtype, rngs=rngs)
    self.drop_path2 = DropPath(drop_path, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.drop_path1(self.attn(self.norm1(x)))
    return x + self.drop_path2(self.mlp(self.norm2(x)))


def _decode_variant(variant: str) -> tuple[int, int, int, int, int]:
  size, _, patch = variant.partition("/")
  if size not in VARIANTS or not patch.isdigit() or int(patch) not in PATCH_SIZES:
    names = ", ".join(f"'{s}/{p}'" for s in VARIANTS for p in (16, 32))
    raise UserError(
      f"model.variant={variant!r} is not a ViT variant; use one of {names} "
      f"(patch sizes {', '.join(map(str, PATCH_SIZES))} are accepted)."
    )
  return (*VARIANTS[size], int(patch))


class ViT(nnx.Module):
  """Vision Transformer classifier: NHWC images of `dtype` -> float32 logits [B, num_classes].

  See `flaxtrain.config_lib.vit_model` for the fields. Computes in `dtype`, keeps float32
  parameters (nnx.Param only, no batch statistics) and starts in train mode, as nnx.Dropout
  does; call `eval()` for deterministic outputs.
  """

  def __init__(
    self,
    num_classes: int,
    *,
    image_shape: tuple[int, int, int],
    variant: str = "S/16",
    pool: str = "gap",
    posemb: str = "sincos2d",
    drop_path: float = 0.0,
    dropout: float = 0.0,
    width: int = 0,
    depth: int = 0,
    heads: int = 0,
    mlp_dim: int = 0,
    patch_size: int = 0,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    sizes = dict(width=width, depth=depth, heads=heads, mlp_dim=mlp_dim, patch_size=patch_size)
    for name, value in sizes.items():
      if value < 0:
        raise UserError(f"model.{name}={value} must be 0 (the variant's value) or positive.")
    defaults = dict(zip(sizes, _decode_variant(variant), strict=True))
    width, depth, heads, mlp_dim, patch = (sizes[k] or defaults[k] for k in sizes)
    if pool not in POOLS:
      raise UserError(f"model.pool={pool!r} is not one of {POOLS}; pick one of them.")
    if posemb not in POSEMBS:
      raise UserError(f"model.posemb={posemb!r} is not one of {POSEMBS}; pick one of them.")
    for name, rate in (("drop_path", drop_path), ("dropout", dropout)):
      if not 0.0 <= rate < 1.0:
        raise UserError(f"model.{name}={rate} must be in [0, 1).")
    if num_classes < 1:
      raise UserError(f"The ViT needs at least one class, got num_classes={num_classes}.")
    if len(image_shape) != 3:
      raise UserError(
        f"The ViT takes images of shape (height, width, channels), got {image_shape}."
      )
    h, w, c = image_shape
    if h % patch or w % patch:
      raise UserError(
        f"The image size {h}x{w} is not divisible by the ViT patch size {patch}; "
        "set model.patch_size to a divisor of both sides."
      )
    if width % heads:
      raise UserError(
        f"The ViT width {width} is not divisible by its {heads} heads; "
        "change model.width or model.heads."
      )
    if posemb == "sincos2d" and (width % 4 or width < 8):
      raise UserError(
        f"posemb='sincos2d' needs a width that is a multiple of 4 and at least 8, got {width}; "
        "change model.width or use posemb='learn'."
      )

    self.pool = pool
    self.posemb = posemb
    self.dtype = dtype
    n = (h // patch) * (w // patch)
    self.patch_embed = nnx.Conv(
      c,
      width,
      kernel_size=(patch, patch),
      strides=(patch, patch),
      padding="VALID",
      dtype=dtype,
      param_dtype=jnp.float32,
      rngs=rngs,
    )
    # Class token and learned posemb initialised as big_vision does (zeros, normal 1/sqrt(width)).
    if pool == "token":
      self.cls_token = nnx.Param(jnp.zeros((1, 1, width), jnp.float32))
    if posemb == "learn":
      # timm's classic layout: the class token has a position embedding of its own.
      shape = (1, n + (pool == "token"), width)
      init = nnx.initializers.normal(stddev=1 / np.sqrt(width))
      self.pos_embed = nnx.Param(init(rngs.params(), shape, jnp.float32))
    self.pos_drop = nnx.Dropout(dropout, rngs=rngs)
    # Stochastic depth rises linearly from 0 at the first block, as timm's dpr.
    rates = np.linspace(0.0, drop_path, depth)
    self.blocks = nnx.List(
      [
        Block(width, heads, mlp_dim, dropout=dropout, drop_path=float(r), dtype=dtype, rngs=rngs)
        for r in rates
      ]
    )
    self.norm = nnx.LayerNorm(width, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.head = nnx.Linear(
      width, num_classes, kernel_init=nnx.initializers.zeros, param_dtype=jnp.float32, rngs=rngs
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.patch_embed(x.astype(self.dtype))
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)
    if self.posemb == "sincos2d":
      # big_vision adds the fixed posemb to the patches only, before the class token.
      x = x + jnp.asarray(posemb_sincos_2d(gh, gw, d), self.dtype)
    if self.pool == "token":
      cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (b, 1, d))
      x = jnp.concatenate([cls, x], axis=1)
    if self.posemb == "learn":
      x = x + self.pos_embed[...].astype(self.dtype)
    x = self.pos_drop(x)
    for block in self.blocks:
      x = block(x)
    # big_vision's order: encoder_norm, then pool, then head; pool and head in float32 so
    # that bf16 compute still gives float32 logits.
    x = self.norm(x).astype(jnp.float32)
    x = x[:, 0] if self.pool == "token" else x.mean(axis=1)
    return self.head(x)


def _our_path(key: str) -> tuple:
  parts = key.split(".")
  if parts[:2] == ["patch_embed", "proj"]:
    parts = ["patch_embed"] + parts[2:]
  return tuple(int(p) if re.fullmatch(r"\d+", p) else p for p in parts)


def _resolve(tree, path: tuple) -> tuple[tuple, object]:
  """`path` spelt as `tree` spells it (block indices int as NNX's or str as flaxtrain's)."""
  spelt = []
  for part in path:
    part = next((p for p in (part, str(part)) if isinstance(tree, dict) and p in tree), None)
    if part is None:
      return tuple(spelt), None
    spelt.append(part)
    tree = tree[part]
  return tuple(spelt), tree


def _timm_layout(leaf: str, shape: tuple) -> tuple:
  """Our parameter shape written in timm's layout, for error messages."""
  return pretrained.torch_shape(shape) if leaf == "kernel" else tuple(shape)


def params_from_timm(state_dict: dict, params: dict) -> dict:
  """Maps a timm VisionTransformer state dict onto the pure-dict params of a ViT.

  `params` is `nnx.to_pure_dict(nnx.state(model, nnx.Param))` of a ViT built with
  posemb='learn' and the file's pooling, pool='token' for a class token or 'gap' for global
  average pooling (only its structure is read; block indices may be ints, as
  NNX spells them, or strings, as flaxtrain's variables do, and the result spells them
  the same way). Returns a pure dict
  of float32 numpy arrays holding exactly the state dict's keys, converted: conv weights
  OIHW -> HWIO, Linear weights transposed, LayerNorm weight -> scale. Any key with no
  place in `params`, or whose shape differs, raises a one-sentence UserError naming it;
  except the head: 'head.weight' / 'head.bias' are returned as found whatever their class
  count, and the caller compares them with `params` and re-initialises a head of another
  size.
  """
  out: dict = {}
  for key, value in state_dict.items():
    value = np.asarray(value, dtype=np.float32)
    path = _our_path(key)
    leaf = path[-1]
    if leaf == "weight":
      _, parent = _resolve(params, path[:-1])
      leaf = "kernel" if isinstance(parent, dict) and "kernel" in parent else "scale"
      path = path[:-1] + (leaf,)
    if leaf == "kernel":  # OIHW -> HWIO, (out, in) -> (in, out).
      value = pretrained.to_flax(value)
    path, target = _resolve(params, path)
    if target is None or isinstance(target, dict):
      raise UserError(
        f"The timm checkpoint key {key!r} has no place in flaxtrain's ViT "
        "(posemb='learn'); load a plain timm VisionTransformer checkpoint."
      )
    if path[0] != "head" and tuple(value.shape) != tuple(np.shape(target)):
      raise UserError(
        f"The timm checkpoint key {key!r} has shape {tuple(np.shape(state_dict[key]))} where "
        f"the model expects {_timm_layout(leaf, np.shape(target))}; build the ViT with the "
        "checkpoint's variant, patch size and image size."
      )
    node = out
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value
  return out
