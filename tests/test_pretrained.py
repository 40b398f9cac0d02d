"""Fine-tuning from torchvision/timm weights (flaxtrain/pretrained.py) and ResNet
stochastic depth."""

import argparse
import logging
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from flaxtrain import checkpointing, loop, parallel
from flaxtrain.errors import UserError
from flaxtrain.models import resnet

# ------------------------------------------------------------ weight import

# Importing triton (which torch's CUDA wheels install, and torchvision imports through
# torch._dynamo) once TensorFlow is loaded segfaults (their LLVM copies clash); torch on
# the CPU needs no triton, and torch treats a failing import as "not installed".
sys.modules.setdefault("triton", None)

STAGES = {"resnet18": ((2, 2, 2, 2), "basic"), "resnet50": ((3, 4, 6, 3), "bottleneck")}


@pytest.fixture(scope="module")
def torch():
  """torch with torchvision (test-only: the dev extra on Python 3.11; skipped elsewhere)."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("torchvision")
  pytest.importorskip("safetensors")
  torch.manual_seed(0)
  return torch


def _torchvision_resnet(torch, name: str, num_classes: int, in_channels: int = 3):
  """A torchvision ResNet in eval mode with random weights and BatchNorm statistics."""
  import torchvision

  model = getattr(torchvision.models, name)(num_classes=num_classes)
  if in_channels != 3:
    model.conv1 = torch.nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):  # torchvision zero-inits nothing by default.
        m.weight.normal_(1.0, 0.2)
        m.bias.normal_(0.0, 0.1)
        m.running_mean.normal_(0.0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
  return model.eval()


def _save(torch, model, path: str) -> str:
  from safetensors.torch import save_file

  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  if path.endswith(".safetensors"):
    save_file(state, path)
  else:
    torch.save(state, path)
  return path


def _flax_resnet(name: str, num_classes: int, image_shape=(32, 32, 3)):
  """flaxtrain's ResNet and zero variables (shapes only: no initializer compiled)."""
  stages, block = STAGES[name]
  model = resnet.ResNet(num_classes, stage_sizes=stages, block=block)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_shape)))
  return model, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _import(path: str, model_name: str, variables):
  """The loop's init_from call."""
  params, model_state = checkpointing.load_init(
    path, variables["params"], {"batch_stats": variables["batch_stats"]}, model_name
  )
  return {"params": params, **model_state}


@pytest.mark.parametrize(
  "name,suffix", [("resnet18", "safetensors"), ("resnet18", "pth"), ("resnet50", "safetensors")]
)
def test_resnet_import_gives_torchvision_logits(torch, tmp_path, name, suffix):
  tm = _torchvision_resnet(torch, name, num_classes=7)
  path = _save(torch, tm, str(tmp_path / f"{name}.{suffix}"))
  x = torch.rand(4, 3, 32, 32)
  with torch.no_grad():
    expected = tm(x).numpy()
  model, variables = _flax_resnet(name, 7)
  variables = _import(path, name, variables)
  logits = model.apply(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))  # NCHW->NHWC
  np.testing.assert_allclose(logits, expected, atol=1e-4 * max(1.0, np.abs(expected).max()))
  np.testing.assert_array_equal(
    variables["batch_stats"]["BasicBlock_0" if name == "resnet18" else "Bottleneck_0"][
      "BatchNorm_1"
    ]["var"],
    tm.state_dict()["layer1.0.bn2.running_var"].numpy(),
  )


# timm's layouts of the two poolings flaxtrain's ViT builds: a class token, or global
# average pooling after the final norm (fc_norm=False; timm's default for 'avg' would
# normalise after pooling instead).
TIMM_POOLS = {
  "token": {},
  "gap": {"class_token": False, "global_pool": "avg", "fc_norm": False},
}


def _timm_vit(torch, **kwargs):
  timm = pytest.importorskip("timm")
  tm = timm.models.vision_transformer.VisionTransformer(
    img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=7, **kwargs
  )
  with torch.no_grad():
    for p in tm.parameters():  # timm zero-inits the head and biases: randomise all.
      p.normal_(0.0, 0.2)
  return tm.eval()


def _flaxtrain_vit(pool):
  vit = pytest.importorskip("flaxtrain.models.vit")
  from flax import nnx

  model = vit.ViT(
    7,
    image_shape=(32, 32, 3),
    pool=pool,
    posemb="learn",
    width=64,
    depth=2,
    heads=2,
    mlp_dim=256,
    patch_size=8,
    rngs=nnx.Rngs(params=0, dropout=1),
  )
  model.eval()
  return model, jax.tree.map(jnp.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("pool", sorted(TIMM_POOLS))
def test_vit_import_gives_timm_logits(torch, tmp_path, pool):
  from flax import nnx

  tm = _timm_vit(torch, **TIMM_POOLS[pool])
  path = _save(torch, tm, str(tmp_path / "vit.safetensors"))
  x = torch.rand(4, 3, 32, 32)
  with torch.no_grad():
    expected = tm(x).numpy()
  model, params = _flaxtrain_vit(pool)
  params, state = checkpointing.load_init(path, params, {}, "vit")
  assert state == {}
  nnx.update(model, params)
  logits = model(jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_a_timm_vit_of_another_pooling_fails_in_one_sentence(torch, tmp_path):
  """The file's pooling decides the model's: each mismatch says which settings to use; a
  ViT that normalises after pooling (timm's fc_norm) is refused by name."""
  files = {
    name: _save(torch, _timm_vit(torch, **kwargs), str(tmp_path / f"{name}.safetensors"))
    for name, kwargs in [
      *TIMM_POOLS.items(),
      ("fc_norm", {"class_token": False, "global_pool": "avg"}),
    ]
  }
  for file, model_pool, want in [
    (
      "token",
      "gap",
      "with a class token and a learned position embedding: set "
      "--config.model.pool=token --config.model.posemb=learn.",
    ),
    (
      "gap",
      "token",
      "with global average pooling and a learned position embedding: set "
      "--config.model.pool=gap --config.model.posemb=learn.",
    ),
    ("fc_norm", "gap", "normalises after pooling (fc_norm)"),
  ]:
    _, params = _flaxtrain_vit(model_pool)
    with pytest.raises(UserError) as e:
      checkpointing.load_init(files[file], params, {}, "vit")
    assert want in _one_sentence(e), (file, model_pool)


def test_head_of_another_class_count_is_reinitialised_and_logged(torch, tmp_path, caplog):
  path = _save(torch, _torchvision_resnet(torch, "resnet18", 1000), str(tmp_path / "r.pth"))
  _, variables = _flax_resnet("resnet18", 10)
  fresh = jax.tree.map(lambda x: x + 1.0, variables)  # Stands for the fresh init.
  with caplog.at_level(logging.WARNING):
    loaded = _import(path, "resnet18", fresh)
  assert jax.tree.all(
    jax.tree.map(jnp.array_equal, loaded["params"]["Dense_0"], fresh["params"]["Dense_0"])
  )
  assert not np.array_equal(
    loaded["params"]["conv_init"]["kernel"], fresh["params"]["conv_init"]["kernel"]
  )
  lines = [r.getMessage() for r in caplog.records if "head" in r.getMessage()]
  assert len(lines) == 1 and "1000 classes in the file and 10 in the model" in lines[0]


def _one_sentence(e) -> str:
  msg = str(e.value)
  assert msg.endswith(".") and "\n" not in msg, msg
  return msg


def test_mismatches_fail_in_one_sentence_naming_them(torch, tmp_path):
  r18 = _save(torch, _torchvision_resnet(torch, "resnet18", 10), str(tmp_path / "r18.safetensors"))
  # Gray images: the stem's kernel differs.
  _, variables = _flax_resnet("resnet18", 10, image_shape=(32, 32, 1))
  with pytest.raises(UserError) as e:
    _import(r18, "resnet18", variables)
  msg = _one_sentence(e)
  assert "conv1.weight has shape (64, 3, 7, 7) in the file but (64, 1, 7, 7)" in msg
  # Another architecture: named before any key.
  _, variables = _flax_resnet("resnet50", 10)
  with pytest.raises(UserError) as e:
    _import(r18, "resnet50", variables)
  assert "holds a resnet18 (basic blocks, stages 2-2-2-2) but model.name=resnet50" in (
    _one_sentence(e)
  )
  # A ResNet file for a model of another family.
  with pytest.raises(UserError, match="holds a torchvision/timm ResNet but model.name is 'cnn'"):
    checkpointing.load_init(r18, {"Dense_0": {"kernel": jnp.zeros((2, 2))}}, {}, "cnn")


def test_a_pth_that_needs_pickled_code_is_refused(torch, tmp_path):
  path = str(tmp_path / "train_state.pth")
  torch.save({"state_dict": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1)}, path)
  _, variables = _flax_resnet("resnet18", 10)
  with pytest.raises(UserError, match="holds pickled code, which flaxtrain never runs") as e:
    _import(path, "resnet18", variables)
  assert "convert it to .safetensors" in _one_sentence(e)


def test_fine_tune_from_a_torchvision_file_through_the_loop(
  torch, tmp_path, synthetic_data, caplog
):
  """init_from=<file> in a real run, with a linear probe and layer decay; gray images."""
  tm = _torchvision_resnet(torch, "resnet18", 1000, in_channels=1)
  path = _save(torch, tm, str(tmp_path / "resnet18.safetensors"))
  config = tiny_config(
    num_train_steps=1,
    batch_size=16,
    init_from=path,
    **{
      "model.name": "resnet18",
      "optimizer.freeze": "backbone",
      "optimizer.layer_decay": 0.7,
    },
  )
  with caplog.at_level(logging.WARNING):
    summary = loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["step"] == 1 and np.isfinite(summary["eval_loss"])
  assert any("keeps its fresh initialization" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------ stochastic depth


def _train_apply(model, variables, x, key=3):
  """Train mode on one device, as the train step runs it (BatchNorm over the mesh axis)."""

  def apply(x):
    rngs = {"dropout": jax.random.key(key)}
    return model.apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])[0]

  return jax.vmap(apply, axis_name=parallel.AXIS)(x[None])[0]


@pytest.mark.parametrize(
  "make",
  [
    pytest.param(
      lambda **kw: resnet.ResNet(5, stage_sizes=(1, 1), width=8, stem="small", **kw), id="resnet"
    ),
    # Only in make test; on the newest stack the ResNet case covers the same code.
    pytest.param(
      lambda **kw: resnet.WideResNet(5, depth=10, widen=1, **kw),
      id="wide_resnet",
      marks=pytest.mark.slow,
    ),
  ],
)
def test_drop_path_changes_training_only(make):
  x = jax.random.normal(jax.random.key(0), (16, 8, 8, 3))
  plain, dropped = make(), make(drop_path=0.5, remat="block")
  shapes = jax.eval_shape(plain.init, jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(
    jnp.shape, jax.eval_shape(dropped.init, jax.random.key(1), x)
  )
  # Random values: at init the last BatchNorm of each branch zeroes it.
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32) ** 2, shapes)
  np.testing.assert_array_equal(plain.apply(variables, x), dropped.apply(variables, x))
  train_plain = _train_apply(plain, variables, x)
  assert np.abs(_train_apply(dropped, variables, x) - train_plain).max() > 1e-2
  assert np.array_equal(_train_apply(make(drop_path=0.0), variables, x), train_plain)


class _Branch(nn.Module):
  rate: float

  @nn.compact
  def __call__(self, x):
    return resnet._drop_path(self, x, self.rate, train=True)


def test_drop_path_drops_whole_examples_at_the_rate_and_keeps_the_mean():
  x = jnp.ones((20_000, 2, 2, 3))
  y = np.asarray(_Branch(0.3).apply({}, x, rngs={"dropout": jax.random.key(0)}))
  per_example = y.reshape(len(y), -1)
  dropped = (per_example == 0).all(axis=1)
  assert ((per_example == 0).any(axis=1) == dropped).all()  # All or nothing per example.
  assert dropped.mean() == pytest.approx(0.3, abs=0.01)  # ~3 standard deviations.
  np.testing.assert_allclose(per_example[~dropped], 1 / 0.7, rtol=1e-6)
  assert y.mean() == pytest.approx(1.0, abs=0.02)
  assert resnet._rates(0.2, 5) == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


def test_fine_tune_an_nnx_vit_from_a_timm_file_through_the_loop(
  torch, tmp_path, synthetic_data, caplog
):
  """init_from=<timm ViT file> into the NNX ViT in a real run: the body is the file's, the
  head (7 classes in the file, 10 here) is fresh, and layer decay applies."""
  timm = pytest.importorskip("timm")
  from flaxtrain import api, config_lib

  tm = timm.models.vision_transformer.VisionTransformer(
    img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=7
  )
  path = _save(torch, tm, str(tmp_path / "vit.safetensors"))
  config = tiny_config(
    num_train_steps=1,
    init_from=path,
    **{"optimizer.layer_decay": 0.7, "optimizer.learning_rate": 1e-12},
  )
  config.model = config_lib.vit_model(
    pool="token", posemb="learn", width=32, depth=2, heads=2, mlp_dim=128, patch_size=7
  )
  with caplog.at_level(logging.WARNING):
    summary = loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["step"] == 1 and np.isfinite(summary["eval_loss"])
  assert any("keeps its fresh initialization" in r.getMessage() for r in caplog.records)
  params = api.load(str(tmp_path / "run")).variables["params"]
  file_qkv = tm.state_dict()["blocks.1.attn.qkv.weight"].numpy().T
  np.testing.assert_allclose(params["blocks"]["1"]["attn"]["qkv"]["kernel"], file_qkv, atol=1e-6)
