"""Model registry: `config.model.name` -> a model built from `config.model`.

A model is a linen or an NNX module behind one interface (models/adapters.py): it is
called as `model.apply(variables, images, train=..., rngs=..., mutable=...)` on float
images (NHWC) and returns logits (or, for reconstruction tasks, pixel logits shaped
like the images). Non-param collections (e.g. `batch_stats`) live in
`TrainState.model_state`; values a model (linen or NNX) sows into 'losses' are added to
the training loss. `model.name` is a name below or your own class,
`path/to/my_model.py:MyNet` (models/user.py).
"""

from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from flaxtrain import registry
from flaxtrain.errors import UserError
from flaxtrain.models import adapters, autoencoder, resnet, simple, user, vit


def _cnn(cfg, num_classes, dtype, image_shape):
  conv = cfg.get("conv", "auto")
  if conv not in simple.CONV_IMPLS:
    raise UserError(f"model.conv must be one of {', '.join(simple.CONV_IMPLS)}, got {conv!r}.")
  return simple.CNN(
    num_classes,
    features=tuple(cfg.features),
    dense=tuple(cfg.dense),
    dropout=cfg.get("dropout", 0.0),
    dtype=dtype,
    conv=conv,
  )


def _mlp(cfg, num_classes, dtype, image_shape):
  return simple.MLP(num_classes, hidden=tuple(cfg.hidden), dtype=dtype)


def _remat(cfg) -> str:
  """model.remat of the ResNets: 'none' or 'block' (each residual block recomputed)."""
  remat = cfg.get("remat", "none")
  if remat not in resnet.REMAT:
    raise UserError(
      f"model.remat must be one of {', '.join(resnet.REMAT)}, got {remat!r}: 'block' "
      "recomputes each residual block's activations in the backward pass to save memory."
    )
  return remat


def _resnet(stage_sizes, block, stem):
  def make(cfg, num_classes, dtype, image_shape):
    return resnet.ResNet(
      num_classes,
      stage_sizes=stage_sizes,
      block=block,
      width=cfg.get("width", 64),
      stem=cfg.get("stem", stem),
      dropout=cfg.get("dropout", 0.0),
      dtype=dtype,
      remat=_remat(cfg),
      drop_path=cfg.get("drop_path", 0.0),
    )

  return make


def _resnet_small(cfg, num_classes, dtype, image_shape):
  """A ResNet of basic blocks with the 3x3 stem: `stage_sizes` and `width` from config."""
  strides = cfg.get("stage_strides", None)
  return resnet.ResNet(
    num_classes,
    stage_sizes=tuple(cfg.stage_sizes),
    block="basic",
    width=cfg.width,
    stem="small",
    stage_strides=tuple(strides) if strides else None,
    dropout=cfg.get("dropout", 0.0),
    dtype=dtype,
    remat=_remat(cfg),
    drop_path=cfg.get("drop_path", 0.0),
  )


def _wrn(cfg, num_classes, dtype, image_shape):
  if (cfg.depth - 4) % 6 or cfg.depth < 10:
    raise UserError(
      f"model.depth must be 6n+4 (e.g. 16, 22, 28, 40) for a WideResNet, got {cfg.depth}."
    )
  return resnet.WideResNet(
    num_classes,
    depth=cfg.depth,
    widen=cfg.widen,
    dropout=cfg.get("dropout", 0.0),
    dtype=dtype,
    remat=_remat(cfg),
    drop_path=cfg.get("drop_path", 0.0),
  )


def _autoencoder(cfg, num_classes, dtype, image_shape):
  return autoencoder.AutoEncoder(
    tuple(image_shape),
    encoder=tuple(cfg.encoder),
    latent=cfg.latent,
    decoder=tuple(cfg.decoder),
    activity_l1=cfg.get("activity_l1", 0.0),
    dtype=dtype,
  )


def _vit(cfg, num_classes, dtype, image_shape):
  kwargs = {k: v for k, v in cfg.items() if k != "name"}
  return adapters.NNXModel(
    vit.ViT, dict(num_classes=num_classes, image_shape=tuple(image_shape), dtype=dtype, **kwargs)
  )


MODELS: dict[str, Callable[..., nn.Module | adapters.NNXModel]] = {
  "cnn": _cnn,
  "mlp": _mlp,
  "resnet18": _resnet((2, 2, 2, 2), "basic", "imagenet"),
  "resnet34": _resnet((3, 4, 6, 3), "basic", "imagenet"),
  "resnet50": _resnet((3, 4, 6, 3), "bottleneck", "imagenet"),
  "resnet_small": _resnet_small,
  "wide_resnet": _wrn,
  "autoencoder": _autoencoder,
  "vit": _vit,
}


def get(
  cfg: ml_collections.ConfigDict, num_classes: int, dtype=jnp.float32, image_shape=(28, 28, 1)
) -> adapters.LinenModel | adapters.NNXModel:
  if user.is_user_model(cfg.name):
    return user.get(cfg, num_classes, dtype, image_shape)
  factory = registry.lookup(MODELS, cfg.name, "model", "model.name")
  try:
    model = factory(cfg, num_classes, dtype, image_shape)
  except (AttributeError, KeyError) as e:
    raise registry.missing_field("model", cfg.name, e) from e
  return model if isinstance(model, adapters.NNXModel) else adapters.LinenModel(model)
