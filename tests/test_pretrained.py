"""Fine-tuning from torchvision/timm weights (flaxtrain/pretrained.py) and ResNet
stochastic depth."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtrain import parallel
from flaxtrain.models import resnet

# ------------------------------------------------------------ stochastic depth


def _train_apply(model, variables, x, key=3):
  """Train mode on one device, as the train step runs it (BatchNorm over the mesh axis)."""

  def apply(x):
    rngs = {"dropout": jax.random.key(key)}
    return model.apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])[0]

  return jax.vmap(apply, axis_name=parallel.AXIS)(x[None])[0]


@pytest.mark.parametrize(
  "make",
  [
    lambda **kw: resnet.ResNet(5, stage_sizes=(1, 1), width=8, stem="small", **kw),
    lambda **kw: resnet.WideResNet(5, depth=10, widen=1, **kw),
  ],
  ids=["resnet", "wide_resnet"],
)
def test_drop_path_changes_training_only(make):
  x = jax.random.normal(jax.random.key(0), (16, 8, 8, 3))
  plain, dropped = make(), make(drop_path=0.5, remat="block")
  shapes = jax.eval_shape(plain.init, jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(
    jnp.shape, jax.eval_shape(dropped.init, jax.random.key(1), x)
  )
  # Random values: at init the last BatchNorm of each branch zeroes it.
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32) ** 2, shapes)
  np.testing.assert_array_equal(plain.apply(variables, x), dropped.apply(variables, x))
  train_plain = _train_apply(plain, variables, x)
  assert np.abs(_train_apply(dropped, variables, x) - train_plain).max() > 1e-2
  assert np.array_equal(_train_apply(make(drop_path=0.0), variables, x), train_plain)


class _Branch(nn.Module):
  rate: float

  @nn.compact
  def __call__(self, x):
    return resnet._drop_path(self, x, self.rate, train=True)


def test_drop_path_drops_whole_examples_at_the_rate_and_keeps_the_mean():
  x = jnp.ones((20_000, 2, 2, 3))
  y = np.asarray(_Branch(0.3).apply({}, x, rngs={"dropout": jax.random.key(0)}))
  per_example = y.reshape(len(y), -1)
  dropped = (per_example == 0).all(axis=1)
  assert ((per_example == 0).any(axis=1) == dropped).all()  # All or nothing per example.
  assert dropped.mean() == pytest.approx(0.3, abs=0.01)  # ~3 standard deviations.
  np.testing.assert_allclose(per_example[~dropped], 1 / 0.7, rtol=1e-6)
  assert y.mean() == pytest.approx(1.0, abs=0.02)
  assert resnet._rates(0.2, 5) == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
