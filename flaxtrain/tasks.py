"""What the model is trained to do: loss and metrics per example, chosen by `config.task`.

A task turns the model's outputs, the batch and the (preprocessed, augmented) input
images into a per-example loss and per-example metrics. The loop, the metric
collections and the best-checkpoint choice all follow from the task.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from flaxtrain import registry
from flaxtrain.errors import UserError


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  kind: str  # 'classification' | 'reconstruction'
  # (outputs, batch, inputs) -> (per-example loss [B], {metric: per-example values [B]}).
  loss: Callable
  # Model outputs -> what a user looks at: class probabilities, or images in [0, 1].
  predict: Callable
  metric_names: tuple[str, ...]
  best_metric: str  # The eval metric that picks the best checkpoint ...
  best_mode: str  # ... and whether higher ('max') or lower ('min') is better.
  num_classes: int = 0  # Classification: the width of the soft targets Mixup/CutMix build.


def classification(cfg, num_classes: int) -> Task:
  """Softmax cross-entropy (optionally label-smoothed); accuracy, and top-5 above 5 classes.

  A batch may carry soft targets, 'target' [B, classes], already label-smoothed (Mixup and
  CutMix build them, flaxtrain/data/mix.py); its 'label' is then what accuracy counts.
  """
  smoothing = cfg.label_smoothing
  if not 0.0 <= smoothing < 1.0:
    raise UserError(f"task.label_smoothing must be in [0, 1), got {smoothing}.")
  top5 = num_classes > 5

  def loss(outputs, batch, inputs):
    del inputs
    logits = outputs.astype(jnp.float32)
    if "target" in batch:
      labels = batch["target"]
    else:
      labels = jax.nn.one_hot(batch["label"], num_classes)
      if smoothing:
        labels = optax.smooth_labels(labels, smoothing)
    per_example = optax.softmax_cross_entropy(logits, labels)
    rank = label_rank(logits, batch["label"])
    metrics = {"accuracy": (rank == 0).astype(jnp.float32)}
    if top5:
      metrics["top5_accuracy"] = (rank < 5).astype(jnp.float32)
    return per_example, metrics

  names = ("accuracy", "top5_accuracy") if top5 else ("accuracy",)
  return Task(
    "classification",
    "classification",
    loss,
    lambda outputs: jax.nn.softmax(outputs.astype(jnp.float32), -1),
    names,
    best_metric="eval_accuracy",
    best_mode="max",
    num_classes=num_classes,
  )


def label_rank(logits, label):
  """The label's place in each row of logits sorted high to low, ties to the lower class:
  0 where argmax is the label, < 5 where lax.top_k(logits, 5) holds it. One comparison
  and one sum instead of an argmax and a TopK (a sort on the CPU) in every train step."""
  own = jnp.take_along_axis(logits, label[:, None], -1)
  before = jnp.arange(logits.shape[-1]) < label[:, None]
  return jnp.sum((logits > own) | ((logits == own) & before), -1)


def reconstruction(cfg, num_classes: int) -> Task:
  """The model outputs pixel logits shaped like its input; sigmoid gives the image.

  `task.loss`: 'mse' (squared error of the sigmoid image) or 'bce' (binary cross-entropy
  against the pixel intensities). The mean squared error is reported either way.
  """
  del num_classes
  if cfg.loss not in ("mse", "bce"):
    raise UserError(f"task.loss must be 'mse' or 'bce' for reconstruction, got {cfg.loss!r}.")

  def loss(outputs, batch, inputs):
    del batch
    logits = outputs.astype(jnp.float32).reshape(inputs.shape)
    target = inputs.astype(jnp.float32)
    axes = tuple(range(1, target.ndim))
    mse = jnp.mean((jax.nn.sigmoid(logits) - target) ** 2, axis=axes)
    if cfg.loss == "bce":
      per_example = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, target), axis=axes)
    else:
      per_example = mse
    return per_example, {"mse": mse}

  return Task(
    "reconstruction",
    "reconstruction",
    loss,
    lambda outputs: jax.nn.sigmoid(outputs.astype(jnp.float32)),
    ("mse",),
    best_metric="eval_loss",
    best_mode="min",
  )


TASKS = {"classification": classification, "reconstruction": reconstruction}


def get(cfg, num_classes: int) -> Task:
  return registry.lookup(TASKS, cfg.name, "task", "task.name")(cfg, num_classes)
