"""Times the pieces of one fashion_cnn training step, op by op, on this machine's CPU.

    .venv/bin/python scripts/step_parts.py [--batch=32] [--calls=300] [--torch] [--devices=2]

Each line is one jitted op, in ms per call (median of 3 runs of `calls` calls, after a
warm-up call): the two convolutions' forward and gradients, their im2col + matmul
equivalents, the first dense layer, an AdamW update over the model's 824,458
parameters, and for reference the whole bare train step (AdamW and SGD). The sum of
the fastest formulation of every piece bounds what a rewrite of the step could reach;
the last line is the step with both convolutions as flaxtrain's im2col (models/im2col.py).
With --torch, PyTorch's eager times of the same pieces on the same CPU follow (its default
threads): the kernels a JAX loop competes with. With --devices=N (N JAX CPU devices, set
before JAX starts) two more lines time the forward and backward and the whole AdamW step
split over the N devices as flaxtrain splits a batch (a shard_map, gradients averaged).
docs/performance.md uses these figures.
"""

import argparse
import os
import statistics
import sys
import time

# --devices=N must reach XLA before JAX starts.
_DEVICES = next((int(a.split("=", 1)[1]) for a in sys.argv if a.startswith("--devices=")), 1)
if _DEVICES > 1:
  os.environ["XLA_FLAGS"] = (
    f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={_DEVICES}"
  ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from flaxtrain.models import im2col  # noqa: E402


def conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=im2col.NHWC)


def median_ms(call, calls: int, finish=lambda out: out) -> float:
  """ms per `call()`: the median of 3 runs of `calls` calls after a warm-up call;
  `finish(out)` waits for the last call's work (JAX dispatches asynchronously)."""
  finish(call())
  runs = []
  for _ in range(3):
    t = time.perf_counter()
    for _ in range(calls):
      out = call()
    finish(out)
    runs.append((time.perf_counter() - t) / calls * 1e3)
  return statistics.median(runs)


def timed(fn, *args, calls):
  fn = jax.jit(fn)
  return median_ms(lambda: fn(*args), calls, jax.block_until_ready)


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--calls", type=int, default=300)
  parser.add_argument("--torch", action="store_true", help="PyTorch's times too")
  parser.add_argument("--devices", type=int, default=1, help="data-parallel lines over N devices")
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

  def loss(p, x, conv=conv, labels=labels):
    n = x.shape[0]
    y = jax.nn.relu(conv(x, p["conv1"]))
    y = y.reshape(n, 14, 2, 14, 2, 32).mean((2, 4))
    y = jax.nn.relu(conv(y, p["conv2"]))
    y = y.reshape(n, 7, 2, 7, 2, 64).mean((2, 4)).reshape(n, -1)
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
    ("forward + backward", jax.grad(loss), (params, x1)),
    ("whole step, AdamW", step_fn(adamw), (params, adamw.init(params), x1)),
    ("whole step, SGD", step_fn(sgd), (params, sgd.init(params), x1)),
    ("whole step, AdamW, im2col", step_fn(adamw, im2col.conv3x3), (params, adamw.init(params), x1)),
  ]
  if args.devices > 1:  # The batch split over the devices, as flaxtrain's data parallelism.
    mesh = Mesh(np.array(jax.devices()[: args.devices]), ("batch",))

    def split(fn, in_specs):
      return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=P(), check_vma=False)

    def grads(p, x, y):
      return jax.lax.pmean(jax.grad(loss)(p, x, conv, y), "batch")

    def dp_step(p, s, x, y):
      updates, s = adamw.update(grads(p, x, y), s, p)
      return optax.apply_updates(p, updates), s

    batch = (P(), P("batch"), P("batch"))
    parts += [
      (f"fwd + bwd, {args.devices} devices", split(grads, batch), (params, x1, labels)),
      (
        f"AdamW step, {args.devices} devices",
        split(dp_step, (P(), *batch)),
        (params, adamw.init(params), x1, labels),
      ),
    ]
  print(f"batch {b}, jax {jax.__version__}, {jax.devices()[0].device_kind}")
  for name, fn, fn_args in parts:
    print(f"{name:24s} {timed(fn, *fn_args, calls=args.calls):7.3f} ms", flush=True)
  if args.torch:
    torch_parts(b, args.calls)


def torch_parts(b: int, calls: int):
  """PyTorch eager, the same pieces: what XLA:CPU's kernels are up against."""
  import torch
  import torch.nn.functional as F
  from torch import nn

  torch.manual_seed(0)
  x1, x2, g2 = torch.randn(b, 1, 28, 28), torch.randn(b, 32, 14, 14), torch.randn(b, 64, 14, 14)
  w2 = torch.randn(64, 32, 3, 3)
  labels = torch.randint(0, 10, (b,))
  model = nn.Sequential(
    nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
    nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
    nn.Flatten(), nn.Linear(3136, 256), nn.ReLU(), nn.Linear(256, 10),
  )  # fmt: skip
  opt = torch.optim.AdamW(model.parameters(), 1e-3)

  def conv2_backward():
    x, w = x2.clone().requires_grad_(), w2.clone().requires_grad_()
    F.conv2d(x, w, padding=1).backward(g2)

  def forward_backward():
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x1), labels).backward()

  def step():
    forward_backward()
    opt.step()

  print(f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads")
  with torch.no_grad():
    print(f"{'conv2 forward':24s} {median_ms(lambda: F.conv2d(x2, w2, padding=1), calls):7.3f} ms")
  for name, fn in (
    ("conv2 both gradients", conv2_backward),
    ("forward + backward", forward_backward),
    ("whole step, AdamW", step),
  ):
    print(f"{name:24s} {median_ms(fn, calls):7.3f} ms", flush=True)


if __name__ == "__main__":
  main()
