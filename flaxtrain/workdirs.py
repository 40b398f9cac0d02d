"""The run's directory (local or gs://): created only after the config is valid.

Also checks, before a multi-process run trains, that every process sees the same
storage: otherwise checkpoints would be written in pieces and a pod would hang at the
first save (as the Flax ImageNet example does, flax issue 3364).
"""

import contextlib
import dataclasses
import json
import secrets

import numpy as np
from absl import logging
from etils import epath

from flaxtrain.errors import UserError


def prepare(workdir: str, par):
  """Creates `workdir`, checks it is writable and, multi-process, shared by all."""
  path = epath.Path(workdir)
  if path.exists() and not path.is_dir():
    raise UserError(f"--workdir {workdir} is a file, not a directory: pass another --workdir.")
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write_test_{par.process_index}_{secrets.token_hex(4)}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise UserError(
      f"Cannot write to --workdir {workdir} ({e.strerror or e}): pass a writable directory."
    ) from e
  if par.num_processes > 1:
    _check_shared(path, par)


def _check_shared(path: epath.Path, par):
  from jax.experimental import multihost_utils

  # A nonce from process 0 so that markers of an earlier run cannot pass the check.
  nonce = int(multihost_utils.broadcast_one_to_all(np.int32(secrets.randbits(31))))
  markers = path / ".process_markers" / str(nonce)
  markers.mkdir(parents=True, exist_ok=True)
  (markers / str(par.process_index)).write_text("ok")
  multihost_utils.sync_global_devices("flaxtrain_markers_written")
  seen = sum((markers / str(i)).exists() for i in range(par.num_processes))
  counts = multihost_utils.process_allgather(np.int32(seen))
  multihost_utils.sync_global_devices("flaxtrain_markers_read")
  if par.process_index == 0:
    for i in range(par.num_processes):
      (markers / str(i)).unlink(missing_ok=True)
    markers.rmdir()
  if (np.asarray(counts) != par.num_processes).any():
    raise UserError(
      f"--workdir {path} is not one storage shared by all {par.num_processes} processes "
      f"(processes saw {np.asarray(counts).tolist()} of each other's marker files): use a "
      "shared filesystem or a gs:// path."
    )


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


def atomic_write(path: epath.Path, text: str):
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(text)
  # replace, not rename (which refuses an existing file): a rerun after a kill before the
  # first checkpoint writes config.json again, a resumed finished run summary.json.
  tmp.replace(path)


# The dataset's shape and classes as the run saw them: `flaxtrain.load` builds the model
# from this and config.json without loading the data.
SPEC_FILE = "dataset.json"


def write_config(workdir: str, config, par):
  if par.process_index == 0:
    atomic_write(epath.Path(workdir) / "config.json", config.to_json_best_effort(indent=2))


def write_spec(workdir: str, spec, par):
  if par.process_index == 0:
    fields = dataclasses.asdict(spec)
    atomic_write(epath.Path(workdir) / SPEC_FILE, json.dumps(fields, indent=2))


def write_summary(workdir: str, summary: dict, par):
  if par.process_index == 0:
    path = epath.Path(workdir) / "summary.json"
    atomic_write(path, json.dumps(summary, indent=2))
    logging.info("Wrote %s", path)


def read_summary(workdir: str) -> dict | None:
  path = epath.Path(workdir) / "summary.json"
  return json.loads(path.read_text()) if path.exists() else None


@contextlib.contextmanager
def staged_dir(path):
  """Yields an empty sibling directory to fill; it replaces `path` only if the block succeeds.

  A failure halfway leaves `path` as it was (a previous export or report stays whole).
  """
  final = epath.Path(path)
  tmp = final.parent / f".{final.name}.tmp"
  old = final.parent / f".{final.name}.old"
  tmp.rmtree(missing_ok=True)
  tmp.mkdir(parents=True)
  try:
    yield tmp
  except BaseException:
    tmp.rmtree(missing_ok=True)
    raise
  old.rmtree(missing_ok=True)
  if final.exists():
    final.rename(old)
  tmp.rename(final)
  old.rmtree(missing_ok=True)
