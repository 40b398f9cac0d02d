import itertools

import jax
import jax.numpy as jnp
import ml_collections
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
  state = tx.init(params)
  start = loss(params)
  for _ in range(100):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
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
