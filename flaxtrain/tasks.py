"""What the model is trained to do: the loss and metrics per example."""

import jax.numpy as jnp
import optax

from flaxtrain import registry


def classification(outputs, batch, *, num_classes: int, label_smoothing: float = 0.0):
  """Softmax cross-entropy (optionally label-smoothed) and accuracy, per example."""
  logits = outputs.astype(jnp.float32)
  labels = optax.smooth_labels(jnp.eye(num_classes)[batch["label"]], label_smoothing) \
      if label_smoothing else jnp.eye(num_classes)[batch["label"]]
  loss = optax.softmax_cross_entropy(logits, labels)
  accuracy = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  return loss, {"accuracy": accuracy}


TASKS = {"classification": classification}


def get(cfg, num_classes: int):
  fn = registry.lookup(TASKS, cfg.name, "task", "task.name")
  return lambda outputs, batch: fn(outputs, batch, num_classes=num_classes,
                                   label_smoothing=cfg.label_smoothing)
