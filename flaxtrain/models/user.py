"""Your own model: `--config.model.name=path/to/my_model.py:MyNet` (or `my.module:MyNet`).

The class is a `flax.linen.Module` or a `flax.nnx.Module`. It is built with
`num_classes` and every other `model.*` field as keyword arguments, plus, where its
constructor takes them, `dtype` (the compute dtype), `image_shape` ((H, W, C) of the
model's input) and, for NNX, `rngs`. A linen model is called as `model(x, train=...)`
(`train` only where its `__call__` takes it); an NNX model as `model(x)`, in train or
eval mode through `model.train()` / `model.eval()`. Inputs are float NHWC images,
normalised as the dataset config says; outputs are logits.
"""

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import pathlib
import sys

import flax.linen as nn
from flax import nnx

from flaxtrain.errors import UserError
from flaxtrain.models import adapters

EXAMPLE = "e.g. --config.model.name=path/to/my_model.py:MyNet"


def is_user_model(name: str) -> bool:
  return ":" in name


def _import(source: str):
  if source.endswith(".py"):
    path = pathlib.Path(source).expanduser()
    if not path.is_file():
      raise UserError(
        f"model.name names the file {source}, which does not exist (relative to "
        f"{pathlib.Path.cwd()}): pass the path of your model's Python file, {EXAMPLE}."
      )
    path = path.resolve()
    # One module per file, kept: the same file gives the same classes on every call.
    name = f"flaxtrain_user_model_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    if name in sys.modules:
      return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
      spec.loader.exec_module(module)
    except Exception as e:
      del sys.modules[name]
      raise UserError(
        f"Importing your model file {source} failed with {type(e).__name__}: {e}; fix the file."
      ) from e
    return module
  try:
    return importlib.import_module(source)
  except ImportError as e:
    raise UserError(
      f"model.name names the module {source}, which cannot be imported ({e}): pass a "
      f"module on the Python path or a .py file, {EXAMPLE}."
    ) from e


def _constructor_args(cls) -> tuple[set[str], bool]:
  """(keyword arguments the class takes, whether it takes **kwargs)."""
  if dataclasses.is_dataclass(cls):  # linen Modules: their fields.
    names = {f.name for f in dataclasses.fields(cls) if f.init} - {"parent", "name"}
    return names, False
  params = inspect.signature(cls.__init__).parameters
  names = {n for n, p in params.items() if n != "self" and p.kind is not p.VAR_POSITIONAL}
  return names, any(p.kind is p.VAR_KEYWORD for p in params.values())


def get(cfg, num_classes: int, dtype, image_shape):
  """The user's model class named by cfg.name, built from cfg's other fields."""
  source, _, class_name = cfg.name.rpartition(":")
  module = _import(source)
  cls = getattr(module, class_name, None)
  if cls is None:
    defined = sorted(
      n
      for n, v in vars(module).items()
      if inspect.isclass(v)
      and issubclass(v, (nn.Module, nnx.Module))
      and v.__module__ == module.__name__
    )
    raise UserError(
      f"{source} has no class {class_name!r} (its model classes: "
      f"{', '.join(defined) or 'none'}): name one of them after the colon, {EXAMPLE}."
    )
  if not (inspect.isclass(cls) and issubclass(cls, (nn.Module, nnx.Module))):
    raise UserError(
      f"{class_name} in {source} is not a flax.linen.Module or flax.nnx.Module subclass: "
      "derive your model from one of them."
    )
  is_nnx = issubclass(cls, nnx.Module)
  takes, any_kwargs = _constructor_args(cls)
  fields = {k: v for k, v in cfg.items() if k != "name"}
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
  for key in sorted(fields):
    if key not in takes and not any_kwargs:
      raise UserError(
        f"{class_name} does not take model.{key} (its constructor takes "
        f"{', '.join(sorted(takes - {'rngs'})) or 'nothing'}): remove model.{key} from "
        f"the config or add it to {class_name}'s constructor."
      )
  if "num_classes" not in takes and not any_kwargs:
    raise UserError(
      f"{class_name}'s constructor must take num_classes (the dataset's class count)."
    )
  if is_nnx and "rngs" not in takes and not any_kwargs:
    raise UserError(
      f"{class_name}'s constructor must take rngs (an nnx.Rngs) to create its parameters."
    )
  kwargs = {"num_classes": num_classes, **fields}
  for name, value in (("dtype", dtype), ("image_shape", tuple(image_shape))):
    if name in takes and name not in kwargs:
      kwargs[name] = value
  if is_nnx:
    return adapters.NNXModel(cls, kwargs)
  try:
    return adapters.LinenModel(cls(**kwargs))
  except TypeError as e:
    raise UserError(f"Building {class_name} from the model config failed: {e}.") from e
