"""Model registry: `config.model.name` -> a linen Module built from `config.model`.

Every model is called as `model.apply(variables, images, train=..., rngs=...,
mutable=...)` on float images in [0, 1] (NHWC) and returns logits (or, for
reconstruction tasks, images). Non-param collections (e.g. `batch_stats`) live in
`TrainState.model_state`, so models with mutable state need no loop changes.
"""

from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from flaxtrain import registry
from flaxtrain.models import simple


def _cnn(cfg, num_classes, dtype):
  return simple.CNN(num_classes, features=tuple(cfg.features), dense=tuple(cfg.dense),
                    dtype=dtype)


def _mlp(cfg, num_classes, dtype):
  return simple.MLP(num_classes, hidden=tuple(cfg.hidden), dtype=dtype)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn": _cnn,
    "mlp": _mlp,
}


def get(cfg: ml_collections.ConfigDict, num_classes: int, dtype=jnp.float32) -> nn.Module:
  factory = registry.lookup(MODELS, cfg.name, "model", "model.name")
  try:
    return factory(cfg, num_classes, dtype)
  except (AttributeError, KeyError) as e:
    raise registry.missing_field("model", cfg.name, e) from e
