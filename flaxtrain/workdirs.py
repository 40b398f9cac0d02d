"""The run's directory: created only after the config is valid; config and summary files."""

import json
import os
import tempfile

from absl import logging

from flaxtrain.errors import UserError


def prepare(workdir: str, par):
  """Creates `workdir` and checks it is a writable directory."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir {workdir} is a file, not a directory: pass another --workdir.")
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test_"):
      pass
  except OSError as e:
    raise UserError(f"Cannot write to --workdir {workdir} ({e.strerror}): pass a writable "
                    "directory.") from e


def flat_config(config) -> dict:
  out = {}

  def walk(prefix, node):
    for k, v in node.items():
      key = f"{prefix}{k}"
      if hasattr(v, "items"):
        walk(key + ".", v)
      else:
        out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
  walk("", config)
  return out


def _atomic_write(path: str, text: str):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_config(workdir: str, config, par):
  if par.process_index == 0:
    _atomic_write(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))


def write_summary(workdir: str, summary: dict, par):
  if par.process_index == 0:
    _atomic_write(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2))
    logging.info("Wrote %s", os.path.join(workdir, "summary.json"))


def read_summary(workdir: str) -> dict | None:
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)
