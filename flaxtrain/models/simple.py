"""The tutorials' CNN (with optional dropout) and MLP."""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtrain.models import im2col

CONV_IMPLS = ("auto", "xla", "im2col")


# 'auto' keeps im2col to patch matrices of up to 16 MiB (conv2 at 64 examples per device):
# beyond that the patches cost more memory traffic than the weight gradient saves.
AUTO_MAX_PATCH_BYTES = 16 << 20


def conv_function(impl: str, train: bool):
  """The convolution for `nn.Conv`: 'im2col' (models/im2col.py), 'xla', or 'auto'.

  'auto' is im2col when training on a CPU process with one JAX device, for patch
  matrices up to AUTO_MAX_PATCH_BYTES: there it made the batch-32 fashion_cnn step ~1.25x
  faster, because the weight gradient reuses the forward's patches. Elsewhere it is XLA's
  own convolution. Evaluation gains nothing from im2col, since the forward costs the same.
  With several CPU devices per process (flaxtrain's default at batch >= 128 on 2 cores)
  the devices' patch buffers contend in the allocator: 2,440 vs 5,300 examples/s at batch
  128. With glibc's mmap threshold raised the two are equal, so nothing is gained there.
  GPUs and TPUs have fast convolutions of their own.
  """
  if impl == "im2col":
    return im2col.conv_general_dilated
  if impl == "auto" and train and jax.default_backend() == "cpu" and jax.local_device_count() == 1:
    return functools.partial(im2col.conv_general_dilated, max_patch_bytes=AUTO_MAX_PATCH_BYTES)
  return jax.lax.conv_general_dilated


def avg_pool_2x2(x):
  """nn.avg_pool(x, (2, 2), strides=(2, 2)) as a reshape and mean: the same values, but
  its gradient is a broadcast instead of a windowed scatter (~7x faster on XLA:CPU)."""
  b, h, w, c = x.shape
  if h % 2 or w % 2:
    return nn.avg_pool(x, (2, 2), strides=(2, 2))
  return x.reshape((b, h // 2, 2, w // 2, 2, c)).mean(axis=(2, 4))


class CNN(nn.Module):
  """Conv 3x3 -> relu -> avg_pool 2x2 per entry of `features`, then dense layers."""

  num_classes: int
  features: Sequence[int] = (32, 64)
  dense: Sequence[int] = (256,)
  dropout: float = 0.0  # Before each dense layer.
  dtype: jnp.dtype = jnp.float32
  conv: str = "auto"  # One of CONV_IMPLS; the same parameters and function either way.

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    conv_fn = conv_function(self.conv, train)
    for f in self.features:
      x = nn.Conv(f, (3, 3), dtype=self.dtype, conv_general_dilated=conv_fn)(x)
      x = nn.relu(x)
      x = avg_pool_2x2(x)
    x = x.reshape((x.shape[0], -1))
    for d in self.dense:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
      x = nn.relu(nn.Dense(d, dtype=self.dtype)(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)


class MLP(nn.Module):
  """Flatten -> (Dense -> relu) per entry of `hidden` -> Dense."""

  num_classes: int
  hidden: Sequence[int] = (128,)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    del train
    x = x.reshape((x.shape[0], -1))
    for h in self.hidden:
      x = nn.relu(nn.Dense(h, dtype=self.dtype)(x))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)
