import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config
from flax import linen as nn
from flax import nnx

from flaxtrain import models, steps
from flaxtrain.errors import UserError
from flaxtrain.models import adapters, analysis

# Pinned so that a change to a model's definition cannot go unnoticed.
PARAM_COUNTS = {"fashion_cnn": 824_458, "fashion_mlp": 101_770, "fashion_resnet": 697_130}


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name,count", sorted(PARAM_COUNTS.items()))
def test_parameter_counts_and_output_shape(name, count):
  cfg = load_config(name)
  model = models.get(cfg.model, num_classes=10)
  x = jnp.zeros((3, 28, 28, 1))
  variables = model.init(jax.random.key(0), x, train=False)
  assert _count(variables["params"]) == count
  assert model.apply(variables, x, train=False).shape == (3, 10)


def test_cnn_on_other_image_shapes_and_classes():
  cfg = load_config("cifar10_cnn")
  model = models.get(cfg.model, num_classes=7)
  x = jnp.zeros((2, 32, 32, 3))
  out = model.apply(model.init(jax.random.key(0), x), x)
  assert out.shape == (2, 7)


def test_bfloat16_compute_keeps_float32_params():
  model = models.get(load_config("fashion_cnn").model, 10, dtype=jnp.bfloat16)
  x = jnp.zeros((2, 28, 28, 1))
  variables = model.init(jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  assert model.apply(variables, x).dtype == jnp.bfloat16


def test_unknown_model_lists_valid_names():
  cfg = load_config("fashion_cnn").model
  cfg.name = "cnnn"
  with pytest.raises(UserError, match=r"Unknown model 'cnnn' \(did you mean 'cnn'\?\).*cnn, mlp"):
    models.get(cfg, 10)


# Every registered model, at the sizes where published counts exist: torchvision's
# ResNets (1000 classes, RGB), WRN-28-10 on CIFAR-10 (36.5M in the paper).
REGISTRY_COUNTS = {
  "cnn": ({"features": (32, 64), "dense": (256,)}, 10, (28, 28, 1), 824_458),
  "mlp": ({"hidden": (128,)}, 10, (28, 28, 1), 101_770),
  "resnet18": ({}, 1000, (224, 224, 3), 11_689_512),
  "resnet34": ({}, 1000, (224, 224, 3), 21_797_672),
  "resnet50": ({}, 1000, (224, 224, 3), 25_557_032),
  "resnet_small": ({"stage_sizes": (2, 2, 2, 2), "width": 64}, 10, (32, 32, 3), 11_173_962),
  "wide_resnet": ({"depth": 28, "widen": 10}, 10, (32, 32, 3), 36_479_194),
  # timm's vit_small_patch16_224 has 22,050,664; the plain ViT has no class token
  # (384) and no learned position embedding (197 x 384): tests/test_vit.py pins both.
  "vit": (
    {"variant": "S/16", "pool": "gap", "posemb": "sincos2d"},
    1000,
    (224, 224, 3),
    21_974_632,
  ),
  "autoencoder": (
    {"encoder": (256, 128), "latent": 32, "decoder": (128, 256)},
    10,
    (28, 28, 1),
    476_720,
  ),
}


def test_every_registered_model_has_a_pinned_count():
  assert set(REGISTRY_COUNTS) == set(models.MODELS)


@pytest.mark.parametrize("name", sorted(REGISTRY_COUNTS))
def test_registered_model_parameter_counts(name):
  import ml_collections

  fields, classes, shape, count = REGISTRY_COUNTS[name]
  cfg = ml_collections.ConfigDict({"name": name, **fields})
  model = models.get(cfg, classes, image_shape=shape)
  x = jnp.zeros((2, *shape))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  assert _count(variables["params"]) == count
  out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
  assert out.shape == ((2, *shape) if name == "autoencoder" else (2, classes))


# ------------------------------------------------------ im2col convolutions (CPU)


def test_im2col_conv_is_xlas_convolution_with_the_same_gradients():
  from jax import lax

  from flaxtrain.models import im2col

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 9, 7, 5)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 5, 4)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((3, 9, 7, 4)), jnp.float32)

  def xla(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=im2col.NHWC)

  y, vjp = jax.vjp(im2col.conv3x3, x, w)
  y_ref, vjp_ref = jax.vjp(xla, x, w)
  np.testing.assert_allclose(y, y_ref, atol=1e-5)
  for a, b in zip(vjp(g), vjp_ref(g), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_im2col_falls_back_to_xla_for_other_convolutions():
  from jax import lax

  from flaxtrain.models import im2col

  x = jnp.ones((1, 8, 8, 2))
  w = jnp.ones((5, 5, 2, 3))
  dn = lax.conv_dimension_numbers(x.shape, w.shape, im2col.NHWC)
  for strides, padding in (((1, 1), "SAME"), ((2, 2), "VALID")):
    got = im2col.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn)
    want = lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn)
    np.testing.assert_array_equal(got, want)
  # A 3x3 convolution whose patches exceed the size limit goes to XLA too.
  w3 = jnp.asarray(np.random.default_rng(2).standard_normal((3, 3, 2, 3)), jnp.float32)
  dn3 = lax.conv_dimension_numbers(x.shape, w3.shape, im2col.NHWC)
  want = lax.conv_general_dilated(x, w3, (1, 1), "SAME", dimension_numbers=dn3)
  limited = im2col.conv_general_dilated(
    x, w3, (1, 1), "SAME", dimension_numbers=dn3, max_patch_bytes=x.size * 9 * 4 - 1
  )
  np.testing.assert_array_equal(limited, want)
  jaxpr = jax.make_jaxpr(
    lambda x: im2col.conv_general_dilated(
      x, w3, (1, 1), "SAME", dimension_numbers=dn3, max_patch_bytes=x.size * 9 * 4
    )
  )(x)
  assert "conv_general_dilated" not in str(jaxpr)  # At the limit: im2col (a matmul).


# Only in make test; on the newest stack test_im2col_conv_is_xlas_convolution_... covers it.
@pytest.mark.slow
def test_cnn_conv_implementations_share_parameters_and_outputs():
  import ml_collections

  x = jnp.asarray(np.random.default_rng(1).random((4, 28, 28, 1)), jnp.float32)
  cfgs = {
    impl: ml_collections.ConfigDict(dict(name="cnn", features=(8, 16), dense=(32,), conv=impl))
    for impl in ("xla", "im2col")
  }
  a, b = (models.get(c, 10, image_shape=(28, 28, 1)) for c in cfgs.values())
  variables = a.init(jax.random.key(0), x)
  assert jax.tree.structure(variables) == jax.tree.structure(b.init(jax.random.key(0), x))
  np.testing.assert_allclose(a.apply(variables, x), b.apply(variables, x), atol=1e-5)
  cfgs["xla"].conv = "fft"
  with pytest.raises(UserError, match="model.conv must be one of auto, xla, im2col"):
    models.get(cfgs["xla"], 10)


@pytest.mark.parametrize("name", ["fashion_cnn", "fashion_resnet"])
def test_initial_state_is_the_initializer_at_xlas_default_optimization(name):
  """steps.init_state compiles the initializer at a lower LLVM level on the CPU (seconds
  faster); the values must be bitwise those of the default compile."""
  from flaxtrain import optimizers, parallel

  cfg = load_config(name)
  model = models.get(cfg.model, num_classes=10)
  tx, _ = optimizers.make(cfg.optimizer, cfg.schedule, steps_per_epoch=10, total_steps=100)
  par = parallel.DataParallel(jax.devices()[:1])
  state = steps.init_state(model, tx, (28, 28, 1), 3, par)
  x = jnp.zeros((1, 28, 28, 1))
  want = jax.jit(lambda: model.init({"params": jax.random.key(3)}, x, train=False))()
  got = {"params": state.params, **state.model_state}
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert all(
    np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
  )


class _Nested(nn.Module):
  """Its only convolution (or Dense layer) runs rematerialised: a jaxpr inside the jaxpr."""

  conv: bool

  @nn.compact
  def __call__(self, x):
    x = nn.remat(nn.Conv)(4, (3, 3))(x) if self.conv else nn.remat(nn.Dense)(4)(x)
    return nn.Dense(10)(x.reshape((x.shape[0], -1)))


class _NNXNet(nnx.Module):
  """NNX: its init builds the layers without running the forward pass."""

  def __init__(self, conv: bool, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs) if conv else None
    self.head = nnx.Linear(28 * 28 * (4 if conv else 1), 10, rngs=rngs)

  def __call__(self, x):
    if self.conv is not None:
      x = self.conv(x)
    return self.head(x.reshape((x.shape[0], -1)))


@pytest.mark.parametrize(
  "config,expected",
  [
    ("fashion_mlp", False),
    ("fashion_autoencoder", False),
    ("fashion_cnn", True),
    ("fashion_resnet", True),
    ("fashion_vit", True),  # Its patch embedding.
  ],
)
def test_has_convolutions_of_the_registered_models(config, expected):
  """The CPU's default steps_per_dispatch follows it (experiment.default_steps_per_dispatch)."""
  model = models.get(load_config(config).model, 10, image_shape=(28, 28, 1))
  assert analysis.has_convolutions(model, (28, 28, 1)) is expected


@pytest.mark.parametrize("conv", [False, True])
def test_has_convolutions_finds_nested_and_nnx_convolutions(conv):
  linen = adapters.LinenModel(_Nested(conv=conv))
  nnx_model = adapters.NNXModel(_NNXNet, {"conv": conv})
  assert analysis.has_convolutions(linen, (28, 28, 1)) is conv
  assert analysis.has_convolutions(nnx_model, (28, 28, 1)) is conv
