"""--mode=describe --topology: the train step compiled for a TPU slice that is not here.

The compiling tests need libtpu (`pip install 'jax[tpu]'`, Linux x86-64; the dev extra
installs it there) and skip without it; naming and flag checks run everywhere.
"""

import importlib.util
import os
import re
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import load_config
from test_cli import flaxtrain

from flaxtrain import models, topology, topology_report
from flaxtrain.errors import UserError

needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason="libtpu is not installed (pip install 'jax[tpu]', Linux x86-64): nothing compiles "
  "for TPUs here",
)

# fashion_resnet cut to one block of 8 channels: a TPU compile of a few seconds. An empty
# TFDS data dir: the spec comes from the builder's info alone, split sizes unknown.
SMALL = [
  "--config=fashion_resnet",
  "--mode=describe",
  "--config.model.stage_sizes=(1,)",
  "--config.model.stage_strides=(2,)",
  "--config.model.width=8",
]


@pytest.fixture(autouse=True)
def _environment_restored():
  """libtpu, loaded in this process, sets TPU_* variables (and prepare_libtpu its own); the
  CLI tests that follow would inherit them and look like TPU workers."""
  saved = dict(os.environ)
  yield
  os.environ.clear()
  os.environ.update(saved)


@pytest.mark.parametrize(
  "name, shape, libtpu_name, hosts",
  [
    ("v5e-8", (2, 4), "v5e:2x4", 1),
    ("v5litepod-16", (4, 4), "v5e:4x4", 4),
    ("v6e-16", (4, 4), "v6e:4x4", 4),
    ("v4-8", (2, 2, 1), "v4:2x2x1", 1),
    ("v4-32", (2, 2, 4), "v4:2x2x4", 4),  # The number counts TensorCores: 2 per chip.
    ("v5p-128", (4, 4, 4), "v5:4x4x4", 16),
    ("v5p-768", (4, 8, 12), "v5:4x8x12", 96),
  ],
)
def test_accelerator_types_map_to_slices(name, shape, libtpu_name, hosts):
  topo = topology.parse(name)
  assert (topo.shape, topo.libtpu_name, topo.num_hosts) == (shape, libtpu_name, hosts)


@pytest.mark.parametrize("name", ["v5e-7", "v4-12", "v9-8", "tpu", "v5p-100000"])
def test_unknown_topology_lists_the_known_ones(name):
  with pytest.raises(UserError, match="Unknown TPU topology") as e:
    topology.parse(name)
  for known in ("v5e-8", "v6e-256", "v4-32", "v5p-64", "multiples of 128", "v5litepod-N"):
    assert known in str(e.value)


@pytest.mark.parametrize("name", ["a100-8", "h100-8", "gpu-4", "v100-8"])
def test_gpus_are_one_sentence(name):
  with pytest.raises(UserError, match="needs the GPU itself") as e:
    topology.parse(name)
  assert str(e.value).count(". ") == 0


def test_topology_flag_only_for_describe_and_in_help():
  r = flaxtrain("--topology=v5e-8", "--config.num_train_steps=1")
  assert r.returncode == 1
  assert "--topology is for --mode=describe, not --mode=train" in r.stderr
  r = flaxtrain("--mode=describe", "--topology=v9-8")
  assert r.returncode == 1
  assert "Unknown TPU topology 'v9-8': known are v4-8" in r.stderr
  assert r.stderr.strip().count("\n") == 0, r.stderr  # One line, no traceback.
  r = flaxtrain("--help")
  assert "--topology=NAME" in r.stdout and "v5e-8" in r.stdout


def _params() -> int:
  """ResNet parameters counted from the model itself, not from the report."""
  cfg = ml_collections.ConfigDict(
    dict(name="resnet_small", stage_sizes=(1,), stage_strides=(2,), width=8, stem="small")
  )
  model = models.get(cfg, 10, jnp.float32, (28, 28, 1))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
  return sum(x.size for x in jax.tree.leaves(shapes["params"]))


@needs_libtpu
def test_describe_a_step_that_fits(tmp_path):
  r = flaxtrain(*SMALL, "--topology=v5e-4", f"--config.dataset.data_dir={tmp_path}")
  assert r.returncode == 0, r.stderr
  out = r.stdout
  assert "Topology v5e-4: 4 TPU v5 lite chips (2x2), 1 host" in out
  assert "Batch 128 = 32 per chip; 25 step(s) per dispatch" in out
  assert re.search(r"total +[\d.]+ \w+ +\d+% of 16 GiB HBM: fits", out), out
  assert "FLOPs per step and chip (XLA cost analysis):" in out and "MFU <=" in out
  # Parameter bytes = parameter count x 4 bytes (float32), replicated on every chip.
  count = _params()
  assert f"{topology_report._size(count * 4)}   {count:,} x float32" in out
  assert re.search(r"temporaries +[\d.]+ [KMG]iB", out)


@needs_libtpu
def test_describe_a_step_that_does_not_fit(tmp_path):
  r = flaxtrain(
    *SMALL,
    "--topology=v5e-4",
    "--config.batch_size=1048576",
    f"--config.dataset.data_dir={tmp_path}",
  )
  assert r.returncode == 1, r.stdout
  err = r.stderr.strip()
  assert err.startswith("flaxtrain: error: The train step does not fit on v5e-4: it needs")
  assert "(temporaries " in err and "of v5e's 16 GiB HBM" in err
  assert "--config.grad_accum_steps=" in err and "--config.model.remat=block" in err
  assert "\n" not in err, err


def test_fit_keeps_a_tenth_for_the_runtime():
  topo = topology.parse("v5e-8")
  memory = {"arguments": 100 << 20, "outputs": 0, "aliased": 0, "generated code": 0}
  config = ml_collections.ConfigDict(
    dict(
      batch_size=1024,
      grad_accum_steps=1,
      topology_invariant_shards=0,
      compute_dtype="float32",
      model=dict(name="resnet50", remat="none"),
    )
  )
  a = topology.Analysis(
    topology=topo,
    par=types.SimpleNamespace(num_devices=8),
    data=None,
    config=config,
    plan=types.SimpleNamespace(steps_per_dispatch=25),
    steps_per_epoch=None,
    param_count=0,
    param_dtypes="float32",
    sizes={"parameters": 100 << 20, "input batches": 1 << 20},
    memory={**memory, "temporaries": int(0.89 * 16 * topology.GiB)},
    flops=None,
    bytes_accessed=None,
  )
  assert a.fits
  a.memory["temporaries"] = int(0.95 * 16 * topology.GiB)  # Under the HBM, over 90% of it.
  assert not a.fits
  with pytest.raises(UserError) as e:
    topology_report.report(a)
  assert "needs 15.3 GiB per chip (temporaries 15.2 GiB, parameters 100 MiB, input" in str(e.value)
  assert "--config.grad_accum_steps=2, --config.compute_dtype=bfloat16" in str(e.value)


@needs_libtpu
def test_the_batch_divides_by_the_slice_as_in_a_real_run():
  topology.prepare_libtpu()
  config = load_config("fashion_resnet")
  config.batch_size = 100
  with pytest.raises(UserError, match=r"does not divide by the 8 devices \(v5e-8: 8 TPU v5"):
    topology.analyze(config, topology.parse("v5e-8"))


@pytest.mark.parametrize("on_device", ["true", "false"])
def test_train_inputs_are_laid_out_as_the_source_sends_them(on_device):
  """The lowered chunk takes what a run's in-memory source sends (so its memory figures
  count it): on the devices, the split and the ids of an epoch plus one chunk."""
  from flaxtrain import parallel
  from flaxtrain.data import memory as memory_source

  par = parallel.DataParallel(jax.devices()[:1])
  split = {"image": np.zeros((203, 2, 2, 1), np.uint8), "label": np.arange(203, dtype=np.int32)}
  src = memory_source.MemorySource(
    split, split, par=par, seed=3, batch_size=8, eval_batch_size=8, on_device=on_device
  )
  spd = 5
  sent = src.train_batches(0, spd, spd)
  data = topology.DataSpec("synthetic", (2, 2, 1), 10, 203, 203, "memory", on_device == "true")
  plan = types.SimpleNamespace(steps_per_epoch=src.plan.steps_per_epoch, steps_per_dispatch=spd)
  inputs, specs, _ = topology._train_inputs(data, par, plan, 8)
  shapes = lambda tree: jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)), tree)  # noqa: E731
  assert shapes(inputs) == shapes(sent.inputs)
  assert specs == sent.specs
