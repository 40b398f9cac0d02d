"""The configs that ship with flaxtrain: find one by name, list them, load one.

The repository's top-level configs/ is installed as flaxtrain/configs/ (pyproject.toml), so
`--config=fashion_cnn` works from a wheel in any directory; from a source checkout (or an
editable install) the names are the files in configs/. Importing this module starts
nothing: the command line and the Python API both use it.
"""

import ast
import difflib
import os
import pathlib

import ml_collections

from flaxtrain.errors import UserError

DEFAULT = "fashion_cnn"


def directory() -> pathlib.Path:
  """flaxtrain/configs/ in an installed wheel, else the checkout's configs/ beside the package."""
  package = pathlib.Path(__file__).resolve().parent
  installed = package / "configs"
  return installed if installed.is_dir() else package.parent / "configs"


def names() -> list[str]:
  """The packaged configs' names, sorted."""
  found = directory().glob("*.py") if directory().is_dir() else ()
  return sorted(p.stem for p in found if not p.name.startswith("_"))


def packaged() -> dict[str, str]:
  """Name -> the first line of that config's docstring (read from the file, not imported)."""
  return {name: _summary(directory() / f"{name}.py") for name in names()}


def _summary(path: pathlib.Path) -> str:
  try:
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"), str(path)))
  except (OSError, SyntaxError, ValueError):
    return ""
  return doc.strip().splitlines()[0] if doc and doc.strip() else ""


def is_name(text: str) -> bool:
  """Whether `text` is a bare config name (fashion_cnn), not a path (configs/fashion_cnn.py)."""
  separators = [s for s in (os.sep, os.altsep, "/") if s]
  return bool(text) and not text.endswith(".py") and not any(s in text for s in separators)


def resolve(name_or_path: str) -> pathlib.Path:
  """The file of a packaged config for a bare name; any other text is a path to a file."""
  if not is_name(name_or_path):
    path = pathlib.Path(name_or_path)
    if not path.is_file():
      raise missing(name_or_path)
    return path
  available = names()
  if name_or_path in available:
    return directory() / f"{name_or_path}.py"
  close = difflib.get_close_matches(name_or_path, available, n=1)
  hint = f" (did you mean {close[0]}?)" if close else ""
  raise UserError(
    f"Unknown config {name_or_path!r}{hint}: pass a packaged config's name "
    f"({_listed(available)}) or a path to a .py file with get_config()."
  )


def missing(path: str) -> UserError:
  """The error for a config path that is not a file."""
  return UserError(
    f"Config file {path} does not exist: pass --config=PATH to a .py file with get_config() "
    f"or a packaged config's name ({_listed(names())})."
  )


def _listed(available: list[str]) -> str:
  return ", ".join(available) if available else f"none found in {directory()}"


def load(name_or_path: str) -> ml_collections.ConfigDict:
  """What the config's get_config() returns (not locked: the command line locks it)."""
  from flaxtrain import config_check  # It imports this module for its errors.

  return config_check.load_config_file(str(resolve(name_or_path)))
