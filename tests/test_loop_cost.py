"""What the loop's cheap paths must keep: the same metrics and the same data order."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from flaxtrain import loop, parallel, steps
from flaxtrain import metrics as metrics_lib
from flaxtrain.data import memory, plan
from flaxtrain.experiment import Experiment


def _host(metrics):
  return {k: np.asarray(v) for k, v in parallel.DataParallel().to_host(metrics).compute().items()}


@pytest.mark.parametrize("dispatch", [1, 5])
def test_metrics_merged_on_the_device_equal_an_eager_merge(synthetic_data, dispatch):
  """The loop passes each chunk the metrics so far; the logged values are bitwise those of
  merging every chunk's own metrics after the fact, as the loop used to."""
  exp = Experiment(tiny_config(steps_per_dispatch=dispatch, log_every_steps=100))
  a = b = exp.init_state()
  a = jax.tree.map(lambda x: x.copy(), a)  # Each chunk donates its state.
  so_far, eager, step = None, None, 0
  while step < 23:
    n = min(dispatch, 23 - step)
    a, so_far, _ = exp.train_chunk(a, step, n, so_far)
    b, chunk, _ = exp.train_chunk(b, step, n)
    eager = chunk if eager is None else eager.merge(chunk)
    # Op-by-op merges are a dozen computations each: the host must not run 32 ahead of a
    # device (XLA:CPU then deadlocks a collective; see loop.MAX_CHUNKS_AHEAD).
    jax.block_until_ready((so_far, eager))
    step += n
  got, want = _host(so_far), _host(eager)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _source(num_devices=4, chunk=5):
  par = parallel.DataParallel(jax.devices()[:num_devices])
  rng = np.random.default_rng(0)
  split = {"image": rng.integers(0, 255, (203, 2, 2, 1), np.uint8), "label": np.arange(203)}
  return memory.MemorySource(
    split, split, par=par, seed=3, batch_size=8, eval_batch_size=8, on_device="true"
  )


def _ids(batches, start, i):
  """The example ids of the i-th batch of a chunk from step `start`, as the device reads
  them (plan.at_step, plan.take)."""
  inputs = plan.at_step(batches.inputs, np.int32(start))
  return np.asarray(inputs["idx"])[int(inputs["offset"]) + i]


def test_on_device_ids_follow_the_index_plan_across_epochs_and_resumes():
  """Chunks read a whole epoch's ids sent once; every step's batch is still the plan's,
  for chunks inside an epoch, across its end, and from any step a resume starts at."""
  src = _source()
  spe = src.plan.steps_per_epoch  # 25
  starts = [0, 5, 10, 20, 23, spe + 2, 3 * spe - 1, 3, 7 * spe]  # Backwards too (a jump).
  for start in starts:
    batches = src.train_batches(start, 5, 5)
    for i in range(5):
      np.testing.assert_array_equal(_ids(batches, start, i), src.plan.step_indices(start + i))
  resumed = _source()  # A fresh process resuming mid-epoch.
  batches = resumed.train_batches(spe + 7, 5, 5)
  for i in range(5):
    np.testing.assert_array_equal(_ids(batches, spe + 7, i), src.plan.step_indices(spe + 7 + i))


def test_ids_go_to_the_devices_once_per_epoch():
  src = _source()
  spe = src.plan.steps_per_epoch
  first = src.train_batches(0, 5, 5).inputs["idx"]
  for start in range(5, spe + 1, 5):  # Up to a chunk past the epoch's end.
    assert src.train_batches(start, 5, 5).inputs["idx"] is first
  assert src.train_batches(spe + 5, 5, 5).inputs["idx"] is not first


def test_the_non_finite_guard_sees_nan_and_inf_and_no_overflow():
  """Both ways of checking (products with zeros on the CPU, all(isfinite) elsewhere) see a
  NaN or an infinity anywhere in any gradient, eagerly and compiled; large finite
  gradients, whose sum would overflow, are finite."""
  big = {
    "a": jnp.full((4,), 3e38, jnp.float32),
    "b": jnp.ones((2, 2), jnp.float32),
    "conv": jnp.full((3, 3, 8, 16), -3e38, jnp.float32),
    "scalar": jnp.float32(3e38),
  }
  where = {"a": (3,), "b": (1, 0), "conv": (2, 1, 7, 15), "scalar": ()}
  checks = {
    "all_finite": steps.all_finite,
    "all_finite, jitted": jax.jit(steps.all_finite),
    "by products": lambda loss, g: jnp.isfinite(loss) & steps._finite_by_products(*g.values()),
    "by reduction": lambda loss, g: jnp.isfinite(loss) & steps._finite_by_reduction(*g.values()),
  }
  for name, check in checks.items():
    assert bool(check(jnp.float32(1.0), big)), name
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
      assert not bool(check(jnp.float32(bad), big)), (name, bad)
      for key, at in where.items():
        grads = {**big, key: big[key].at[at].set(bad)}
        assert not bool(check(jnp.float32(1.0), grads)), (name, bad, key)


def _leaves(par, tree):
  return jax.tree.leaves(par.to_host(tree))


@pytest.mark.parametrize("nonfinite", ["error", "skip"])
@pytest.mark.parametrize("dispatch", [1, 5])
def test_a_non_finite_step_applies_nothing(synthetic_data, monkeypatch, dispatch, nonfinite):
  """Params, optimizer and model state after a NaN step at step 3 are bitwise those after
  steps 0..2; 'error' keeps the step counter and reports the step, 'skip' moves it on."""
  monkeypatch.setenv(steps.NAN_STEP_ENV, "3")
  exp = Experiment(
    tiny_config(
      steps_per_dispatch=dispatch, log_every_steps=100, nonfinite=nonfinite, ema_decay=0.5
    )
  )
  par = exp.par

  def run(num_steps):
    state, step, bad, metrics = exp.init_state(), 0, None, None
    while step < num_steps:
      n = min(dispatch, num_steps - step)
      state, metrics, bad = exp.train_chunk(state, step, n, metrics)
      step += n
    return state, metrics, int(par.to_host(bad))

  want, _, bad = run(3)
  assert bad == -1
  got, metrics, bad = run(4)
  assert bad == (3 if nonfinite == "error" else -1)
  assert int(par.to_host(got.step)) == (3 if nonfinite == "error" else 4)
  assert int(par.to_host(metrics).compute()["nonfinite_steps"]) == 1
  for part in ("params", "opt_state", "model_state", "ema_params"):
    a, b = _leaves(par, getattr(got, part)), _leaves(par, getattr(want, part))
    for x, y in zip(a, b, strict=True):
      np.testing.assert_array_equal(x, y, err_msg=part)


def test_a_chunk_sends_nothing_from_the_host(synthetic_data, monkeypatch):
  """Each host-to-device transfer costs a chunk time (and on an accelerator a copy): after
  the first chunk of an epoch every argument of the jitted chunk is already on the devices,
  the rows of its batches found from the state's step."""
  exp = Experiment(tiny_config(steps_per_dispatch=5))
  state, step = exp.init_state(), 0
  state, _, _ = exp.train_chunk(state, step, 5)  # Compiles; sends the epoch's ids.
  step = 5
  calls = []
  compiled = exp._train_chunk
  monkeypatch.setattr(exp, "_train_chunk", lambda *a: calls.append(a) or compiled(*a))
  for n in (5, 5, 3, 5):
    state, _, _ = exp.train_chunk(state, step, n)
    step += n
  for args in calls:
    host = [type(x).__name__ for x in jax.tree.leaves(args) if not isinstance(x, jax.Array)]
    assert not host, host


@pytest.mark.parametrize("dispatch", [1, 5])
def test_one_device_runs_no_collective(synthetic_data, dispatch):
  """On one device the mean and the metrics' gather are the values themselves: the train
  chunk compiles without an all-reduce or all-gather (XLA:CPU would run each of them)."""
  par = parallel.DataParallel(jax.devices()[:1])
  exp = Experiment(tiny_config(steps_per_dispatch=dispatch), par)
  state = exp.init_state()
  exp.train_chunk(state, 0, 1)  # Compiles it with the input's specs.
  batches = exp.data.train_batches(0, 1, dispatch)
  hlo = (
    exp._train_chunk.lower(state, batches.inputs, np.int32(1), exp._no_metrics, exp._no_bad)
    .compile()
    .as_text()
  )
  assert "all-reduce" not in hlo and "all-gather" not in hlo


@pytest.mark.parametrize("dispatch", [1, 5])
def test_a_bad_step_passed_on_stops_every_later_chunk(synthetic_data, monkeypatch, dispatch):
  """The loop reads the non-finite flag only at log, eval and save boundaries; chunks in
  between get the flag so far, and none of them applies a step after the bad one."""
  monkeypatch.setenv(steps.NAN_STEP_ENV, "3")
  exp = Experiment(tiny_config(steps_per_dispatch=dispatch, log_every_steps=100))
  par = exp.par
  state, bad, step = exp.init_state(), None, 0
  while step < 12:
    n = min(dispatch, 12 - step)
    state, _, bad = exp.train_chunk(state, step, n, None, bad)
    step += n
  assert int(par.to_host(bad)) == 3
  assert int(par.to_host(state.step)) == 3  # Steps 0..2 applied, nothing after.
  want = exp.init_state()
  for s in range(3):
    want, _, _ = exp.train_chunk(want, s, 1)
  for a, b in zip(_leaves(par, state), _leaves(par, want), strict=True):
    np.testing.assert_array_equal(a, b)


def test_the_host_dispatches_at_most_a_few_chunks_ahead(synthetic_data, tmp_path, monkeypatch):
  """The host never reads the non-finite flag between logs, but it still waits for chunks
  to finish, at most MAX_CHUNKS_AHEAD ahead: XLA:CPU deadlocks a multi-device collective
  when a device has 32 computations in flight (tests/test_real_data.py on 4 devices, every
  time). It waits until half are done, not one chunk at a time: a wait every few chunks."""
  dispatched, done, waits = [], [-1], []
  real_chunk, real_wait = Experiment.train_chunk, jax.block_until_ready
  real_to_host = parallel.DataParallel.to_host

  def mark_done(x):
    for i, bad in enumerate(dispatched):
      if bad is x:
        done[0] = max(done[0], i)  # A flag is ready once its chunk and all before are.

  def train_chunk(self, *args, **kwargs):
    assert len(dispatched) - 1 - done[0] <= loop.MAX_CHUNKS_AHEAD, "too many chunks in flight"
    out = real_chunk(self, *args, **kwargs)
    dispatched.append(out[2])
    return out

  def wait(x):
    mark_done(x)
    waits.append(x)
    return real_wait(x)

  def to_host(self, tree):
    mark_done(tree)
    return real_to_host(self, tree)

  monkeypatch.setattr(Experiment, "train_chunk", train_chunk)
  monkeypatch.setattr(jax, "block_until_ready", wait)
  monkeypatch.setattr(parallel.DataParallel, "to_host", to_host)
  config = tiny_config(steps_per_dispatch=1, num_train_steps=30, log_every_steps=30)
  loop.train_and_evaluate(config, str(tmp_path))
  assert len(dispatched) == 30 and done[0] == 29
  # One wait per MAX_CHUNKS_AHEAD // 2 + 1 chunks (and one for the last chunk's save).
  assert len(waits) <= 30 // (loop.MAX_CHUNKS_AHEAD // 2 + 1) + 1, len(waits)


def test_evaluation_waits_for_the_chunk_before_the_one_it_dispatched(synthetic_data, monkeypatch):
  """A streamed eval split comes in many chunks: the host prepares the next while one runs,
  but never has more than two (and their merges) in flight, far below XLA:CPU's 32."""
  exp = Experiment(tiny_config())
  state = exp.init_state()
  one = exp.evaluate(state)
  chunk = next(exp.data.eval_batches())
  monkeypatch.setattr(exp.data, "eval_batches", lambda: iter([chunk] * 6))
  waits, real_wait = [], jax.block_until_ready
  monkeypatch.setattr(jax, "block_until_ready", lambda x: waits.append(x) or real_wait(x))
  six = exp.evaluate(state)
  assert len(waits) == 5  # Before each merge but the first.
  assert six["eval_examples"] == 6 * one["eval_examples"]
  assert six["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-6)


def test_packed_metrics_are_one_buffer_per_dtype_with_the_same_bits(synthetic_data):
  """The train chunk takes and returns its dozen metric scalars as one vector per dtype
  (each buffer of a jitted call costs the host time); unpacked, on the device or the host,
  they are the collection's own values, bit for bit and dtype for dtype."""
  collection = metrics_lib.train_metrics(("accuracy",))

  def single(loss, accuracy, lr):
    return collection.single_from_model_output(
      loss=jnp.asarray(loss, jnp.float32),
      aux_loss=jnp.float32(0.0),
      learning_rate=jnp.float32(lr),
      nonfinite=jnp.float32(0.0),
      accuracy=jnp.asarray(accuracy, jnp.float32),
    )

  m = single([0.1, 2.5, 3.0], [1.0, 0.0, 1.0], 3e-4).merge(single([7.25], [0.0], 1e-4))
  packed = metrics_lib.Packed.of(m)
  assert len(jax.tree.leaves(m)) == 10 and len(jax.tree.leaves(packed)) == 2
  for p in (packed, jax.jit(lambda p: metrics_lib.Packed.of(p.unpack()))(packed)):
    got_leaves = jax.tree.leaves(jax.device_get(p).unpack())
    for want, got in zip(jax.tree.leaves(m), got_leaves, strict=True):
      assert got.dtype == want.dtype and got.shape == want.shape
      np.testing.assert_array_equal(got, want)
    assert {k: float(v) for k, v in jax.device_get(p).compute().items()} == {
      k: float(v) for k, v in m.compute().items()
    }
  merged = packed.merge(packed).compute()
  assert float(merged["loss"]) == pytest.approx((0.1 + 2.5 + 3.0 + 7.25) / 4)

  exp = Experiment(tiny_config())
  _, metrics, _ = exp.train_chunk(exp.init_state(), 0, 1)
  assert isinstance(metrics, metrics_lib.Packed) and len(jax.tree.leaves(metrics)) == 2


def test_progress_gives_each_log_its_pace_and_notes_at_most_once_a_minute(monkeypatch):
  """The pace goes out with each log's metrics (one write per log); the work unit's note, a
  log-file line, at most every minute and at the last step (CLU's default cadence)."""
  notes, now = [], [0.0]
  work_unit = types.SimpleNamespace(set_notes=notes.append)
  monkeypatch.setattr(loop.platform, "work_unit", lambda: work_unit)
  monkeypatch.setattr(loop.time, "monotonic", lambda: now[0])
  report = loop._ChunkProgress(num_train_steps=1000)
  paces = {}
  for step in range(50, 1001, 50):  # A chunk of 50 steps every 10 s; a log every 100 steps.
    now[0] += 10.0
    pace = report(step, log=step % 100 == 0)
    if pace is not None:
      paces[step] = pace
  assert list(paces) == list(range(100, 1001, 100))  # Not at 50: the first chunk compiles.
  assert paces[100] == {"steps_per_sec": 5.0, "uptime": 20.0}
  assert all(p["steps_per_sec"] == 5.0 for p in paces.values())
  assert notes == [
    "5.0 steps/s, 35.0% (350/1000), ETA: 2m",
    "5.0 steps/s, 65.0% (650/1000), ETA: 1m",
    "5.0 steps/s, 95.0% (950/1000), ETA: 0m",
    "5.0 steps/s, 100.0% (1000/1000), ETA: 0m",
  ]


def test_default_dispatch_loops_on_the_device_for_models_without_convolutions(synthetic_data):
  """steps_per_dispatch 0 (the default) on the CPU: 25 steps per launch for a model without
  convolutions (the fashion_mlp MLP runs ~1.8x faster than at 1), 1 for one with them
  (XLA:CPU runs convolutions inside a loop ~11x slower); 25 on accelerators either way."""
  from flaxtrain import config_lib, experiment

  assert Experiment(tiny_config()).plan.steps_per_dispatch == 1  # The CNN.
  mlp = Experiment(tiny_config(model=config_lib.mlp_model(hidden=(32,))))
  assert mlp.plan.steps_per_dispatch == 25
  assert experiment.make_plan(tiny_config(), 10, "tpu").steps_per_dispatch == 25
  assert Experiment(tiny_config(steps_per_dispatch=3)).plan.steps_per_dispatch == 3
