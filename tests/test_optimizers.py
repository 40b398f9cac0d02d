import itertools
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import load_config

from flaxtrain import optimizers
from flaxtrain.errors import UserError


def _cfgs(opt, sched, **extra):
  c = load_config("fashion_cnn")
  c.optimizer.name = opt
  c.optimizer.learning_rate = 0.05
  c.schedule.name = sched
  c.schedule.warmup_epochs = 1.0
  c.schedule.boundaries_epochs = (5.0, 8.0)
  for k, v in extra.items():
    c.optimizer[k] = v
  return c.optimizer, c.schedule


@pytest.mark.parametrize(
  "opt,sched", list(itertools.product(sorted(optimizers.OPTIMIZERS), sorted(optimizers.SCHEDULES)))
)
def test_every_optimizer_and_schedule_lowers_a_quadratic(opt, sched):
  tx, schedule = optimizers.make(
    *_cfgs(opt, sched, weight_decay=1e-4, grad_clip_norm=10.0), steps_per_epoch=10, total_steps=100
  )
  params = {"w": jnp.full((3, 2), 2.0), "b": jnp.full((2,), -1.0)}
  loss = lambda p: sum(jnp.sum((x - 0.5) ** 2) for x in jax.tree.leaves(p))
  start = loss(params)

  def step(_, carry):  # One compiled loop: 100 eager updates dispatch thousands of ops.
    params, state = carry
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  params, _ = jax.jit(lambda p: jax.lax.fori_loop(0, 100, step, (p, tx.init(p))))(params)
  assert loss(params) < 0.5 * start
  assert float(schedule(0)) >= 0


def test_schedules_shape():
  _, warm = optimizers.make(*_cfgs("sgd", "warmup_cosine"), steps_per_epoch=10, total_steps=100)
  assert float(warm(0)) == 0.0 and float(warm(10)) == pytest.approx(0.05)
  assert float(warm(100)) == pytest.approx(0.0, abs=1e-6)
  _, pw = optimizers.make(*_cfgs("sgd", "piecewise"), steps_per_epoch=10, total_steps=100)
  assert [float(pw(s)) for s in (49, 50, 80)] == pytest.approx([0.05, 0.005, 0.0005])


def test_weight_decay_mask_spares_vectors():
  tx, _ = optimizers.make(
    *_cfgs("adamw", "constant", weight_decay=0.5), steps_per_epoch=1, total_steps=1
  )
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  assert float(jnp.abs(updates["bias"]).max()) == 0.0
  assert float(jnp.abs(updates["kernel"]).max()) > 0.0


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("name", "adamx", "Unknown optimizer 'adamx'.*adam, adamw, sgd"),
    ("learning_rate", -0.1, "learning_rate must be > 0"),
    ("weight_decay", -1.0, "weight_decay must be >= 0"),
  ],
)
def test_bad_optimizer_values(field, value, match):
  opt, sched = _cfgs("sgd", "constant")
  opt[field] = value
  with pytest.raises(UserError, match=match):
    optimizers.validate(opt, sched)


def test_unknown_schedule():
  opt, sched = _cfgs("sgd", "cosin")
  with pytest.raises(UserError, match="did you mean 'cosine'"):
    optimizers.validate(opt, sched)
  assert isinstance(sched, ml_collections.ConfigDict)


# ------------------------------------------------------------ layer decay and freezing


def _resnet_params():
  """A tiny ResNet's params (stem, BasicBlock_0..2, Dense_0) with random values."""
  from flaxtrain.models import resnet

  model = resnet.ResNet(4, stage_sizes=(2, 1), width=4, stem="small")
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
  rng = np.random.default_rng(1)  # NumPy's: jax.random compiles a program for every shape.
  return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), jnp.float32), shapes)


def _vit_params():
  """The param paths of an NNX ViT with two blocks (the pure dict of its nnx.Param state)."""
  leaf = jnp.ones((2, 2))
  block = {"attn": {"qkv": {"kernel": leaf}}, "mlp": {"fc1": {"kernel": leaf}}}
  return {
    "patch_embed": {"kernel": leaf, "bias": leaf[0]},
    "cls_token": leaf,
    "pos_embed": leaf,
    "blocks": {0: block, 1: block},
    "norm": {"scale": leaf[0]},
    "head": {"kernel": leaf, "bias": leaf[0]},
  }


def test_layer_scales_follow_timm_layer_decay():
  d = 0.5
  scales = optimizers.layer_scales(_resnet_params(), d)
  assert scales["conv_init"]["kernel"] == scales["bn_init"]["scale"] == d**4  # Stem: n + 1.
  assert [scales[f"BasicBlock_{k}"]["Conv_0"]["kernel"] for k in range(3)] == [d**3, d**2, d]
  assert scales["Dense_0"] == {"kernel": 1.0, "bias": 1.0}
  vit = optimizers.layer_scales(_vit_params(), d)
  assert vit["patch_embed"]["kernel"] == vit["cls_token"] == vit["pos_embed"] == d**3
  assert vit["blocks"][0]["attn"]["qkv"]["kernel"] == d**2
  assert vit["blocks"][1]["mlp"]["fc1"]["kernel"] == d
  assert vit["norm"]["scale"] == vit["head"]["kernel"] == 1.0


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_layer_decay_scales_the_whole_update_weight_decay_included(opt):
  params = _resnet_params()
  grads = jax.tree.map(lambda p: 0.1 * p + 0.01, params)
  updates = {}
  for decay in (1.0, 0.7):
    tx, _ = optimizers.make(
      *_cfgs(opt, "warmup_cosine", weight_decay=0.1, layer_decay=decay),
      steps_per_epoch=2,
      total_steps=10,
      params=lambda: params,  # As experiment.py passes it: a function, called once.
    )
    state = tx.init(params)
    for _ in range(3):  # Past the first (zero learning rate) warm-up step.
      updates[decay], state = tx.update(grads, state, params)
  expected = jax.tree.map(lambda u, s: u * s, updates[1.0], optimizers.layer_scales(params, 0.7))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), updates[0.7], expected
  )


def test_freeze_backbone_trains_only_the_head():
  params = _resnet_params()
  tx, _ = optimizers.make(
    *_cfgs("adamw", "constant", weight_decay=0.5, freeze="backbone", layer_decay=0.8),
    steps_per_epoch=1,
    total_steps=1,
    params=params,
  )
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  for name in params:
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params[name], new[name])
    assert all(jax.tree.leaves(same)) == (name != "Dense_0"), name
  # Frozen parameters keep no Adam moments: the state holds only the head's.
  head_size = sum(x.size for x in jax.tree.leaves(params["Dense_0"]))
  moments = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
  assert moments == 2 * head_size


def test_freeze_regex_freezes_the_matching_paths():
  params = _resnet_params()
  flags = optimizers.frozen(params, "conv_init|bn_init|BasicBlock_0/")
  assert flags["conv_init"]["kernel"] and flags["BasicBlock_0"]["Conv_0"]["kernel"]
  assert not flags["BasicBlock_1"]["Conv_0"]["kernel"] and not flags["Dense_0"]["kernel"]


@pytest.mark.parametrize(
  "extra,params,match",
  [
    ({"layer_decay": 0.0}, None, r"layer_decay must be in \(0, 1\]"),
    ({"layer_decay": 1.5}, None, r"layer_decay must be in \(0, 1\]"),
    ({"freeze": "conv_init("}, None, "is not a regular expression"),
    ({"freeze": "no_such_layer"}, "resnet", "matches no parameter"),
    ({"freeze": ".*"}, "resnet", "freezes every parameter"),
    ({"freeze": "backbone"}, "plain", "has none"),
    ({"layer_decay": 0.7}, "plain", "needs a model made of blocks"),
  ],
)
def test_bad_layer_decay_and_freeze(extra, params, match):
  tree = {"resnet": _resnet_params, "plain": lambda: {"w": jnp.ones((2, 2))}, None: lambda: None}
  with pytest.raises(UserError, match=match) as e:
    optimizers.make(
      *_cfgs("sgd", "constant", **extra), steps_per_epoch=1, total_steps=1, params=tree[params]
    )
  assert str(e.value).endswith(".") and not re.search(r"\.\s+[A-Z]", str(e.value))
