"""3x3 convolutions as im2col + matmul, for XLA:CPU.

XLA:CPU's convolution kernels reach about a third of its matmul rate on the small
convolutions of the tutorial CNN; its weight gradient is the slowest of all (2.3 ms of a
7.6 ms batch-32 step, scripts/step_parts.py). Written as a matmul over the 3x3 patches,
the forward costs the same and the weight gradient reuses the forward's patches: one
matmul at the machine's matmul rate. The input gradient stays XLA's own (the transposed
convolution), which is as fast as the matmul plus scattering the patches back.

Same function, same parameters: only the order of float32 additions differs (gradients
agree to ~1e-8), so a checkpoint moves freely between this and `lax.conv_general_dilated`.
"""

import jax
import jax.numpy as jnp
from jax import lax

NHWC = ("NHWC", "HWIO", "NHWC")


def patches_3x3(x):
  """[B, H, W, C] -> [B*H*W, 9*C]: each pixel's 3x3 SAME neighbourhood, HWIO order."""
  b, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  cols = [xp[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)]
  return jnp.concatenate(cols, axis=-1).reshape(b * h * w, 9 * c)


def _xla_conv(x, kernel):
  return lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=NHWC)


@jax.custom_vjp
def conv3x3(x, kernel):
  """A 3x3, stride-1, SAME convolution of NHWC `x` with an HWIO `kernel`."""
  return _conv3x3_fwd(x, kernel)[0]


def _conv3x3_fwd(x, kernel):
  b, h, w, c = x.shape
  patches = patches_3x3(x)
  y = (patches @ kernel.reshape(9 * c, -1)).reshape(b, h, w, -1)
  return y, (patches, kernel)


def _conv3x3_bwd(residuals, g):
  patches, kernel = residuals
  b, h, w, _ = g.shape
  d_kernel = (patches.T @ g.reshape(b * h * w, -1)).reshape(kernel.shape)
  x_shape = jax.ShapeDtypeStruct((b, h, w, kernel.shape[2]), patches.dtype)
  (d_x,) = jax.linear_transpose(lambda x: _xla_conv(x, kernel), x_shape)(g)
  return d_x, d_kernel


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def conv_general_dilated(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  max_patch_bytes=None,
  **kwargs,
):
  """Drop-in for `lax.conv_general_dilated` (flax's `nn.Conv(conv_general_dilated=...)`):
  3x3 stride-1 SAME NHWC convolutions go through `conv3x3`, anything else through XLA,
  as do convolutions whose patch matrix would exceed `max_patch_bytes` (if given)."""
  patch_bytes = lhs.size * 9 * jnp.dtype(lhs.dtype).itemsize
  eligible = (
    (max_patch_bytes is None or patch_bytes <= max_patch_bytes)
    and lhs.ndim == 4
    and rhs.shape[:2] == (3, 3)
    and tuple(window_strides) == (1, 1)
    and (lhs_dilation is None or tuple(lhs_dilation) == (1, 1))
    and (rhs_dilation is None or tuple(rhs_dilation) == (1, 1))
    and feature_group_count == 1
    and (padding == "SAME" or [tuple(p) for p in padding] == [(1, 1), (1, 1)])
    and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
  )
  if eligible:
    return conv3x3(lhs, rhs)
  return lax.conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    dimension_numbers=dimension_numbers,
    feature_group_count=feature_group_count,
    **kwargs,
  )
