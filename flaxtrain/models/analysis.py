"""Questions about a model answered by tracing it on shapes, nothing initialised or run:
its params' shapes, whether its forward pass has a convolution, its step's FLOPs."""

import jax
import jax.numpy as jnp


def has_convolutions(model, image_shape) -> bool:
  """Whether the model's forward pass has a convolution: traced on shapes, nothing run."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  init, variables = jax.make_jaxpr(
    lambda x: model.init({"params": jax.random.key(0)}, x, train=False), return_shape=True
  )(x)
  if _uses(init.jaxpr, "conv_general_dilated"):  # A linen init runs the forward pass.
    return True
  forward = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
  return _uses(forward.jaxpr, "conv_general_dilated")


def _uses(jaxpr, primitive: str) -> bool:
  """Whether `jaxpr` or any jaxpr inside it (loops, conditionals, custom rules) has it."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == primitive:
      return True
    for param in eqn.params.values():
      for sub in param if isinstance(param, tuple | list) else (param,):
        sub = getattr(sub, "jaxpr", sub)  # A ClosedJaxpr holds a Jaxpr.
        if hasattr(sub, "eqns") and _uses(sub, primitive):
          return True
  return False


def param_shapes(model, image_shape):
  """The params tree as shapes (nothing initialised), e.g. for optimizers.make."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  return jax.eval_shape(model.init, {"params": jax.random.key(0)}, x)["params"]


def step_flops(model, task, image_shape, per_device_batch: int, dtype) -> float | None:
  """XLA's cost-analysis FLOPs of the loss's forward and backward on one device's batch."""
  variables = jax.eval_shape(
    lambda: model.init(  # Shapes only: no initializer compiled.
      jax.random.key(0), jnp.zeros((1, *image_shape)), train=False
    )
  )
  x = jax.ShapeDtypeStruct((per_device_batch, *image_shape), dtype)
  y = jax.ShapeDtypeStruct((per_device_batch,), jnp.int32)

  def loss(variables, x, label):
    out = model.apply(variables, x, train=False)
    return jnp.mean(task.loss(out, {"label": label}, x)[0])

  compiled = jax.jit(jax.value_and_grad(loss)).lower(variables, x, y).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, list):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None
