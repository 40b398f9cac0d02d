"""ResNets (He et al. 2016) and Wide ResNets (Zagoruyko & Komodakis 2016) in linen.

`ResNet` follows torchvision's layout (parameter counts match it: ResNet-18 with 1000
classes on RGB has 11,689,512), with two stems: 'imagenet' (7x7/2 conv + 3x3/2 max
pool, for 224 px) and 'small' (one 3x3 conv, for 28-32 px images). `WideResNet` is
the pre-activation WRN-d-k of the paper, for 32 px images.

remat='block' wraps each residual block in `nn.remat`: its activations are recomputed
in the backward pass instead of kept, for less device memory at ~1/3 more compute. The
blocks keep their names (BasicBlock_0, ...), so parameters and checkpoints are the same
with and without it.

drop_path: stochastic depth (Huang et al. 2016) as timm does it: in training, each
example's residual branch is dropped with a rate rising linearly from 0 at the first
block to `drop_path` at the last (kept ones scaled by 1 / (1 - rate)), drawn from the
'dropout' RNG stream; off at eval.

The ImageNet stem and blocks compute what torchvision's ResNet (v1.5: the stride on the
bottleneck's 3x3 conv) computes: symmetric padding (3 for the 7x7/2 conv, 1 for the
3x3/2 max pool and every 3x3 conv, never linen's asymmetric 'SAME'), a 1x1/stride conv +
BatchNorm shortcut where shapes change, BatchNorm eps 1e-5 and momentum 0.1 in torch's
convention; so torchvision/timm weights give the same logits (flaxtrain/pretrained.py).

BatchNorm: in training, statistics are computed over the *global* batch (all devices,
through the data-parallel axis), so results do not depend on the device count and
the running averages stay identical on every device; eval uses the running averages.
"""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtrain import parallel


def _norm(train: bool, dtype, **kw):
  return functools.partial(
    nn.BatchNorm,
    use_running_average=not train,
    momentum=0.9,
    epsilon=1e-5,
    dtype=dtype,
    axis_name=parallel.AXIS if train else None,
    **kw,
  )


def _global_average_pool(x):
  # The barrier keeps XLA from fusing the last block into the reduction: jax 0.12's
  # XLA:CPU returns NaN for that fusion in bfloat16 (eager and jax 0.10 are fine).
  return jnp.mean(jax.lax.optimization_barrier(x), axis=(1, 2))


def _drop_path(module: nn.Module, y, rate: float, train: bool):
  """Zeroes the whole residual branch of each example with probability `rate`."""
  if not train or rate == 0.0:
    return y
  keep = 1.0 - rate
  shape = (y.shape[0],) + (1,) * (y.ndim - 1)
  kept = jax.random.bernoulli(module.make_rng("dropout"), keep, shape)
  return jnp.where(kept, y / jnp.asarray(keep, y.dtype), jnp.zeros((), y.dtype))


def _rates(drop_path: float, num_blocks: int) -> list[float]:
  """Stochastic-depth rate of each block: linear from 0 to `drop_path` (timm)."""
  return [drop_path * i / max(num_blocks - 1, 1) for i in range(num_blocks)]


def _residual(x, y, strides, conv, norm):
  """relu(shortcut(x) + y); the shortcut projects x (1x1 conv + norm) when shapes differ."""
  if x.shape != y.shape:
    x = conv(y.shape[-1], (1, 1), (strides, strides), name="conv_proj")(x)
    x = norm(name="norm_proj")(x)
  return nn.relu(x + y)


class BasicBlock(nn.Module):
  filters: int
  strides: int = 1
  dtype: jnp.dtype = jnp.float32
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    norm = _norm(train, self.dtype)
    y = conv(self.filters, (3, 3), (self.strides, self.strides), padding=1)(x)
    y = nn.relu(norm()(y))
    y = conv(self.filters, (3, 3), padding=1)(y)
    y = norm(scale_init=nn.initializers.zeros)(y)  # Each block starts as the identity.
    y = _drop_path(self, y, self.drop_path, train)
    return _residual(x, y, self.strides, conv, norm)


class Bottleneck(nn.Module):
  filters: int
  strides: int = 1
  dtype: jnp.dtype = jnp.float32
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    norm = _norm(train, self.dtype)
    y = nn.relu(norm()(conv(self.filters, (1, 1))(x)))
    y = conv(self.filters, (3, 3), (self.strides, self.strides), padding=1)(y)
    y = nn.relu(norm()(y))
    y = norm(scale_init=nn.initializers.zeros)(conv(self.filters * 4, (1, 1))(y))
    y = _drop_path(self, y, self.drop_path, train)
    return _residual(x, y, self.strides, conv, norm)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}
REMAT = ("none", "block")


def _blocks(block_cls, remat: str):
  """Constructors of `block_cls` named as linen names them unwrapped: BasicBlock_0, ..."""
  # static_argnums counts `self`: 2 is `train`, a Python bool that picks code paths.
  wrapped = nn.remat(block_cls, static_argnums=(2,)) if remat == "block" else block_cls
  count = 0

  def make(*args, **kwargs):
    nonlocal count
    count += 1
    return wrapped(*args, name=f"{block_cls.__name__}_{count - 1}", **kwargs)

  return make


class ResNet(nn.Module):
  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: str = "basic"
  width: int = 64  # Filters of the first stage; doubled at every later stage.
  stem: str = "imagenet"  # 'imagenet' | 'small'
  # Stride of each stage's first block; default (1, 2, 2, ...). (2, 2, 2) on 28 px images
  # works at 14, 7 and 4 px: the FLOPs of (1, 2, 2) at twice the width, faster on CPUs.
  stage_strides: Sequence[int] | None = None
  dropout: float = 0.0  # Before the classifier.
  dtype: jnp.dtype = jnp.float32
  remat: str = "none"  # 'block': recompute each block's activations (see module doc).
  drop_path: float = 0.0  # Stochastic depth of the last block (see module doc).

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    norm = _norm(train, self.dtype)
    if self.stem == "imagenet":
      x = nn.Conv(
        self.width, (7, 7), (2, 2), padding=3, use_bias=False, dtype=self.dtype, name="conv_init"
      )(x)
      x = nn.relu(norm(name="bn_init")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:
      x = nn.Conv(
        self.width, (3, 3), padding=1, use_bias=False, dtype=self.dtype, name="conv_init"
      )(x)
      x = nn.relu(norm(name="bn_init")(x))
    block = _blocks(BLOCKS[self.block], self.remat)
    stage_strides = self.stage_strides or [1] + [2] * (len(self.stage_sizes) - 1)
    rates = iter(_rates(self.drop_path, sum(self.stage_sizes)))
    for i, size in enumerate(self.stage_sizes):
      for j in range(size):
        strides = stage_strides[i] if j == 0 else 1
        x = block(self.width * 2**i, strides, dtype=self.dtype, drop_path=next(rates))(x, train)
    x = _global_average_pool(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)


class WideBlock(nn.Module):
  """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3, plus the shortcut."""

  filters: int
  strides: int = 1
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    norm = _norm(train, self.dtype)
    a = nn.relu(norm()(x))
    y = conv(self.filters, (3, 3), (self.strides, self.strides), padding=1)(a)
    y = nn.relu(norm()(y))
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    y = conv(self.filters, (3, 3), padding=1)(y)
    y = _drop_path(self, y, self.drop_path, train)
    if x.shape != y.shape:
      x = conv(self.filters, (1, 1), (self.strides, self.strides), name="conv_proj")(a)
    return x + y


class WideResNet(nn.Module):
  num_classes: int
  depth: int = 28  # 6n + 4
  widen: int = 10
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  remat: str = "none"  # As for ResNet.
  drop_path: float = 0.0  # As for ResNet.

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    n = (self.depth - 4) // 6
    block = _blocks(WideBlock, self.remat)
    rates = iter(_rates(self.drop_path, 3 * n))
    x = nn.Conv(16, (3, 3), padding=1, use_bias=False, dtype=self.dtype, name="conv_init")(x)
    for i, width in enumerate((16, 32, 64)):
      for j in range(n):
        strides = 2 if i > 0 and j == 0 else 1
        x = block(
          width * self.widen, strides, self.dropout, dtype=self.dtype, drop_path=next(rates)
        )(x, train)
    x = nn.relu(_norm(train, self.dtype)()(x))
    x = _global_average_pool(x)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)
