"""BatchNorm, EMA, gradient accumulation, bfloat16, augmentation, auxiliary losses and
the reconstruction task, on 4 fake CPU devices and synthetic data."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import load_config, tiny_config
from flax import nnx

from flaxtrain import experiment, loop, parallel, steps
from flaxtrain.data import augment
from flaxtrain.errors import UserError
from flaxtrain.models import adapters


def _small_resnet(**overrides):
  c = tiny_config(**overrides)
  c.model = ml_collections.ConfigDict(
    dict(name="resnet_small", stage_sizes=(1, 1), width=8, dropout=0.0, stem="small")
  )
  return c


def _run(exp, steps, state=None):
  """Trains `steps` single steps from `state` (default: fresh); returns the states."""
  state = exp.init_state() if state is None else state
  states = []
  for s in range(steps):
    state, _, bad = exp.train_chunk(state, s, 1)
    assert int(exp.par.to_host(bad)) < 0
    states.append(exp.par.to_host(state))
  return state, states


def _max_diff(a, b):
  return max(
    float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


# ---------------------------------------------------------------- BatchNorm


# Only in make test; on the newest stack the BatchNorm test below covers it.
@pytest.mark.slow
def test_batch_stats_are_updated_in_training_and_used_in_eval(synthetic_data):
  exp = experiment.Experiment(_small_resnet())
  fresh = exp.init_state()
  init_stats = exp.par.to_host(fresh.model_state["batch_stats"])
  state, _ = _run(exp, 5, fresh)
  stats = exp.par.to_host(state.model_state["batch_stats"])
  assert _max_diff(stats, init_stats) > 1e-3  # Running averages moved.
  with_stats = exp.evaluate(state)
  reset = state.replace(model_state={"batch_stats": exp.par.replicate(init_stats)})
  assert with_stats["eval_loss"] != pytest.approx(exp.evaluate(reset)["eval_loss"], rel=1e-3)


def test_a_linear_probe_keeps_the_backbone_and_its_batch_stats_as_they_were(synthetic_data):
  """optimizer.freeze='backbone': only the head moves, and only the head's EMA; BatchNorm
  normalises with the running statistics (as in eval) and they stay bitwise as they were."""
  exp = experiment.Experiment(_small_resnet(**{"optimizer.freeze": "backbone", "ema_decay": 0.9}))
  before = exp.par.to_host(exp.init_state())
  state, _ = _run(exp, 3)  # Donates its fresh state: compared on the host.
  after = exp.par.to_host(state)
  assert _max_diff(after.model_state, before.model_state) == 0
  for name in before.params:
    moved = _max_diff(after.params[name], before.params[name])
    assert (moved > 0) == (name == "Dense_0"), name
    # The EMA of a frozen param is the param, bitwise (not averaged again every step).
    ema_moved = _max_diff(after.ema_params[name], before.params[name])
    assert (ema_moved > 0) == (name == "Dense_0"), name


def test_a_regex_freeze_keeps_its_batchnorm_statistics(synthetic_data):
  """optimizer.freeze=<regex>: a BatchNorm whose scale and bias are both frozen normalises
  with its running statistics and keeps them bitwise (timm's FrozenBatchNorm2d); every
  other BatchNorm, one with only its scale frozen too, updates its own."""
  freeze = "conv_init|bn_init|BasicBlock_0/|BasicBlock_1/norm_proj/scale"
  exp = experiment.Experiment(_small_resnet(**{"optimizer.freeze": freeze}))
  before = exp.par.to_host(exp.init_state())
  state, _ = _run(exp, 3)
  after = exp.par.to_host(state)
  old, new = before.model_state["batch_stats"], after.model_state["batch_stats"]
  frozen = [("bn_init",), ("BasicBlock_0", "BatchNorm_0"), ("BasicBlock_0", "BatchNorm_1")]
  updated = [("BasicBlock_1", "BatchNorm_0"), ("BasicBlock_1", "norm_proj")]
  get = lambda tree, path: tree[path[0]] if len(path) == 1 else tree[path[0]][path[1]]  # noqa: E731
  for path in frozen:
    assert _max_diff(get(new, path), get(old, path)) == 0, path
  for path in updated:
    assert _max_diff(get(new, path), get(old, path)) > 1e-4, path
  assert _max_diff(after.params["BasicBlock_0"], before.params["BasicBlock_0"]) == 0
  assert _max_diff(after.params["BasicBlock_1"], before.params["BasicBlock_1"]) > 1e-4


def _linen_norms(by):
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      def norm(name):
        if by == "field":
          return nn.BatchNorm(use_running_average=not train, name=name)(x)
        if by == "keyword":
          return nn.BatchNorm(name=name)(x, use_running_average=not train)
        return nn.BatchNorm(name=name)(x, not train)

      return norm("frozen"), norm("free")

  return adapters.LinenModel(Net())


class _NNXNorms(nnx.Module):
  def __init__(self, rngs):
    self.frozen = nnx.BatchNorm(4, rngs=rngs)
    self.free = nnx.BatchNorm(4, rngs=rngs)

  def __call__(self, x):
    return self.frozen(x), self.free(x)


@pytest.mark.parametrize("by", ["field", "keyword", "position", "nnx"])
def test_frozen_batchnorm_uses_running_statistics_in_linen_and_nnx_models(by):
  """A frozen BatchNorm (frozen_norms matches its scale and bias) normalises with its
  running statistics and keeps them, however a linen model sets use_running_average (on
  the module, or at call time by keyword or position) and in an NNX model; an unmatched
  BatchNorm normalises with the batch's and updates its statistics."""
  model = adapters.NNXModel(_NNXNorms, {}) if by == "nnx" else _linen_norms(by)
  x = jax.random.normal(jax.random.key(0), (16, 4)) * 3.0 + 2.0
  variables = model.init({"params": jax.random.key(1)}, x, train=False)
  frozen = re.compile("^frozen/").search
  (out, free), new = model.apply(
    variables, x, train=True, mutable=["batch_stats"], frozen_norms=frozen
  )
  eval_out, _ = model.apply(variables, x, train=False)
  np.testing.assert_allclose(out, eval_out, rtol=1e-6)  # Running statistics.
  assert float(jnp.abs(jnp.mean(free, axis=0)).max()) < 1e-5  # The batch's.
  stats = variables["batch_stats"]
  assert _max_diff(new["batch_stats"]["frozen"], stats["frozen"]) == 0
  assert _max_diff(new["batch_stats"]["free"], stats["free"]) > 1e-3


def _convolutions(exp) -> int:
  """Convolutions in the optimized program of one train step."""
  state = exp.init_state()
  exp.train_chunk(state, 0, 1)  # Compiles it with the input's specs.
  batches = exp.data.train_batches(0, 1, exp.plan.steps_per_dispatch)
  hlo = (
    exp._train_chunk.lower(state, batches.inputs, np.int32(1), exp._no_metrics, exp._no_bad)
    .compile()
    .as_text()
  )
  return hlo.count(" convolution(")


def test_a_linear_probe_runs_the_backbone_forward_only(synthetic_data):
  """No gradient of a frozen parameter is computed (nor averaged, nor checked for NaN): the
  probe's step has the forward pass's convolutions and none of the backward's (it had all
  of them before: the non-finite guard read the backbone's gradients)."""
  probe = experiment.Experiment(_small_resnet(**{"optimizer.freeze": "backbone"}))
  kernels = [p for p in jax.tree.leaves(probe.init_state().params) if p.ndim == 4]
  assert _convolutions(probe) == len(kernels)
  assert _convolutions(experiment.Experiment(_small_resnet())) > 2 * len(kernels)


@pytest.mark.parametrize(
  "path", [{}, {"grad_accum_steps": 2}, {"topology_invariant_shards": 8}], ids=str
)
def test_frozen_layers_stay_and_the_rest_trains_on_every_gradient_path(synthetic_data, path):
  """A regex freeze of the first convolution: it stays bitwise, the rest moves, and the
  accumulated and topology-invariant gradients train as the plain one does."""
  freeze = {"optimizer.freeze": "Conv_0"}
  fresh = experiment.Experiment(tiny_config(**freeze))
  before = fresh.par.to_host(fresh.init_state().params)
  _, plain = _run(fresh, 3)
  _, other = _run(experiment.Experiment(tiny_config(**freeze, **path)), 3)
  after = other[-1].params
  assert _max_diff(after["Conv_0"], before["Conv_0"]) == 0
  assert all(_max_diff(after[k], before[k]) > 1e-4 for k in before if k != "Conv_0")
  assert _max_diff(after, plain[-1].params) < 2e-5


def test_batchnorm_training_does_not_depend_on_the_device_count(synthetic_data):
  """Statistics over the global batch: 1 device and 4 devices take the same steps."""
  c = _small_resnet()
  four = experiment.Experiment(c)
  one = experiment.Experiment(c, parallel.DataParallel(jax.devices()[:1]))
  _, s4 = _run(four, 3)
  _, s1 = _run(one, 3)
  assert _max_diff(s4[-1].params, s1[-1].params) < 1e-4
  assert _max_diff(s4[-1].model_state, s1[-1].model_state) < 1e-4


# ---------------------------------------------------------------------- EMA


# Only in make test; on the newest stack test_ema_is_saved_and_restored_... trains with EMA.
@pytest.mark.slow
def test_ema_follows_the_decay_recursion_and_is_evaluated(synthetic_data):
  c = tiny_config(ema_decay=0.9)
  exp = experiment.Experiment(c)
  fresh = exp.init_state()
  ema = exp.par.to_host(fresh.params)
  state, states = _run(exp, 4, fresh)
  for step, s in enumerate(states):
    d = min(0.9, (1 + step) / (10 + step))
    ema = jax.tree.map(lambda e, p, d=d: d * e + (1 - d) * p, ema, s.params)
  assert _max_diff(ema, states[-1].ema_params) < 1e-6
  assert _max_diff(states[-1].params, states[-1].ema_params) > 1e-4
  # Eval uses the EMA, not the raw params.
  assert exp.evaluate(state) == exp.evaluate(state.replace(params=state.ema_params))
  assert exp.eval_variables(state)["params"] is not None
  assert _max_diff(exp.eval_variables(state)["params"], states[-1].ema_params) == 0


def test_ema_is_saved_and_restored_with_the_checkpoint(synthetic_data, tmp_path, monkeypatch):
  c = tiny_config(ema_decay=0.9, num_epochs=1)
  loop.train_and_evaluate(c, str(tmp_path / "run"))
  exp = experiment.Experiment(c)
  monkeypatch.chdir(tmp_path)  # A relative workdir, as users type it.
  state, step = exp.restore("run")
  assert step == 32
  host = exp.par.to_host(state)
  assert _max_diff(host.params, host.ema_params) > 1e-4


# ------------------------------------------------------ gradient accumulation


# Only in make test; on the newest stack test_nnx_vit_with_bf16_accumulation_... (test_user_models)
# accumulates.
@pytest.mark.slow
def test_gradient_accumulation_equals_one_big_batch(synthetic_data):
  one = experiment.Experiment(tiny_config())
  accumulated = experiment.Experiment(tiny_config(grad_accum_steps=4))
  _, a = _run(one, 3)
  _, b = _run(accumulated, 3)
  assert _max_diff(a[-1].params, b[-1].params) < 2e-5


def test_gradient_accumulation_must_divide_the_per_device_batch(synthetic_data):
  with pytest.raises(UserError, match="grad_accum_steps 3 does not divide the per-device"):
    experiment.Experiment(tiny_config(grad_accum_steps=3))


# ------------------------------------------------- topology-invariant reduction


def _equal_bits(a, b):
  return all(
    np.array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


# Only in make test; on the newest stack the test below runs the same path; the 2-process
# bitwise run (test_multiprocess) checks the bits.
@pytest.mark.slow
def test_topology_invariant_shards_give_the_same_bits_on_1_2_and_4_devices(synthetic_data):
  """Params and AdamW state bitwise equal after 6 steps, with dropout and augmentation on
  (whose keys follow the shard and the example, not the device)."""
  c = tiny_config(
    topology_invariant_shards=4,
    **{"model.dropout": 0.3, "augment.flip": True, "augment.crop_padding": 2},
  )
  exps = {n: experiment.Experiment(c, parallel.DataParallel(jax.devices()[:n])) for n in (1, 2, 4)}
  states = {n: _run(exp, 6)[1][-1] for n, exp in exps.items()}
  one = states[1]
  assert _max_diff(one.params, exps[1].par.to_host(exps[1].init_state().params)) > 1e-4
  for n in (2, 4):
    assert _equal_bits(states[n].params, one.params), n
    assert _equal_bits(states[n].opt_state, one.opt_state), n


def test_topology_invariant_shards_match_the_default_reduction_closely(synthetic_data):
  """The same mean gradient, summed in another order: the same training to rounding."""
  _, a = _run(experiment.Experiment(tiny_config()), 3)
  _, b = _run(experiment.Experiment(tiny_config(topology_invariant_shards=8)), 3)
  assert 0 < _max_diff(a[-1].params, b[-1].params) < 2e-5


@pytest.mark.parametrize(
  "overrides,match",
  [
    (dict(topology_invariant_shards=6), "must be 0 .off. or a power of two"),
    (dict(topology_invariant_shards=2), "a multiple of the 4 devices"),
    (dict(topology_invariant_shards=128), "does not divide batch_size 64"),
    (dict(topology_invariant_shards=8, grad_accum_steps=2), "set --config.grad_accum_steps=1"),
  ],
)
def test_topology_invariant_shards_bad_settings_are_one_sentence(synthetic_data, overrides, match):
  with pytest.raises(UserError, match=match):
    experiment.Experiment(tiny_config(**overrides))


def test_topology_invariant_shards_refuse_batchnorm(synthetic_data):
  exp = experiment.Experiment(_small_resnet(topology_invariant_shards=4))
  with pytest.raises(UserError, match="running statistics .e.g. BatchNorm"):
    exp.train_chunk(exp.init_state(), 0, 1)


# ----------------------------------------------------------------- bfloat16


def test_bfloat16_trains_stays_finite_and_keeps_float32_state(synthetic_data):
  exp = experiment.Experiment(_small_resnet(compute_dtype="bfloat16"))
  state = exp.init_state()
  before = exp.evaluate(state)["eval_loss"]
  state, states = _run(exp, 20, state)
  after = exp.evaluate(state)
  assert np.isfinite(after["eval_loss"]) and after["eval_loss"] < before
  for leaf in jax.tree.leaves((states[-1].params, states[-1].opt_state, states[-1].model_state)):
    assert leaf.dtype in (np.float32, np.int32), leaf.dtype


# ------------------------------------------------------------- augmentation


def _aug_cfg(**kw):
  return ml_collections.ConfigDict({"crop_padding": 0, "flip": False, "erase_prob": 0.0, **kw})


# Only in make test; on the newest stack test_mixed_batch_does_not_depend_on_the_device_split
# and test_randaugment's test_the_same_on_one_device_and_split_over_four cover it.
@pytest.mark.slow
def test_augmentation_is_per_example_and_independent_of_the_device_split():
  images = jnp.asarray(np.random.default_rng(0).random((8, 28, 28, 1)), jnp.float32)
  cfg = _aug_cfg(crop_padding=4, flip=True, erase_prob=0.5)
  key = jax.random.key(3)
  whole = augment.apply(images, key, 0, cfg)
  halves = jnp.concatenate(
    [augment.apply(images[:4], key, 0, cfg), augment.apply(images[4:], key, 4, cfg)]
  )
  np.testing.assert_array_equal(whole, halves)
  assert not np.allclose(whole, images)
  assert not np.allclose(augment.apply(images, jax.random.key(4), 0, cfg), whole)


def test_flip_mirrors_and_crop_shifts():
  image = jnp.arange(28 * 28, dtype=jnp.float32).reshape(1, 28, 28, 1)
  images = jnp.repeat(image, 64, 0)
  flipped = augment.apply(images, jax.random.key(0), 0, _aug_cfg(flip=True))
  mirrored = [bool(jnp.all(f == image[0, :, ::-1])) for f in flipped]
  kept = [bool(jnp.all(f == image[0])) for f in flipped]
  assert all(m or k for m, k in zip(mirrored, kept, strict=True))
  assert 10 < sum(mirrored) < 54
  cropped = augment.apply(images, jax.random.key(0), 0, _aug_cfg(crop_padding=2))
  # Every crop is the image shifted by at most 2 pixels: the centre survives somewhere.
  centre = image[0, 10:18, 10:18]
  for c in cropped:
    found = any(
      bool(jnp.all(c[10 + dy : 18 + dy, 10 + dx : 18 + dx] == centre))
      for dy in range(-2, 3)
      for dx in range(-2, 3)
    )
    assert found
  assert sum(bool(jnp.all(c == image[0])) for c in cropped) < 16


# Only in make test; on the newest stack test_mixed_batch_does_not_depend_on_the_device_split
# and test_randaugment's test_the_same_on_one_device_and_split_over_four cover it.
@pytest.mark.slow
def test_augmented_training_is_identical_on_one_and_four_devices(synthetic_data):
  c = tiny_config(**{"augment.crop_padding": 2, "augment.flip": True, "augment.erase_prob": 0.5})
  _, s4 = _run(experiment.Experiment(c), 3)
  _, s1 = _run(experiment.Experiment(c, parallel.DataParallel(jax.devices()[:1])), 3)
  assert _max_diff(s4[-1].params, s1[-1].params) < 1e-5


def test_bad_augmentation_settings_are_one_sentence(synthetic_data):
  with pytest.raises(UserError, match="augment.crop_padding must be an integer"):
    experiment.Experiment(tiny_config(**{"augment.crop_padding": 40}))


# ---------------------------------------------- reconstruction and aux losses


def _autoencoder_config(**overrides):
  c = load_config("fashion_autoencoder")
  c.batch_size = 64
  c.eval_batch_size = 128
  c.num_epochs = 2
  c.log_every_steps = 8
  c.model.encoder = (64,)
  c.model.decoder = (64,)
  c.model.latent = 8
  for k, v in overrides.items():
    c.model[k] = v
  return c


def test_autoencoder_loss_falls_and_reports_reconstruction_error(synthetic_data, tmp_path):
  c = _autoencoder_config()
  exp = experiment.Experiment(c)
  before = exp.evaluate(exp.init_state())
  summary = loop.train_and_evaluate(c, str(tmp_path))
  # BCE against grey levels has a floor (their entropy): the squared error shows the fall.
  assert summary["eval_loss"] < before["eval_loss"]
  assert summary["eval_mse"] < 0.8 * before["eval_mse"], (before, summary)
  assert "eval_accuracy" not in summary
  pred = experiment.Experiment(c).predict(experiment.Experiment(c).restore(str(tmp_path))[0], num=5)
  assert pred["output"].shape == (5, 28, 28, 1)
  assert 0.0 <= pred["output"].min() and pred["output"].max() <= 1.0


def test_encoder_and_decoder_are_callable_apart(synthetic_data):
  c = _autoencoder_config()
  exp = experiment.Experiment(c)
  variables = exp.eval_variables(exp.init_state())
  x = jnp.zeros((3, 28, 28, 1))
  z = exp.model.apply(variables, x, method=exp.model.encode)
  assert z.shape == (3, 8)
  out = exp.model.apply(variables, z, method=exp.model.decode)
  np.testing.assert_allclose(out, exp.model.apply(variables, x), rtol=1e-6)


def test_an_auxiliary_loss_adds_its_gradient(synthetic_data):
  """One SGD step (lr 1): the update changes by exactly -grad(aux loss)."""
  lam = 0.01

  def step_params(activity_l1):
    c = _autoencoder_config(activity_l1=activity_l1)
    c.optimizer.name, c.optimizer.momentum, c.optimizer.weight_decay = "sgd", 0.0, 0.0
    c.optimizer.learning_rate, c.schedule.name = 1.0, "constant"
    exp = experiment.Experiment(c)
    state = exp.init_state()
    params0 = exp.par.to_host(state.params)
    state, metrics, _ = exp.train_chunk(state, 0, 1)
    values = exp.par.to_host(metrics).compute()
    return exp, params0, exp.par.to_host(state.params), values

  exp, p0, plain, plain_metrics = step_params(0.0)
  _, _, with_aux, aux_metrics = step_params(lam)
  assert plain_metrics["aux_loss"] == 0.0 and aux_metrics["aux_loss"] > 0.0
  idx = exp.data.plan.train_indices(0, 1, 1)[0]
  x = steps.preprocess(exp.data.train["image"][idx])

  def aux(params):
    z = exp.model.apply({"params": params}, x, method=exp.model.encode)
    return lam * jnp.mean(jnp.sum(jnp.abs(z), -1))

  expected = jax.grad(aux)(p0)
  delta = jax.tree.map(lambda a, b: b - a, plain, with_aux)
  assert _max_diff(delta, jax.tree.map(lambda g: -g, expected)) < 1e-5
  assert _max_diff(expected, jax.tree.map(jnp.zeros_like, expected)) > 1e-4
  assert aux_metrics["aux_loss"] == pytest.approx(float(aux(p0)), rel=1e-4)


def test_top5_accuracy_is_reported_for_ten_classes(synthetic_data):
  exp = experiment.Experiment(tiny_config())
  result = exp.evaluate(exp.init_state())
  assert {"eval_loss", "eval_accuracy", "eval_top5_accuracy", "eval_examples"} <= set(result)
  assert result["eval_top5_accuracy"] >= result["eval_accuracy"]


def test_label_rank_counts_as_argmax_and_top_k_do_with_ties():
  from flaxtrain import tasks

  rng = np.random.default_rng(0)
  logits = rng.integers(0, 4, (512, 10)).astype(np.float32)  # Many ties.
  logits[:64] = rng.normal(size=(64, 10))
  logits[64] = 1.0  # All equal: only class 0 is top-1, classes 0..4 are top-5.
  labels = rng.integers(0, 10, 512).astype(np.int32)
  rank = np.asarray(tasks.label_rank(jnp.asarray(logits), jnp.asarray(labels)))
  _, best5 = jax.lax.top_k(jnp.asarray(logits), 5)
  np.testing.assert_array_equal(rank == 0, np.argmax(logits, -1) == labels)
  np.testing.assert_array_equal(rank < 5, np.any(np.asarray(best5) == labels[:, None], -1))
  assert 0 < np.mean(rank < 5) < 1 and 0 < np.mean(rank == 0) < 1


# ------------------------------------------------------------- recipe smoke runs


# Only in make test: on the newest stack test_batchnorm_... trains a ResNet, test_models builds
# every registered model and test_autoencoder_loss_falls_... trains the autoencoder.
@pytest.mark.slow
@pytest.mark.parametrize(
  "name,shape",
  [
    ("cifar10_resnet18", (32, 32, 3)),
    ("fashion_resnet", (28, 28, 1)),
    ("fashion_autoencoder", (28, 28, 1)),
  ],
)
def test_recipe_configs_take_steps(monkeypatch, name, shape):
  """The recipes as written (model, augmentation, dtype, optimizer), on stand-in data."""
  from conftest import synthetic_split

  from flaxtrain.data import memory, prepare, sources

  def load(dataset, **_):
    spec = prepare.DatasetSpec(
      name=dataset,
      image_shape=shape,
      num_classes=10,
      class_names=tuple(str(i) for i in range(10)),
      train_split="train",
      eval_split="test",
      num_train=64,
      num_eval=16,
    )
    return spec, synthetic_split(64, 0, shape), synthetic_split(16, 1, shape)

  monkeypatch.setattr(memory, "load", load)
  monkeypatch.setattr(sources, "inspect", lambda config: sources.Facts(shape, 80))
  c = load_config(name)
  c.batch_size, c.eval_batch_size = 16, 16
  exp = experiment.Experiment(c)
  state, _ = _run(exp, 2)
  result = exp.evaluate(state)
  assert np.isfinite(result["eval_loss"]) and result["eval_examples"] == 16
