"""Checks a config file and its --config.* overrides before absl parses them.

ml_collections reports these problems as tracebacks (or lazily, much later); here each
becomes one sentence that says what to do.
"""

import difflib
import importlib.util
import os
import traceback

import ml_collections

from flaxtrain import config_files
from flaxtrain.errors import UserError


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Imports `path` and returns its get_config(); a UserError for every way that fails."""
  path = path.split(":", 1)[0]  # config_flags allows file.py:arg.
  if not os.path.isfile(path):
    raise config_files.missing(path)
  spec = importlib.util.spec_from_file_location("_flaxtrain_config_check", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise UserError(
      f"Config file {path} has a syntax error at line {e.lineno}: {e.msg}; fix the file."
    ) from e
  except Exception as e:
    raise UserError(f"Config file {path} failed to import ({_last_line(e)}): fix the file.") from e
  if not callable(getattr(module, "get_config", None)):
    raise UserError(
      f"Config file {path} has no get_config() function: define one that "
      "returns an ml_collections.ConfigDict."
    )
  try:
    config = module.get_config()
  except Exception as e:
    raise UserError(f"get_config() in {path} raised {_last_line(e)}: fix the file.") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(
      f"get_config() in {path} returned {type(config).__name__}, not an ml_collections.ConfigDict."
    )
  return config


def _last_line(e: Exception) -> str:
  return traceback.format_exception_only(e)[-1].strip()


def check_overrides(config: ml_collections.ConfigDict, argv: list[str], flag: str = "config"):
  """Every --config.a.b=... names an existing field, or a UserError suggests the closest."""
  prefix = f"--{flag}."
  for arg in argv:
    if not arg.startswith(prefix):
      continue
    key = arg[len(prefix) :].split("=", 1)[0]
    node, walked = config, []
    for part in key.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        choices = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        close = difflib.get_close_matches(part, choices, n=1)
        where = ".".join(walked) or "the config"
        hint = (
          f"did you mean --{flag}.{'.'.join(walked + [close[0]])}?"
          if close
          else f"valid keys of {where}: {', '.join(sorted(choices)) or 'none'}"
        )
        raise UserError(
          f"Unknown config field {key!r} in {arg.split('=', 1)[0]} ({hint}); "
          "fields must already exist in the config file."
        )
      walked.append(part)
      node = node[part]
