"""CLU metric collections for the train loop and for evaluation."""

import flax
import jax.numpy as jnp
from clu import metrics


@flax.struct.dataclass
class Sum(metrics.Metric):
  """A count summed over steps and devices (e.g. skipped non-finite steps)."""

  total: jnp.ndarray

  @classmethod
  def from_model_output(cls, values, **_):
    return cls(total=jnp.sum(values))

  @classmethod
  def empty(cls):
    return cls(total=jnp.array(0, jnp.float32))

  def merge(self, other):
    return type(self)(total=self.total + other.total)

  def reduce(self):
    return type(self)(total=jnp.sum(self.total))

  def compute(self):
    return self.total


def train_metrics(task_metrics) -> type[metrics.Collection]:
  """Train collection: loss, auxiliary loss, learning rate, skipped steps, task metrics."""
  return metrics.Collection.create(
    loss=metrics.Average.from_output("loss"),
    aux_loss=metrics.Average.from_output("aux_loss"),
    learning_rate=metrics.LastValue.from_output("learning_rate"),
    nonfinite_steps=Sum.from_output("nonfinite"),
    **{name: metrics.Average.from_output(name) for name in task_metrics},
  )


def eval_metrics(task_metrics) -> type[metrics.Collection]:
  """Eval collection: loss and task metrics over the unmasked rows, and their count."""
  return metrics.Collection.create(
    loss=metrics.Average.from_output("loss"),
    examples=Sum.from_output("mask"),
    **{name: metrics.Average.from_output(name) for name in task_metrics},
  )
