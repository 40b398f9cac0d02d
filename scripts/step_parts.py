"""Times the pieces of one fashion_cnn training step, op by op, on this machine's CPU.

    .venv/bin/python scripts/step_parts.py [--batch=32] [--calls=300]

Each line is one jitted op, in ms per call (median of 3 runs of `calls` calls, after a
warm-up call): the two convolutions' forward and gradients, their im2col + matmul
equivalents, the first dense layer, an AdamW update over the model's 824,458
parameters, and for reference the whole bare train step (AdamW and SGD). The sum of
the fastest formulation of every piece bounds what a rewrite of the step could reach;
the last line is the step with both convolutions as flaxtrain's im2col (models/im2col.py).
docs/performance.md uses these figures.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxtrain.models import im2col


def conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=im2col.NHWC)


def timed(fn, *args, calls):
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  runs = []
  for _ in range(3):
    t = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    runs.append((time.perf_counter() - t) / calls * 1e3)
  return statistics.median(runs)


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--calls", type=int, default=300)
  args = parser.parse_args()
  b, rng = args.batch, np.random.default_rng(0)

  def rand(*shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)

  x1, w1, g1 = rand(b, 28, 28, 1), rand(3, 3, 1, 32), rand(b, 28, 28, 32)
  x2, w2, g2 = rand(b, 14, 14, 32), rand(3, 3, 32, 64), rand(b, 14, 14, 64)
  patches, wmat, gmat = rand(b * 196, 288), rand(288, 64), rand(b * 196, 64)
  h, wd = rand(b, 3136), rand(3136, 256)
  params = {"conv1": w1, "conv2": w2, "dense1": wd, "dense2": rand(256, 10)}
  labels = jnp.asarray(rng.integers(0, 10, b))

  def grad_w(x, w, g):
    return jax.vjp(lambda w: conv(x, w), w)[1](g)

  def grad_x(x, w, g):
    return jax.vjp(lambda x: conv(x, w), x)[1](g)

  def loss(p, x, conv=conv):
    y = jax.nn.relu(conv(x, p["conv1"]))
    y = y.reshape(b, 14, 2, 14, 2, 32).mean((2, 4))
    y = jax.nn.relu(conv(y, p["conv2"]))
    y = y.reshape(b, 7, 2, 7, 2, 64).mean((2, 4)).reshape(b, -1)
    out = jax.nn.relu(y @ p["dense1"]) @ p["dense2"]
    return optax.softmax_cross_entropy_with_integer_labels(out, labels).mean()

  def step_fn(tx, conv=conv):
    def step(p, s, x):
      updates, s = tx.update(jax.grad(loss)(p, x, conv), s, p)
      return optax.apply_updates(p, updates), s

    return step

  flat = rand(824_458)
  adamw, sgd = optax.adamw(1e-3), optax.sgd(0.1, 0.9)
  parts = [
    ("conv1 forward", conv, (x1, w1)),
    ("conv1 weight gradient", grad_w, (x1, w1, g1)),
    ("conv2 forward", conv, (x2, w2)),
    ("conv2 weight gradient", grad_w, (x2, w2, g2)),
    ("conv2 input gradient", grad_x, (x2, w2, g2)),
    ("conv2 im2col", im2col.patches_3x3, (x2,)),
    ("conv2 as matmul: fwd", lambda a, m: a @ m, (patches, wmat)),
    ("conv2 as matmul: dW", lambda a, g: a.T @ g, (patches, gmat)),
    ("conv2 as matmul: dX", lambda g, m: g @ m.T, (gmat, wmat)),
    ("dense1 forward", lambda a, m: a @ m, (h, wd)),
    (
      "AdamW update, 824k",
      lambda p, s, g: optax.apply_updates(p, adamw.update(g, s, p)[0]),
      (flat, adamw.init(flat), flat),
    ),
    ("whole step, AdamW", step_fn(adamw), (params, adamw.init(params), x1)),
    ("whole step, SGD", step_fn(sgd), (params, sgd.init(params), x1)),
    ("whole step, AdamW, im2col", step_fn(adamw, im2col.conv3x3), (params, adamw.init(params), x1)),
  ]
  print(f"batch {b}, jax {jax.__version__}, {jax.devices()[0].device_kind}")
  for name, fn, fn_args in parts:
    print(f"{name:24s} {timed(fn, *fn_args, calls=args.calls):7.3f} ms", flush=True)


if __name__ == "__main__":
  main()
