"""Mixup and CutMix (flaxtrain/data/mix.py): timm's per-example semantics, the soft targets,
and the same mixed batches and training on any device count (on 2 processes as on 1 device,
with RandAugment too: tests/test_multiprocess.py)."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.stats
from conftest import tiny_config

from flaxtrain import experiment, parallel, tasks
from flaxtrain.data import mix
from flaxtrain.errors import UserError


def _cfg(**kw):
  return ml_collections.ConfigDict({**mix.DEFAULTS, **kw})


# Each compilation of the Beta sampler takes seconds: few configs, shapes and jits.
MIXED = _cfg(mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=0.6, mix_switch_prob=0.3)


def _draws(cfg, n=20_000, hw=(32, 32), seed=0):
  key = jax.random.key(seed)
  draws = jax.jit(jax.vmap(lambda r: mix.draw(jax.random.fold_in(key, r), hw, cfg)))
  return jax.tree.map(np.asarray, draws(jnp.arange(n)))


@functools.cache
def _jitted(cfg_items, num_classes):
  cfg = ml_collections.ConfigDict(dict(cfg_items))
  return jax.jit(lambda x, y, k, i, s: mix.apply(x, y, k, i, cfg, num_classes, s))


def _apply(images, labels, key, first, cfg, num_classes, smoothing=0.0):
  """mix.apply, compiled once per config, class count and batch shape."""
  fn = _jitted(tuple(sorted(cfg.items())), num_classes)
  return jax.tree.map(np.asarray, fn(images, labels, key, first, smoothing))


def _batch(b=16, hw=(28, 28), seed=0, num_classes=10):
  """Random images; labels 0, 1, 2, ...: every example's partner has another class."""
  images = np.random.default_rng(seed).random((b, *hw, 3)).astype(np.float32)
  return images, np.arange(b, dtype=np.int32) % num_classes


def _lam(targets, labels):
  """Each row's lam, read off unsmoothed targets (partners have other classes)."""
  return targets[np.arange(len(labels)), labels]


def _beta_distance(lam, alpha):
  """Kolmogorov-Smirnov distance on a grid inside (0, 1): at small alpha some draws round
  to exactly 1.0 in float32 (and the example is not mixed), as in timm."""
  grid = np.linspace(0.001, 0.999, 999)
  ecdf = np.searchsorted(np.sort(lam), grid, side="right") / len(lam)
  return np.max(np.abs(ecdf - scipy.stats.beta(alpha, alpha).cdf(grid)))


# Only in make test; on the newest stack test_cutmix_pastes_a_clipped_box_... covers it.
@pytest.mark.slow
def test_mixup_lam_follows_beta_alpha_alpha():
  lam, cutmix, _ = _draws(_cfg(mixup_alpha=0.2))
  assert not np.any(cutmix)
  assert _beta_distance(lam, 0.2) < 0.015  # 99.9% quantile at n=20,000: 0.0138.
  assert _beta_distance(lam, 0.3) > 0.03  # The check can fail.


# Only in make test; on the newest stack test_cutmix_pastes_a_clipped_box_... covers it.
@pytest.mark.slow
def test_mix_prob_switch_prob_and_each_kinds_alpha():
  lam, cutmix, _ = _draws(MIXED)
  assert abs(cutmix.mean() - 0.3) < 0.015
  mixed = lam < 1
  assert abs(mixed[~cutmix].mean() - 0.6) < 0.015
  assert _beta_distance(lam[~cutmix & mixed], 0.8) < 0.02  # n ~8,400: 0.0212.
  assert abs(mixed[cutmix].mean() - 0.6) < 0.03  # Boxes under 2x2 pixels are empty.


def test_cutmix_pastes_a_clipped_box_of_area_one_minus_lam():
  """timm's box: sides sqrt(1 - lam) of the image's around a uniform centre, clipped to
  the image (often, at alpha 1); lam corrected to the area kept, as the pixels show."""
  b, hw = 256, (28, 28)
  # Constant images, one value per row: the pixels that changed are the pasted box.
  images = np.broadcast_to(np.arange(b, dtype=np.float32)[:, None, None, None], (b, *hw, 1))
  labels = np.arange(b, dtype=np.int32) % 2
  mixed, targets, _ = _apply(images, labels, jax.random.key(3), 0, _cfg(cutmix_alpha=1.0), 2)
  pasted = mixed == (np.arange(b) ^ 1)[:, None, None, None]
  assert np.all(pasted | (mixed == images))
  np.testing.assert_allclose(pasted.mean(axis=(1, 2, 3)), 1 - _lam(targets, labels), atol=1e-6)
  rows, cols = pasted.any(axis=2)[..., 0], pasted.any(axis=1)[..., 0]
  assert np.array_equal(pasted.sum(axis=(1, 2, 3)), rows.sum(1) * cols.sum(1))  # Boxes.
  assert rows[:, 0].any() and cols[:, -1].any()  # Clipped at the borders.
  assert 0.3 < pasted.mean() < 0.6


def test_each_example_is_blended_or_pasted_with_its_neighbour():
  images, labels = _batch()
  mixed, targets, dominant = _apply(images, labels, jax.random.key(1), 0, MIXED, 10)
  lam = _lam(targets, labels)
  other = images[np.arange(16) ^ 1]
  kinds = set()
  for i in range(16):
    if lam[i] == 1:
      kinds.add("kept")
      np.testing.assert_array_equal(mixed[i], images[i])
    elif np.allclose(mixed[i], lam[i] * images[i] + (1 - lam[i]) * other[i], atol=1e-6):
      kinds.add("mixup")
    else:
      kinds.add("cutmix")
      pasted = np.all(mixed[i] == other[i], axis=-1)
      assert np.all(pasted | np.all(mixed[i] == images[i], axis=-1))
      assert pasted.mean() == pytest.approx(1 - lam[i], abs=1e-6)
  assert kinds == {"kept", "mixup", "cutmix"}
  y = np.eye(10)[labels]
  np.testing.assert_allclose(targets, lam[:, None] * y + (1 - lam[:, None]) * y[np.arange(16) ^ 1])
  np.testing.assert_array_equal(dominant, np.where(lam >= 0.5, labels, labels[np.arange(16) ^ 1]))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_label_mass_is_conserved(smoothing):
  images, labels = _batch()
  _, targets, _ = _apply(images, labels, jax.random.key(2), 0, MIXED, 10, smoothing)
  np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-6)
  assert targets.min() >= smoothing / 10 - 1e-7
  assert targets.max() <= 1 - smoothing + smoothing / 10 + 1e-7


def test_mix_prob_zero_is_the_identity_and_smoothing_is_applied_once():
  images, labels = _batch()
  cfg = _cfg(mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=0.0)
  mixed, targets, dominant = _apply(images, labels, jax.random.key(0), 0, cfg, 10, 0.2)
  np.testing.assert_array_equal(mixed, images)
  np.testing.assert_array_equal(dominant, labels)
  np.testing.assert_allclose(targets, 0.8 * np.eye(10)[labels] + 0.02, atol=1e-7)
  # Soft targets carry the smoothing: the task does not smooth them again.
  task = tasks.get(
    ml_collections.ConfigDict({"name": "classification", "label_smoothing": 0.2}), 10
  )
  assert task.num_classes == 10
  logits = jax.random.normal(jax.random.key(5), (16, 10))
  plain, _ = task.loss(logits, {"label": labels}, None)
  soft, metrics = task.loss(logits, {"label": labels, "target": targets}, None)
  np.testing.assert_allclose(soft, plain, rtol=1e-6)
  assert metrics["accuracy"].shape == (16,)


def test_mixed_batch_does_not_depend_on_the_device_split():
  images, labels = _batch()
  key = jax.random.key(7)
  whole = _apply(images, labels, key, 0, MIXED, 10, 0.1)
  parts = [
    _apply(images[i : i + 4], labels[i : i + 4], key, i, MIXED, 10, 0.1) for i in range(0, 16, 4)
  ]
  for w, p in zip(whole, zip(*parts, strict=True), strict=True):
    np.testing.assert_array_equal(w, np.concatenate(p))
  assert not np.allclose(whole[0], images)


# ------------------------------------------------------------------- training


def _run(exp, steps):
  state = exp.init_state()
  for s in range(steps):
    state, metrics, bad = exp.train_chunk(state, s, 1)
    assert int(exp.par.to_host(bad)) < 0
  return exp.par.to_host(state), exp.par.to_host(metrics).compute()


def _equal_bits(a, b):
  return all(
    np.array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


_MIX_APPLY = mix.apply
MIXING = {
  "augment.mixup_alpha": 0.8,
  "augment.cutmix_alpha": 1.0,
  "augment.mix_prob": 0.8,
  "task.label_smoothing": 0.1,
}


# Only in make test; on the newest stack test_mixed_batch_does_not_depend_on_the_device_split
# covers it.
@pytest.mark.slow
def test_mixed_training_is_bitwise_the_same_on_one_and_four_devices(synthetic_data, monkeypatch):
  calls = []
  monkeypatch.setattr(mix, "apply", lambda *a: calls.append(a[3]) or _MIX_APPLY(*a))
  c = tiny_config(topology_invariant_shards=4, **MIXING)
  four, m4 = _run(experiment.Experiment(c), 2)
  one, m1 = _run(experiment.Experiment(c, parallel.DataParallel(jax.devices()[:1])), 2)
  assert len(calls) == 2  # Traced into each topology's train step.
  assert _equal_bits(four.params, one.params)
  # Metrics are averaged across devices in another order.
  assert m4["loss"] == pytest.approx(m1["loss"], rel=1e-6)
  assert m4["accuracy"] == pytest.approx(m1["accuracy"], rel=1e-6)


@pytest.mark.parametrize(
  "overrides,match",
  [
    (
      dict(batch_size=36),
      "per-device batch must be even, got 9: set --config.batch_size to a multiple of 8",
    ),
    ({"augment.mixup_alpha": -1.0}, "augment.mixup_alpha must be a number >= 0"),
    ({"augment.mix_prob": 1.5}, r"augment.mix_prob must be in \[0, 1\]"),
  ],
)
def test_bad_mixing_settings_are_one_sentence(synthetic_data, overrides, match):
  with pytest.raises(UserError, match=match):
    experiment.Experiment(tiny_config(**{"augment.mixup_alpha": 0.2, **overrides}))


def test_mixing_needs_a_classification_task(synthetic_data):
  c = tiny_config(**{"augment.cutmix_alpha": 1.0})
  c.task.name = "reconstruction"
  with pytest.raises(UserError, match="Mixup and CutMix mix class labels, which task"):
    experiment.Experiment(c)
