"""--config.profile_steps: a TensorBoard profile of exactly those steps, same results."""

import dataclasses
import warnings

import jax
import numpy as np
import pytest
from conftest import tiny_config

from flaxtrain import experiment, loop, parallel, profiling
from flaxtrain.errors import UserError


def _profiles(logdir):
  return sorted(logdir.glob("plugins/profile/*/*.xplane.pb"))


def _traced_steps(path) -> list[int]:
  """The step numbers of the trace's 'train' step annotations."""
  data = jax.profiler.ProfileData.from_file(str(path))
  # jaxlib's stats type warns when first built on Python 3.12 (nanobind); under -W error
  # that warning would abort the process.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    return sorted(
      dict(event.stats)["step_num"]
      for plane in data.planes
      for line in plane.lines
      for event in line.events
      if event.name == "train"
    )


def test_profile_of_the_window_leaves_the_results_bitwise_unchanged(
  synthetic_data, tmp_path, monkeypatch
):
  final = {}  # Each run's state as last evaluated (the final one), on the host.
  evaluate = experiment.Experiment.evaluate

  def keep_and_evaluate(self, state):
    final[self.config.profile_steps] = jax.tree.map(np.asarray, state)
    return evaluate(self, state)

  monkeypatch.setattr(experiment.Experiment, "evaluate", keep_and_evaluate)
  # Chunks of 2 steps; the window (3, 4) starts and ends inside them: 0-2-3-5-7-8.
  plain = tiny_config(num_train_steps=8, steps_per_dispatch=2)
  traced = tiny_config(num_train_steps=8, steps_per_dispatch=2, profile_steps=(3, 4))
  a = loop.train_and_evaluate(plain, str(tmp_path / "plain"))
  b = loop.train_and_evaluate(traced, str(tmp_path / "traced"))
  assert not (tmp_path / "plain" / "plugins").exists()
  [profile] = _profiles(tmp_path / "traced")
  assert _traced_steps(profile) == [3, 5]  # Chunks 4-5 and 6-7, named by their start.
  assert a["step"] == b["step"] == 8 and a["eval_loss"] == b["eval_loss"]
  leaves = zip(jax.tree.leaves(final[None]), jax.tree.leaves(final[(3, 4)]), strict=True)
  for x, y in leaves:  # Params, optimizer state, step: bit for bit.
    np.testing.assert_array_equal(x, y)


def test_the_plan_stops_at_the_window_edges_and_nowhere_else():
  plan = experiment.Plan(
    steps_per_epoch=32,
    total_steps=40,
    log_every=8,
    eval_every=32,
    checkpoint_every=32,
    steps_per_dispatch=5,
  )

  def stops(plan):
    out, step = [], 0
    while step < plan.total_steps:
      step = plan.next_stop(step)
      out.append(step)
    return out

  assert stops(plan) == [5, 8, 13, 16, 21, 24, 29, 32, 37, 40]
  windowed = dataclasses.replace(plan, profile=(3, 10))
  assert stops(windowed) == [3, 8, 10, 15, 16, 21, 24, 29, 32, 37, 40]


def test_window_is_clipped_to_the_run_and_must_start_inside_it():
  assert experiment.make_plan(tiny_config(profile_steps=(60, 10)), 32).profile == (60, 64)
  assert experiment.make_plan(tiny_config(), 32).profile is None
  with pytest.raises(UserError, match="profile_steps starts after step 64.*64 steps"):
    experiment.make_plan(tiny_config(profile_steps=(64, 1)), 32)


@pytest.mark.parametrize(
  "key, value, match",
  [
    ("profile_steps", (5,), "profile_steps must be"),
    ("profile_steps", (-1, 5), "profile_steps must be"),
    ("profile_steps", (5, 0), "count >= 1"),
    ("profile_steps", (1.5, 2), "profile_steps must be"),
    ("profile_process", 1, "process index below 1"),
    ("profile_process", -2, "profile_process must be -1"),
  ],
)
def test_bad_profile_settings_fail_in_one_sentence(key, value, match):
  config = tiny_config(**{key: value})
  with pytest.raises(UserError, match=match):
    experiment.validate(config, parallel.DataParallel())


def _profile(tmp_path, **overrides):
  """The loop's profiler for the window (2, 6), i.e. profile_steps=(2, 4)."""
  config = tiny_config(profile_steps=(2, 4), **overrides)
  return profiling.Profile((2, 6), config, parallel.DataParallel(), str(tmp_path))


def test_an_early_stop_or_error_still_writes_a_complete_trace(tmp_path):
  step_fn = jax.jit(lambda x: x * 2)
  # A stop signal inside the window: the trace ends after that chunk.
  profile = _profile(tmp_path / "signal")
  assert profile.start_if_due(0) == 0.0 and profile.start_if_due(2) > 0
  with profile.annotate(2):
    x = step_fn(np.ones(3))
  assert profile.stop_if_due(3, x, stop_signal=False) == 0.0
  assert profile.stop_if_due(3, x, stop_signal=True) > 0
  assert _traced_steps(_profiles(tmp_path / "signal")[0]) == [2]
  assert profile.start_if_due(4) == 0.0  # One trace per run.
  # An error inside the window: the trace ends with the loop.
  with pytest.raises(RuntimeError), _profile(tmp_path / "error") as profile:
    profile.start_if_due(3)  # A resume inside the window traces the rest.
    with profile.annotate(3):
      step_fn(np.ones(3))
    raise RuntimeError("a failing step")
  assert _traced_steps(_profiles(tmp_path / "error")[0]) == [3]


def test_only_the_chosen_process_traces_and_every_process_in_its_own_folder(tmp_path):
  assert _profile(tmp_path, profile_process=0).window == (2, 6)
  par = parallel.DataParallel()
  par.process_index, par.num_processes = 1, 2  # As process 1 of 2 would see it.
  config = tiny_config(profile_steps=(2, 4))
  assert profiling.Profile((2, 6), config, par, str(tmp_path)).window is None
  config.profile_process = -1
  every = profiling.Profile((2, 6), config, par, str(tmp_path))
  assert every.window == (2, 6) and every.logdir == str(tmp_path / "process1")
