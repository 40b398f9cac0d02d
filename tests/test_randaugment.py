"""RandAugment: identity at magnitude 0, PIL references, determinism across device splits,
existing augmentations unchanged, config errors."""

import hashlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image, ImageEnhance, ImageOps

from flaxtrain import experiment, parallel
from flaxtrain.data import augment
from flaxtrain.data import randaugment as ra
from flaxtrain.errors import UserError


def _cfg(**kw):
  base = {"crop_padding": 0, "flip": False, "erase_prob": 0.0}
  base.update(randaugment_num_ops=0, randaugment_magnitude=10.0)
  return ml_collections.ConfigDict({**base, **kw})


def _augmenter(cfg):
  """jitted (images, key, first_index) -> augmented images, as numpy."""
  f = jax.jit(lambda x, k, i: augment.apply(x, k, i, cfg))
  return lambda images, key, first_index: np.asarray(f(images, key, first_index))


def _augment(images, key, first_index, cfg):
  return _augmenter(cfg)(images, key, first_index)


def _random_images(n, c, size=(20, 24), seed=0):
  return jnp.asarray(np.random.default_rng(seed).random((n, *size, c)), jnp.float32)


def _levels(x):
  return np.round(np.asarray(x, np.float64) * 255).astype(np.int64)


def _uint8_image(c, seed=0):
  """Mostly mid-range values (so Equalize and AutoContrast have work), some extremes."""
  rng = np.random.default_rng(seed)
  u8 = rng.integers(40, 200, (32, 40, c), dtype=np.uint8)
  u8[:5] = rng.integers(0, 256, (5, 40, c))
  return u8


def _pil(u8):
  return Image.fromarray(u8[..., 0] if u8.shape[-1] == 1 else u8)


def _from_pil(im):
  a = np.asarray(im)
  return a[..., None] if a.ndim == 2 else a


# ---------------------------------------------------------- identity and ranges


def _every_op(*magnitudes):
  """jitted (image, keys) -> {(op name, magnitude): [len(keys), H, W, C]}, compiled once."""

  def run(image, keys):
    return {
      (name, m): jax.vmap(lambda k, n=name, m=m: ra.apply_op(image, n, k, m))(keys)
      for name in ra.OPS
      for m in magnitudes
    }

  return jax.jit(run)


@pytest.mark.parametrize("c", [1, 3])
def test_magnitude_zero_is_the_identity(c):
  image = _random_images(1, c)[0]
  keys = jax.random.split(jax.random.key(0), 8)  # Both signs, both decisions to apply.
  for (name, _), out in _every_op(0.0)(image, keys).items():
    np.testing.assert_array_equal(out, jnp.broadcast_to(image, out.shape), name)
  images = _random_images(8, c)
  cfg = _cfg(randaugment_num_ops=3, randaugment_magnitude=0.0)
  np.testing.assert_array_equal(_augment(images, jax.random.key(1), 0, cfg), images)


@pytest.mark.parametrize("c", [1, 3])
def test_each_op_changes_an_image_and_stays_in_unit_range(c):
  image = _random_images(1, c)[0]
  outs = _every_op(10.0, 30.0)(image, jax.random.split(jax.random.key(0), 2))
  for (name, magnitude), out in outs.items():
    out = np.asarray(out)
    assert out.dtype == np.float32 and 0.0 <= out.min() and out.max() <= 1.0, name
    for o in out:
      if name == "Color" and c == 1:
        np.testing.assert_array_equal(o, image)  # Saturation of grey.
      else:
        assert np.abs(o - image).max() > 1e-3, (name, magnitude)


def test_each_image_draws_its_own_ops():
  image = _random_images(1, 3)[0]
  images = jnp.repeat(image[None], 32, 0)
  f = _augmenter(_cfg(randaugment_num_ops=2))
  out = f(images, jax.random.key(0), 0)
  assert 0.0 <= out.min() and out.max() <= 1.0
  distinct = {hashlib.sha256(o.tobytes()).hexdigest() for o in out}
  assert len(distinct) > 20
  other = f(images, jax.random.key(1), 0)
  assert not np.allclose(out, other)


# ---------------------------------------------------------------- PIL references


@pytest.mark.parametrize("c", [1, 3])
def test_pixel_ops_match_pil(c):
  u8 = _uint8_image(c)
  pil = _pil(u8)
  factors = (0.1, 0.55, 1.9)

  @jax.jit
  def ours(x):
    out = {
      "posterize3": ra.posterize(x, 3),
      "posterize1": ra.posterize(x, 1),
      "solarize100": ra.solarize(x, 100),
      "solarize0": ra.solarize(x, 0),
      "invert": ra.invert(x),
      "equalize": ra.equalize(x),
      "solarize_add70": ra.solarize_add(x, 70),
      "autocontrast": ra.auto_contrast(x),
    }
    for f in factors:
      out |= {f"{op.__name__}{f}": op(x, f) for op in (ra.color, ra.contrast, ra.brightness)}
      out[f"sharpness{f}"] = ra.sharpness(x, f)
    return out

  ours = {k: _levels(v) for k, v in ours(jnp.asarray(u8, jnp.float32) / 255).items()}
  exact = {
    "posterize3": ImageOps.posterize(pil, 3),
    "posterize1": ImageOps.posterize(pil, 1),
    "solarize100": ImageOps.solarize(pil, 100),
    "solarize0": ImageOps.solarize(pil, 0),
    "invert": ImageOps.invert(pil),
    "equalize": ImageOps.equalize(pil),
  }
  for name, theirs in exact.items():
    np.testing.assert_array_equal(ours[name], _from_pil(theirs), name)
  # timm's solarize_add: levels below 128 get `add`, capped at 255.
  lut = np.array([min(255, i + 70) if i < 128 else i for i in range(256)])
  np.testing.assert_array_equal(ours["solarize_add70"], lut[u8])
  # PIL truncates where these stay continuous: one level at most.
  near = {"autocontrast": ImageOps.autocontrast(pil)}
  for f in factors:
    near |= {
      f"color{f}": ImageEnhance.Color(pil).enhance(f),
      f"contrast{f}": ImageEnhance.Contrast(pil).enhance(f),
      f"brightness{f}": ImageEnhance.Brightness(pil).enhance(f),
      f"sharpness{f}": ImageEnhance.Sharpness(pil).enhance(f),
    }
  for name, theirs in near.items():
    assert np.abs(ours[name] - _from_pil(theirs)).max() <= 1, name


@pytest.mark.parametrize("c", [1, 3])
def test_geometric_ops_match_pil_bilinear_with_grey_fill(c):
  u8 = _uint8_image(c, seed=1)
  x, pil = jnp.asarray(u8, jnp.float32) / 255, _pil(u8)
  h, w = u8.shape[:2]
  fill = 128 if c == 1 else (128, 128, 128)
  kw = dict(resample=Image.BILINEAR, fillcolor=fill)
  for degrees in (17.0, -30.0):
    ours = ra.warp(x, ra.rotate_matrix(degrees, h, w))
    assert np.abs(_levels(ours) - _from_pil(pil.rotate(degrees, **kw))).max() <= 1
  affine = [(1, 0.3, 0, 0, 1, 0), (1, 0, 0, -0.3, 1, 0), (1, 0, -3.7, 0, 1, 0), (1, 0, 0, 0, 1, 5)]
  for m in affine:
    theirs = _from_pil(pil.transform(pil.size, Image.AFFINE, m, **kw))
    ours = _levels(ra.warp(x, jnp.array(m, jnp.float32)))
    assert np.abs(ours - theirs).max() <= 1, m
  # Whole-pixel translations are exact: the image shifted, grey where it came from outside.
  ours = _levels(ra.warp(x, jnp.array((1, 0, 10, 0, 1, 0), jnp.float32)))
  np.testing.assert_array_equal(ours[:, : w - 10], u8[:, 10:])
  assert (ours[:, w - 10 :] == 128).all()


# ------------------------------------------------------------------ determinism


def test_the_same_on_one_device_and_split_over_four():
  images = _random_images(8, 3, size=(16, 16))
  key = jax.random.key(5)
  cfg = _cfg(crop_padding=2, flip=True, erase_prob=0.5, randaugment_num_ops=3)
  f = _augmenter(cfg)
  whole = f(images, key, 0)
  quarters = np.concatenate([f(images[i : i + 2], key, i) for i in range(0, 8, 2)])
  np.testing.assert_array_equal(whole, quarters)
  assert not np.allclose(whole, images)


# Only in make test; on the newest stack test_the_same_on_one_device_and_split_over_four covers it.
@pytest.mark.slow
def test_randaugmented_training_is_identical_on_one_and_four_devices(synthetic_data):
  c = tiny_config(**{"augment.randaugment_num_ops": 2, "augment.randaugment_magnitude": 9.0})
  states = []
  for par in (None, parallel.DataParallel(jax.devices()[:1])):
    exp = experiment.Experiment(c) if par is None else experiment.Experiment(c, par)
    state = exp.init_state()
    for s in range(2):
      state, _, bad = exp.train_chunk(state, s, 1)
      assert int(exp.par.to_host(bad)) < 0
    states.append(exp.par.to_host(state.params))
  for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1]), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5)


# augment.apply's output (crop, flip and erasing all on) before RandAugment existed (b73b84d).
_BEFORE = "cd5bf2ba933cab6f"


# Only in make test; on the newest stack test_magnitude_zero_is_the_identity covers it.
@pytest.mark.slow
def test_existing_augmentations_are_bit_identical_with_randaugment_off_or_at_zero():
  images = jnp.asarray(np.random.default_rng(0).random((8, 16, 16, 3)), jnp.float32)
  old = dict(crop_padding=3, flip=True, erase_prob=0.5)
  out = _augment(images, jax.random.key(7), 5, _cfg(**old))
  assert hashlib.sha256(out.tobytes()).hexdigest()[:16] == _BEFORE
  # RandAugment's key is its own: at magnitude 0 the crop, flip and erasing draws are unchanged.
  cfg = _cfg(**old, randaugment_num_ops=2, randaugment_magnitude=0.0)
  out = _augment(images, jax.random.key(7), 5, cfg)
  assert hashlib.sha256(out.tobytes()).hexdigest()[:16] == _BEFORE
  assert not augment.enabled(_cfg(randaugment_num_ops=0))
  assert augment.enabled(_cfg(randaugment_num_ops=1))


# ---------------------------------------------------------------------- config


@pytest.mark.parametrize(
  "overrides, shape, message",
  [
    ({"randaugment_num_ops": -1}, (28, 28, 1), "randaugment_num_ops must be an integer >= 0"),
    ({"randaugment_num_ops": 1.5}, (28, 28, 1), "randaugment_num_ops must be an integer >= 0"),
    ({"randaugment_num_ops": True}, (28, 28, 1), "randaugment_num_ops must be an integer >= 0"),
    ({"randaugment_magnitude": -1.0}, (28, 28, 1), r"randaugment_magnitude must be .* \[0, 30\]"),
    ({"randaugment_magnitude": 31.0}, (28, 28, 1), r"randaugment_magnitude must be .* \[0, 30\]"),
    ({"randaugment_magnitude": "9"}, (28, 28, 1), r"randaugment_magnitude must be .* \[0, 30\]"),
    ({"randaugment_num_ops": 2}, (28, 28, 4), "RandAugment needs images with 1 or 3 channels"),
  ],
)
def test_bad_randaugment_settings_are_one_sentence(overrides, shape, message):
  with pytest.raises(UserError, match=message) as e:
    augment.validate(_cfg(**overrides), shape)
  assert str(e.value).count(". ") == 0 and str(e.value).endswith(".")


def test_good_randaugment_settings_pass_and_bad_ones_stop_the_experiment(synthetic_data):
  for n, m in ((0, 10.0), (2, 0.0), (2, 9), (3, 30.0)):
    augment.validate(_cfg(randaugment_num_ops=n, randaugment_magnitude=m), (32, 32, 3))
  with pytest.raises(UserError, match="randaugment_magnitude must be"):
    experiment.Experiment(tiny_config(**{"augment.randaugment_magnitude": 40.0}))
