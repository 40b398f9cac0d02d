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


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output("loss")
  accuracy: metrics.Average.from_output("accuracy")
  learning_rate: metrics.LastValue.from_output("learning_rate")
  nonfinite_steps: Sum.from_output("nonfinite")


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
  loss: metrics.Average.from_output("loss")
  accuracy: metrics.Average.from_output("accuracy")
  examples: Sum.from_output("mask")
