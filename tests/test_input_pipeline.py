import jax
import numpy as np
import pytest
from conftest import synthetic_split

from flaxtrain import parallel
from flaxtrain.data import memory, plan
from flaxtrain.errors import UserError


def _pipe(
  devices=None, n_train=1000, n_eval=10_000, batch=64, eval_batch=256, on_device="auto", seed=0
):
  par = parallel.DataParallel(devices)
  return memory.MemorySource(
    synthetic_split(n_train, 0),
    synthetic_split(n_eval, 1),
    par=par,
    seed=seed,
    batch_size=batch,
    eval_batch_size=eval_batch,
    on_device=on_device,
  )


def _per_device_labels(batches: plan.Batches, split: dict, steps: int, start: int):
  """[steps, devices, per_device] labels as each device sees them: a chunk of `steps`
  from train step `start` (the state's step counter when the chunk runs)."""
  if "idx" in batches.inputs:
    arr = batches.inputs["idx"]
    # On device, the ids of the whole epoch are sent once; the chunk starts at the row of
    # its step (plan.at_step).
    first = int(plan.at_step(batches.inputs, np.int32(start)).get("offset", 0))
    shards = sorted(arr.addressable_shards, key=lambda s: s.index[1].start or 0)
    rows = [np.asarray(s.data)[first : first + steps] for s in shards]
    return np.stack([split["label"][r] for r in rows], 1)
  arr = batches.inputs["label"]
  shards = sorted(arr.addressable_shards, key=lambda s: s.index[1].start or 0)
  return np.stack([np.asarray(s.data) for s in shards], 1)


def test_four_devices_each_get_a_quarter_of_the_global_batch():
  pipe = _pipe()
  assert len(jax.devices()) == 4
  b = pipe.train_batches(0, 3, 5)
  labels = _per_device_labels(b, pipe.train, 5, 0)
  assert labels.shape == (5, 4, 16)
  perm = pipe.plan.permutation(0)
  expected = pipe.train["label"][perm[:192]].reshape(3, 64)
  np.testing.assert_array_equal(labels[:3].reshape(3, 64), expected)


def test_order_is_a_pure_function_of_seed_epoch_step():
  a, b = _pipe(), _pipe()
  np.testing.assert_array_equal(a.plan.train_indices(40, 10, 10), b.plan.train_indices(40, 10, 10))
  # Resuming mid-chunk sees the same rows as the uninterrupted sequence.
  full = a.plan.train_indices(10, 10, 10)
  np.testing.assert_array_equal(full[3:], b.plan.train_indices(13, 7, 7))
  # Each epoch is a permutation: no example repeats within an epoch.
  spe = a.plan.steps_per_epoch
  epoch = a.plan.train_indices(0, spe, spe).ravel()
  assert len(np.unique(epoch)) == len(epoch)
  assert not np.array_equal(a.plan.permutation(0), a.plan.permutation(1))
  assert not np.array_equal(a.plan.permutation(0), _pipe(seed=1).plan.permutation(0))


def test_batches_do_not_depend_on_device_count_or_layout():
  one = _pipe(devices=jax.devices()[:1])
  four = _pipe()
  host = _pipe(on_device="false")
  assert four.on_device and not host.on_device
  ref = _per_device_labels(one.train_batches(7, 4, 4), one.train, 4, 7).reshape(4, 64)
  for p in (four, host):
    got = _per_device_labels(p.train_batches(7, 4, 4), p.train, 4, 7).reshape(4, 64)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize(
  "n_eval,eval_batch,devices", [(10_000, 256, 4), (10_000, 1000, 3), (9_999, 256, 4), (7, 256, 2)]
)
def test_eval_counts_every_example_exactly_once(n_eval, eval_batch, devices):
  pipe = _pipe(devices=jax.devices()[:devices], n_eval=n_eval, eval_batch=eval_batch)
  idx, mask = pipe.plan.eval_indices()
  assert pipe.plan.eval_batch_size % devices == 0
  assert mask.sum() == n_eval
  counts = np.bincount(idx[mask > 0], minlength=n_eval)
  assert (counts == 1).all()


def test_batch_larger_than_dataset_is_refused():
  with pytest.raises(UserError, match="larger than the 1000 training examples"):
    _pipe(batch=2048)


def test_index_plan_is_safe_for_input_threads_at_epoch_boundaries():
  from concurrent.futures import ThreadPoolExecutor

  p = plan.IndexPlan(
    num_train=5000, num_eval=10, batch_size=100, eval_batch_size=10, num_devices=1, seed=3
  )
  steps = [s for e in range(6) for s in (e * 50 + 49, e * 50 + 50)] * 20  # Alternate epochs.
  expected = {
    s: plan.IndexPlan(
      num_train=5000, num_eval=10, batch_size=100, eval_batch_size=10, num_devices=1, seed=3
    ).step_indices(s)
    for s in set(steps)
  }
  with ThreadPoolExecutor(8) as pool:
    got = list(pool.map(p.step_indices, steps))
  assert all(np.array_equal(g, expected[s]) for s, g in zip(steps, got, strict=True))
