"""NNX models in the loop and your own model file (`model.name=path.py:Class`)."""

import subprocess
import sys
import textwrap
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import ROOT, tiny_config

import flaxtrain
from flaxtrain import experiment, loop, models, parallel
from flaxtrain.errors import UserError
from flaxtrain.models import adapters

MODEL_FILE = textwrap.dedent(
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from flax import nnx


  class LinenMLP(nn.Module):
    num_classes: int
    hidden: tuple = (32,)
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
      x = x.reshape((x.shape[0], -1))
      for h in self.hidden:
        x = nn.relu(nn.Dense(h)(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
      return nn.Dense(self.num_classes)(x)


  class NNXMLP(nnx.Module):
    def __init__(
      self, num_classes, *, hidden=(32,), dropout=0.0, activity_l1=0.0, image_shape, rngs
    ):
      self.activity_l1 = activity_l1
      din = 1
      for d in image_shape:
        din *= d
      self.layers = nnx.List()
      for h in hidden:
        self.layers.append(nnx.Linear(din, h, rngs=rngs))
        din = h
      self.dropout = nnx.Dropout(dropout, rngs=rngs)
      self.head = nnx.Linear(din, num_classes, rngs=rngs)

    def __call__(self, x):
      x = x.reshape((x.shape[0], -1))
      for layer in self.layers:
        x = self.dropout(jax.nn.relu(layer(x)))
      if self.activity_l1:  # An auxiliary loss, sown as a linen module sows one.
        self.sow("losses", "activity", self.activity_l1 * jnp.mean(jnp.abs(x)))
      return self.head(x)


  class NNXConvBN(nnx.Module):
    def __init__(self, num_classes, *, image_shape, rngs):
      self.conv = nnx.Conv(image_shape[-1], 8, (3, 3), rngs=rngs)
      self.bn = nnx.BatchNorm(8, rngs=rngs)
      self.head = nnx.Linear(8, num_classes, rngs=rngs)

    def __call__(self, x):
      x = jax.nn.relu(self.bn(self.conv(x)))
      return self.head(jnp.mean(x, axis=(1, 2)))


  class NoRngs(nnx.Module):
    def __init__(self, num_classes):
      self.n = num_classes


  class NotAModel:
    pass
  """
)


@pytest.fixture
def model_file(tmp_path):
  path = tmp_path / "my_model.py"
  path.write_text(MODEL_FILE)
  return str(path)


def _config(name, **fields):
  c = tiny_config(num_train_steps=24)
  c.model = ml_collections.ConfigDict({"name": name, **fields})
  return c


# NNXMLP trains through the CLI below.
@pytest.mark.parametrize("cls", ["LinenMLP", "NNXConvBN"])
def test_user_models_train_checkpoint_and_resume(synthetic_data, tmp_path, model_file, cls):
  fields = {} if cls == "NNXConvBN" else {"hidden": (32,), "dropout": 0.1}
  config = _config(f"{model_file}:{cls}", **fields)
  config.ema_decay = 0.9
  summary = loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["step"] == 24
  if cls != "NNXConvBN":  # (Its running averages have not settled in 24 steps.)
    assert summary["eval_accuracy"] > 0.5  # The synthetic classes are learnable in 24 steps.
  config.num_train_steps = 32  # Resumes from the checkpoint at step 24.
  resumed = loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert resumed["step"] == 32


def test_nnx_batch_stats_are_state_and_updated(model_file):
  model = models.get(ml_collections.ConfigDict({"name": f"{model_file}:NNXConvBN"}), 10)
  assert isinstance(model, adapters.NNXModel)
  x = jax.random.uniform(jax.random.key(0), (4, 28, 28, 1))
  variables = model.init({"params": jax.random.key(0)}, x, train=False)
  assert set(variables) == {"params", "batch_stats"}
  _, new = model.apply(
    variables, x, train=True, rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"]
  )
  assert set(new) == {"batch_stats"}
  assert not np.allclose(new["batch_stats"]["bn"]["mean"], variables["batch_stats"]["bn"]["mean"])
  # Eval mode uses the running averages: the batch does not change them.
  out = model.apply(variables, x, train=False)
  assert out.shape == (4, 10)


def test_nnx_dropout_is_a_pure_function_of_the_key(model_file):
  cfg = ml_collections.ConfigDict(
    {"name": f"{model_file}:NNXMLP", "hidden": (64, 64), "dropout": 0.5}
  )
  model = models.get(cfg, 10)
  x = jnp.ones((8, 28, 28, 1))
  v = model.init({"params": jax.random.key(0)}, x)
  run = jax.jit(lambda v, k: model.apply(v, x, train=True, rngs={"dropout": k}))
  a, b, c = run(v, jax.random.key(1)), run(v, jax.random.key(1)), run(v, jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  np.testing.assert_array_equal(model.apply(v, x, train=False), model.apply(v, x, train=False))


class _LinenTwin(nn.Module):
  """The linen twin of NNXMLP: same layers, same names after the copy below."""

  num_classes: int
  activity_l1: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(32, name="layers_0")(x))
    if self.activity_l1:
      self.sow("losses", "activity", self.activity_l1 * jnp.mean(jnp.abs(x)))
    return nn.Dense(self.num_classes, name="head")(x)


@pytest.mark.parametrize("activity_l1", [0.0, 0.5])
def test_nnx_and_linen_versions_train_to_the_same_loss(
  synthetic_data, model_file, monkeypatch, activity_l1
):
  """The same MLP in NNX and in linen, the NNX init copied into linen: the same steps. With
  an auxiliary loss each sows into 'losses' (NNX through nnx.capture, without Flax's
  deprecation warning): the same loss, gradient and logged aux_loss."""
  par = parallel.DataParallel()
  cfg = tiny_config(num_train_steps=8)
  cfg.model = ml_collections.ConfigDict(
    {"name": f"{model_file}:NNXMLP", "hidden": (32,), "activity_l1": activity_l1}
  )
  nnx_exp = experiment.Experiment(cfg, par)
  twin = _LinenTwin(10, activity_l1=activity_l1)
  monkeypatch.setattr(models, "get", lambda *a, **k: adapters.LinenModel(twin))
  linen_exp = experiment.Experiment(cfg, par)
  assert nnx_exp.model.kind == "nnx" and linen_exp.model.kind == "linen"
  state = nnx_exp.init_state()
  nnx_params = jax.device_get(state.params)
  linen_params = {"layers_0": nnx_params["layers"]["0"], "head": nnx_params["head"]}
  linen_state = linen_exp.init_state()
  linen_state = jax.device_put(
    linen_state.replace(params=linen_params, opt_state=linen_exp.tx.init(linen_params)),
    par.sharding(parallel.REPLICATED),
  )
  results, aux = {}, {}
  for name, exp, st in (("nnx", nnx_exp, state), ("linen", linen_exp, linen_state)):
    losses, aux[name] = [], []
    for step in range(8):  # One step per chunk: CPU's steps_per_dispatch.
      with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # Compiles at the first chunk.
        st, metrics, _ = exp.train_chunk(st, step, 1)
      values = jax.device_get(metrics).compute()
      losses.append(float(values["loss"]))
      aux[name].append(float(values["aux_loss"]))
    results[name] = (losses, jax.device_get(st.params))
  np.testing.assert_allclose(results["nnx"][0], results["linen"][0], rtol=1e-5)
  np.testing.assert_allclose(aux["nnx"], aux["linen"], rtol=1e-5)
  assert (min(aux["nnx"]) > 0) == bool(activity_l1)
  assert results["nnx"][0][-1] < results["nnx"][0][0]  # It trains.
  np.testing.assert_allclose(
    results["nnx"][1]["head"]["kernel"], results["linen"][1]["head"]["kernel"], rtol=1e-4, atol=1e-6
  )


BAD_MODELS = [
  ("missing.py:Net", "does not exist"),
  ("{file}:Nope", "has no class 'Nope'"),
  ("{file}:NotAModel", "is not a flax.linen.Module or flax.nnx.Module"),
  ("{file}:NoRngs", "must take rngs"),
  ("no_such_module_xyz:Net", "cannot be imported"),
]


@pytest.mark.parametrize("name,message", BAD_MODELS)
def test_bad_user_models_fail_in_one_sentence(model_file, name, message):
  with pytest.raises(UserError, match=message):
    models.get(ml_collections.ConfigDict({"name": name.format(file=model_file)}), 10)


def test_a_field_the_constructor_rejects_is_named(model_file):
  cfg = ml_collections.ConfigDict({"name": f"{model_file}:NNXMLP", "widht": 3})
  with pytest.raises(UserError, match="does not take model.widht"):
    models.get(cfg, 10)


def test_a_broken_model_file_fails_in_one_sentence(tmp_path):
  path = tmp_path / "broken.py"
  path.write_text("import flax\nraise RuntimeError('boom')\n")
  with pytest.raises(UserError, match="Importing your model file .*RuntimeError: boom"):
    models.get(ml_collections.ConfigDict({"name": f"{path}:Net"}), 10)


# Only in make test; on the newest stack the NNXConvBN case of
# test_user_models_train_checkpoint_and_resume covers it.
@pytest.mark.slow
def test_cli_trains_an_nnx_model_from_a_file_and_evaluates_it(tmp_path, model_file):
  """The README's example: --config.model.name=my_model.py:NNXMLP on the MLP config."""
  workdir = tmp_path / "run"
  args = [
    sys.executable,
    str(ROOT / "tests" / "mock_cli.py"),
    "256",
    "--config=configs/fashion_mlp.py",
    f"--config.model.name={model_file}:NNXMLP",
    "--config.num_train_steps=4",
    "--config.batch_size=32",
    "--config.eval_batch_size=64",
    f"--workdir={workdir}",
  ]
  run = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert (workdir / "summary.json").exists()
  run_ = flaxtrain.load(str(workdir))  # Rebuilds the model from the file in the config.
  assert set(run_.variables["params"]) == {"layers", "head"}
  assert run_.predict(np.zeros((2, 28, 28, 1), np.uint8)).shape[0] == 2
  bad = subprocess.run(
    [*args[:4], f"--config.model.name={model_file}:Nope", f"--workdir={tmp_path / 'bad'}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert bad.returncode != 0
  assert "has no class 'Nope'" in bad.stderr
  assert not (tmp_path / "bad").exists()


def test_nnx_vit_with_bf16_accumulation_describe_and_eval(synthetic_data, tmp_path):
  """The NNX ViT through the options that touch the model: bf16, accumulation, EMA,
  stochastic depth, describe and eval (export goes through the same apply)."""
  from conftest import load_config

  from flaxtrain import config_lib, describe, evaluate

  config = tiny_config(num_train_steps=8, compute_dtype="bfloat16", grad_accum_steps=2)
  config.model = config_lib.vit_model(
    width=32, depth=2, heads=2, mlp_dim=32, patch_size=14, drop_path=0.1, dropout=0.1
  )
  config.ema_decay = 0.9
  summary = loop.train_and_evaluate(config, str(tmp_path / "vit"))
  assert summary["step"] == 8 and np.isfinite(summary["eval_loss"])
  exp = experiment.Experiment(config)
  assert exp.model.kind == "nnx"
  text = describe.describe(exp, load_config("fashion_cnn"), "configs/fashion_vit.py", timed_steps=1)
  assert "blocks/0/attn/qkv/kernel" in text and "ms per train step" in text
  step, metrics = evaluate.run(exp, str(tmp_path / "vit"))
  assert step == 8 and metrics["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)
