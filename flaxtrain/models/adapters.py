"""Linen and NNX models behind one functional interface.

The loop, the steps and every --mode see a model only through two calls, the ones
`flax.linen.Module` has:

  variables = model.init({"params": key}, x, train=False)
  out = model.apply(variables, x, train=..., rngs={"dropout": key})
  out, new_vars = model.apply(variables, x, train=True, rngs=..., mutable=[...])

`variables` is a dict of collections: 'params' (trained), and state such as
'batch_stats' (updated in train mode, averaged across replicas by the step). Both
adapters keep that contract, so linen and NNX models share one compiled step, one
checkpoint layout and one optimizer path:

- `LinenModel` passes the calls to the module (and `train` only where its `__call__`
  takes it).
- `NNXModel` splits an `nnx.Module` into a graph definition (static, built once) and
  its variables as plain nested dicts, and merges them back inside the traced function:
  no `nnx.jit`, whose Python graph traversal per call costs time on small models
  (Flax's performance guide). `nnx.Param` -> 'params', `nnx.BatchStat` ->
  'batch_stats', other variable types by their NNX collection name. RNG streams are
  not state: every call reseeds each stream from the call's 'dropout' key (folded with
  the stream's position), so random draws are a pure function of (seed, step, device)
  as for linen. Train/eval mode is NNX's `model.train()` / `model.eval()`. What the
  module sows for a call (`self.sow("losses", ...)`, as in linen) comes back as the
  'losses' collection, through `nnx.capture`.

Both take `frozen_norms` in training (optimizer.freeze's regex, a predicate over 'a/b/c'
parameter paths): a BatchNorm whose scale and bias both match normalises with its running
statistics and keeps them (timm's FrozenBatchNorm2d).
"""

import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx, traverse_util
from flax.nnx import variablelib

from flaxtrain.errors import UserError


def _is_frozen_norm(path, module, frozen: Callable[[str], bool]) -> bool:
  """Whether BatchNorm `module` at `path` (its keys) has every affine parameter frozen."""
  names = [n for n, on in (("scale", module.use_scale), ("bias", module.use_bias)) if on]
  prefix = "/".join(str(k) for k in path)
  return bool(names) and all(frozen(f"{prefix}/{n}") for n in names)


def _linen_frozen_norms(frozen: Callable[[str], bool]):
  """A linen method interceptor: frozen BatchNorms use their running statistics."""

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (
      context.method_name == "__call__"
      and isinstance(module, nn.BatchNorm)
      and _is_frozen_norm(module.path, module, frozen)
    ):
      if module.use_running_average is None:  # Given at call time.
        if len(args) > 1:
          args = (args[0], True, *args[2:])
        else:
          kwargs = {**kwargs, "use_running_average": True}
      else:  # A field of the (frozen) module, set for this call only.
        train = module.use_running_average
        object.__setattr__(module, "use_running_average", True)
        try:
          return next_fun(*args, **kwargs)
        finally:
          object.__setattr__(module, "use_running_average", train)
    return next_fun(*args, **kwargs)

  return interceptor


def _takes(fn, name: str) -> bool:
  params = inspect.signature(fn).parameters
  return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class LinenModel:
  """A `flax.linen.Module` as a flaxtrain model (attributes pass through to it)."""

  kind = "linen"

  def __init__(self, module: nn.Module):
    self.module = module
    self._takes_train = _takes(type(module).__call__, "train")

  def __getattr__(self, name):  # e.g. model.encode for `apply(..., method=...)`.
    return getattr(self.module, name)

  def _train(self, train):
    return {"train": train} if self._takes_train else {}

  def init(self, rngs, x, train: bool = False, **kwargs):
    return self.module.init(rngs, x, **self._train(train), **kwargs)

  def apply(self, variables, x, train: bool = False, frozen_norms=None, **kwargs):
    if "method" in kwargs:  # Another method (e.g. an autoencoder's encode): as written.
      return self.module.apply(variables, x, **kwargs)
    if frozen_norms is None or not train:
      return self.module.apply(variables, x, **self._train(train), **kwargs)
    with nn.intercept_methods(_linen_frozen_norms(frozen_norms)):
      return self.module.apply(variables, x, **self._train(train), **kwargs)


# Collections of NNX variable types that are not carried between calls.
_RNG_TYPES = (nnx.RngKey, nnx.RngCount)


def _collection(var_type) -> str:
  return variablelib.variable_name_from_type(var_type, allow_register=True)


def _key_str(path) -> tuple[str, ...]:
  """NNX paths hold ints for list items; flaxtrain's trees (and Orbax) use strings."""
  return tuple(str(k) for k in path)


class NNXModel:
  """An `nnx.Module` class and its constructor's arguments as a flaxtrain model.

  The module is built inside `init` (under jit or `jax.eval_shape`, from the init key)
  and rebuilt from `variables` inside every `apply`; the Python object never lives
  outside a traced function, so it carries no state between steps.
  """

  kind = "nnx"

  def __init__(self, cls: type, kwargs: dict[str, Any]):
    self.cls = cls
    self.kwargs = dict(kwargs)
    self._graph = None  # (graphdef, [(path, collection or None, abstract variable)]).

  def __repr__(self):
    return f"NNXModel({self.cls.__name__}, {self.kwargs})"

  def _build(self, key):
    params_key = key["params"] if isinstance(key, dict) else key
    rngs = nnx.Rngs(
      jax.random.fold_in(params_key, 1),
      params=params_key,
      dropout=jax.random.fold_in(params_key, 2),
    )
    return self.cls(**self.kwargs, rngs=rngs)

  def _structure(self):
    if self._graph is None:
      abstract = nnx.eval_shape(lambda: self._build(jax.random.key(0)))
      graphdef, state = nnx.split(abstract)
      leaves = []
      for path, var in nnx.to_flat_state(state):
        rng = isinstance(var, _RNG_TYPES)
        leaves.append((path, None if rng else _collection(type(var)), var))
      self._graph = graphdef, leaves
    return self._graph

  def _variables(self, module) -> dict:
    _, state = nnx.split(module)
    flat = {}
    for path, var in nnx.to_flat_state(state):
      if not isinstance(var, _RNG_TYPES):
        flat[(_collection(type(var)), *_key_str(path))] = var.get_value()
    return traverse_util.unflatten_dict(flat)

  def init(self, rngs, x, train: bool = False, **kwargs):
    del x, train, kwargs  # NNX modules create their variables in the constructor.
    return self._variables(self._build(rngs))

  def _merge(self, variables, dropout_key):
    graphdef, leaves = self._structure()
    given = traverse_util.flatten_dict(variables)
    flat = []
    rng_index = 0
    for path, collection, var in leaves:
      if collection is None:  # An RNG stream's key or count: fresh for this call.
        if isinstance(var, nnx.RngKey):
          key = jax.random.fold_in(dropout_key, rng_index)
          rng_index += 1
          shape = var.get_value().shape
          value = jax.random.split(key, shape) if shape else key
        else:
          value = jnp.zeros(var.get_value().shape, var.get_value().dtype)
      else:
        value = given.get((collection, *_key_str(path)))
        if value is None:
          raise UserError(
            f"{self.cls.__name__} expects variable {collection}/{'/'.join(_key_str(path))}, "
            "which the given variables lack: pass variables of this model."
          )
      flat.append((path, var.copy(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))

  def apply(
    self, variables, x, train: bool = False, rngs=None, mutable=False, frozen_norms=None, **kwargs
  ):
    if kwargs:
      raise TypeError(
        f"NNX models take no apply arguments beyond train/rngs/mutable/frozen_norms: {kwargs}"
      )
    dropout_key = (rngs or {}).get("dropout", jax.random.key(0))
    module = self._merge(variables, dropout_key)
    if train:
      module.train()
      for path, m in nnx.iter_graph(module) if frozen_norms else ():
        if isinstance(m, nnx.BatchNorm) and _is_frozen_norm(path, m, frozen_norms):
          m.use_running_average = True
    else:
      module.eval()
    out, sown = _call(module, x)
    if not mutable:
      return out
    new = {**self._variables(module), **sown}
    keep = set(new) if mutable is True else set(mutable)
    return out, {k: v for k, v in new.items() if k in keep and k != "params"}


# What a module sows for one call (`self.sow("losses", name, value)`, as a linen module
# sows): an auxiliary loss the step adds to the loss, and intermediates (dropped).
_SOWN_TYPES = (variablelib.variable_type_from_name("losses", allow_register=True), nnx.Intermediate)


def _call(module, x) -> tuple[Any, dict]:
  """module(x) and the values it sowed, {collection: nested dict}. Through `nnx.capture`
  where Flax has it (it deprecates sowing outside one); before, sown values stay on the
  module, where `_variables` finds them."""
  if not hasattr(nnx, "capture"):
    return module(x), {}
  out, *captured = nnx.capture(module, *_SOWN_TYPES)(x)
  flat = {}
  for var_type, state in zip(_SOWN_TYPES, captured, strict=True):
    for path, var in nnx.to_flat_state(state):
      flat[(_collection(var_type), *_key_str(path))] = var.get_value()
  return out, traverse_util.unflatten_dict(flat)
