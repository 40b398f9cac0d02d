"""Orbax checkpoints of the replicated train state: save, keep, restore (the checksums and
the structure check a read checkpoint passes are in checkpoint_integrity.py).

Faults, and what this module does about them:

* A checkpoint that cannot be read (truncated, deleted or bit-flipped files; a partial
  copy): restoring warns, names the step and the reason, moves it aside
  (`<step>.unreadable-<time>`) and restores the previous one. Every save records a
  checksum per array in Orbax's `_CHECKPOINT_METADATA`, so flipped bits, which Orbax
  itself reads back silently, are caught too.
* Leftover Orbax temporary directories (a kill in the middle of a save) are never
  counted as checkpoints and are removed when the next run starts.
* A checkpoint of another model or optimizer is a user error, never a fallback.
* Each step's metrics are on disk, so the best checkpoint is still kept after a restart;
  a damaged metrics file only loses that (with a warning), never the start.
* A failed save (disk full, quota, storage errors), also one that fails in Orbax's
  background thread, becomes a one-sentence `UserError` at the next `save`, `wait` or
  `close`; older checkpoints are only deleted after a newer one is complete, so the
  last complete one is kept.
"""

import errno
import json
import logging as logging_std
import os
import re
import time

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers

from flaxtrain import checkpoint_integrity as integrity
from flaxtrain.errors import UserError

BEST_METRIC = "eval_accuracy"
# Orbax's per-step metadata file and its name for a single saved item.
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
ITEM_NAME = "default"
TMP_MARKER = ".orbax-checkpoint-tmp"
UNREADABLE_MARKER = ".unreadable-"
_CHECKSUMS_KEY = "flaxtrain_checksums"

_SPACE_ERRNOS = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded"}
# Status codes of tensorstore/absl errors: storage trouble rather than a bug.
_STORAGE_STATUS = re.compile(
  r"^(RESOURCE_EXHAUSTED|PERMISSION_DENIED|UNAVAILABLE|DATA_LOSS|"
  r"DEADLINE_EXCEEDED|ABORTED|NOT_FOUND):"
)


def _score_fn(name: str, mode: str):
  """Orbax ranks by the highest score: `name` for mode 'max', minus it for 'min'."""
  sign = 1.0 if mode == "max" else -1.0

  def score(metrics) -> float:
    value = (metrics or {}).get(name)
    return float("-inf") if value is None else sign * float(value)

  return score


class _Unreadable(Exception):
  """A checkpoint step that cannot be read back; the message says why."""


class _Manager(ocp.CheckpointManager):
  """Orbax's manager, but a step's damaged metrics file does not stop it from starting."""

  def _get_metrics(self, step: int):
    try:
      return super()._get_metrics(step)
    except Exception as e:  # noqa: BLE001 - e.g. a truncated JSON file.
      logging.warning(
        "Ignoring the unreadable metrics of the checkpoint at step %d in %s (%s).",
        step,
        self.directory,
        _short(e),
      )
      return None


class Checkpointer:
  """Keeps the newest `keep` checkpoints plus the best by `best_metric`; async saves."""

  def __init__(
    self,
    directory: str,
    *,
    keep: int = 3,
    async_save: bool = True,
    best_metric: str = BEST_METRIC,
    best_mode: str = "max",
  ):
    self.directory = _abspath(directory)
    _best_metric = _score_fn(best_metric, best_mode)
    policy = checkpoint_managers.AnyPreservationPolicy(
      [
        checkpoint_managers.LatestN(n=keep),
        checkpoint_managers.BestN(
          get_metric_fn=_best_metric, n=1, keep_checkpoints_without_metrics=False
        ),
      ]
    )
    options = ocp.CheckpointManagerOptions(
      preservation_policy=policy,
      enable_async_checkpointing=async_save,
      create=True,
      # With a best_fn Orbax writes each step's metrics to disk (`<step>/metrics`), so
      # that the best checkpoint is still known, and kept, after a restart.
      best_fn=_best_metric,
      best_mode="max",
      # Temporary directories of saves that never finished (a kill mid-save) are not
      # checkpoints: Orbax never lists them, and this removes them.
      cleanup_tmp_directories=True,
    )
    self.manager = _Manager(self.directory, options=options)
    _StorageTracebacks.install()
    self._pending_step = None  # The step whose async save may still fail.
    self._failure = None  # The UserError of a failed save, raised again on every wait.

  # ---------------------------------------------------------------- listing

  def latest_step(self) -> int | None:
    """The newest complete checkpoint (it may still turn out unreadable on restore)."""
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def best_step(self) -> int | None:
    """The checkpoint with the best eval metric (None before the first eval)."""
    return self.manager.best_step()

  # ----------------------------------------------------------------- saving

  def save(self, step: int, state, metrics: dict | None = None, force: bool = False) -> bool:
    """Starts an async save of `state` at `step`; raises a UserError if a save failed.

    A failure of the previous async save surfaces here (or at `wait`/`close`).
    """
    self.wait()
    # Always a dict (empty between evals): Orbax then writes it without a warning.
    metrics = {k: float(v) for k, v in (metrics or {}).items()}
    tree = flax.serialization.to_state_dict(state)
    try:
      custom = {_CHECKSUMS_KEY: integrity.checksums(tree)}
      saved = self.manager.save(
        step, args=ocp.args.StandardSave(tree), metrics=metrics, force=force, custom_metadata=custom
      )
    except Exception as e:  # noqa: BLE001 - converted when it is a storage problem.
      self._raise_save_error(step, e)
    if saved:
      self._pending_step = step
    return saved

  def wait(self):
    """Waits for the async save; raises a UserError if it (or an earlier one) failed."""
    if self._failure is not None:
      raise self._failure
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      self._raise_save_error(self._pending_step, e)
    self._pending_step = None

  def close(self):
    try:
      self.wait()
    finally:
      self.manager.close()

  def _raise_save_error(self, step, exc: Exception):
    reason = storage_error(exc)
    if reason is None:
      raise exc
    self._remove_temporary_dirs()
    try:
      self.manager.reload()  # What is complete on disk, not what was planned.
      last = self.manager.latest_step()
    except Exception:  # noqa: BLE001 - the message below still holds without it.
      last = None
    kept = (
      f"the last complete checkpoint (step {last}) is kept"
      if last is not None
      else "no complete checkpoint was written before it"
    )
    at = f" at step {step}" if step is not None else ""
    if reason in _SPACE_ERRNOS.values():
      advice = "free space or use another --workdir"
    else:
      advice = "check the storage or use another --workdir"
    self._failure = UserError(
      f"{reason} while saving the checkpoint{at} in {self.directory}; {kept}: {advice}."
    )
    self._pending_step = None
    raise self._failure from exc

  def _remove_temporary_dirs(self):
    """Frees the space of unfinished saves (Orbax would remove them at the next start)."""
    if jax.process_index() != 0:
      return
    try:
      for p in epath.Path(self.directory).iterdir():
        if TMP_MARKER in p.name:
          p.rmtree(missing_ok=True)
    except Exception as e:  # noqa: BLE001 - best effort only.
      logging.warning("Could not remove unfinished checkpoint files in %s: %s", self.directory, e)

  # -------------------------------------------------------------- restoring

  def restore_latest(self, target):
    """Restores the newest readable checkpoint into `target`'s structure and shardings.

    Returns `(state, step)`, or `(None, None)` when there is no checkpoint. A checkpoint
    that cannot be read is reported with a warning and moved aside, and the previous one
    is tried; a checkpoint of another structure raises a UserError (no fall-back), and
    so does a directory none of whose checkpoints can be read.
    """
    steps = self.all_steps()
    if not steps:
      return None, None
    return self._restore_newest(steps, target)

  def restore(self, step: int, target):
    """Restores `step` into the structure, shapes and shardings of `target`.

    If `step` cannot be read, falls back like `restore_latest` to the newest older one
    that can: the returned state's own `step` says which was restored.
    """
    steps = [s for s in self.all_steps() if s <= step]
    if step not in steps:
      raise UserError(f"There is no checkpoint at step {step} in {self.directory}.")
    return self._restore_newest(steps, target)[0]

  def _restore_newest(self, steps: list[int], target):
    tree = flax.serialization.to_state_dict(target)
    restored, step, failed = _read_newest(
      self.manager, self.directory, steps, tree, where=self.directory
    )
    if restored is None:
      raise UserError(
        f"None of the checkpoints in {self.directory} can be read (steps "
        f"{', '.join(str(s) for s, _ in failed)}; step {failed[0][0]}: {failed[0][1]}): use "
        "a new --workdir, or move that directory away to start this run again."
      )
    if failed:
      moved = self._move_aside([s for s, _ in failed])
      logging.warning(
        "Restored the checkpoint at step %d instead of step %d; the unreadable "
        "checkpoint(s) were moved to %s.",
        step,
        failed[0][0],
        ", ".join(moved),
      )
    return flax.serialization.from_state_dict(target, restored), step

  def _move_aside(self, steps: list[int]) -> list[str]:
    """Renames unreadable steps so that Orbax no longer lists them or saves over them."""
    names = []
    stamp = int(time.time())
    for step in steps:
      src = epath.Path(self.directory) / str(step)
      dst = src.parent / f"{step}{UNREADABLE_MARKER}{stamp}"
      names.append(str(dst))
      if jax.process_index() != 0:
        continue
      try:
        src.rename(dst)
      except Exception as e:  # noqa: BLE001 - e.g. object stores without directory rename.
        logging.warning("Could not rename %s (%s); deleting it instead.", src, e)
        src.rmtree(missing_ok=True)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("flaxtrain_unreadable_moved")
    self.manager.reload()
    return names


# ------------------------------------------------------------------ init_from


def load_init(path: str, target_params, target_model_state: dict, model_name: str):
  """(params, model_state) for `--config.init_from`: from a torchvision/timm weights file
  (flaxtrain/pretrained.py) or another flaxtrain run's checkpoint (`load_params`, plus its
  model state such as BatchNorm statistics where the model has any)."""
  from flaxtrain import pretrained

  if pretrained.is_weights_file(path):
    return pretrained.load(path, target_params, target_model_state, model_name)
  tree = {"params": target_params}
  if jax.tree.leaves(target_model_state):
    tree["model_state"] = target_model_state
  restored = _load_for_init(path, tree)
  return restored["params"], restored.get("model_state", target_model_state)


def load_params(path: str, target_params):
  """Reads only the `params` of another run's checkpoint, for `--config.init_from`.

  `path` is a flaxtrain workdir (its newest readable checkpoint is used, falling back like
  `Checkpointer.restore_latest`), its `checkpoints` directory, or one step directory
  `.../checkpoints/<step>` (used as is, no fall-back). Nothing under `path` is written.
  The params are checked against `target_params` (a UserError names the first entry that
  differs) and returned with `target_params`' shardings.
  """
  return _load_for_init(path, {"params": target_params})["params"]


def _load_for_init(path: str, target: dict) -> dict:
  """The entries of `target` (a part of the train state) read from the checkpoint at
  `path`, as `load_params` describes."""
  root = epath.Path(_abspath(path))
  if not root.exists():
    raise UserError(
      f"init_from {path} does not exist: pass a flaxtrain workdir or one of "
      "its checkpoints/<step> directories."
    )
  if (root / STEP_METADATA_FILE).exists() or (root / ITEM_NAME).exists():
    directory, only_step = root.parent, _step_of(root, path)
  else:
    directory = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    only_step = None
  manager = _read_only_manager(str(directory))
  try:
    steps = [only_step] if only_step is not None else manager.all_steps()
    if not steps:
      raise UserError(
        f"init_from {path} holds no complete checkpoint: pass a flaxtrain "
        "workdir or one of its checkpoints/<step> directories."
      )
    tree = {k: flax.serialization.to_state_dict(v) for k, v in target.items()}
    restored, step, failed = _read_newest(
      manager,
      str(directory),
      steps,
      tree,
      where=path,
      partial=True,
      advice="pass a checkpoint of the same model in init_from",
    )
  finally:
    manager.close()
  if restored is None:
    raise UserError(
      f"The checkpoint at step {failed[0][0]} in {directory} cannot be read "
      f"({failed[0][1]})"
      + (f", nor can {len(failed) - 1} older one(s)" if len(failed) > 1 else "")
      + ": pass another checkpoint in init_from."
    )
  logging.info("Initialized the params from the checkpoint at step %d in %s.", step, directory)
  return {k: flax.serialization.from_state_dict(v, restored[k]) for k, v in target.items()}


def _step_of(step_dir: epath.Path, path: str) -> int:
  if not step_dir.name.isdigit():
    raise UserError(
      f"init_from {path} is not a checkpoints/<step> directory: pass a "
      "flaxtrain workdir or one of its checkpoints/<step> directories."
    )
  return int(step_dir.name)


class _StorageTracebacks(logging_std.Filter):
  """Quiets what Orbax and asyncio log, with tracebacks, for a save that hit a storage error.

  The save's UserError says it in one sentence (with --verbose its traceback chains
  Orbax's exception): Orbax's records keep their line but lose the traceback, and
  asyncio's "Task exception was never retrieved" for Orbax's write tasks, which comes at
  exit after that sentence, is dropped.
  """

  _installed = False

  @classmethod
  def install(cls):
    if not cls._installed:
      for name in ("absl", "asyncio"):
        logging_std.getLogger(name).addFilter(cls())
      cls._installed = True

  def filter(self, record):
    exc = record.exc_info[1] if record.exc_info else None
    if exc is None or storage_error(exc) is None:
      return True
    if record.name == "asyncio":
      return "orbax" not in record.getMessage()
    if "orbax" in record.pathname:
      record.exc_info, record.exc_text = None, None
    return True


class _DropReadOnlyNotes(logging_std.Filter):
  def filter(self, record):
    return "read only" not in str(record.msg) and "read_only" not in str(record.msg)


def _read_only_manager(directory: str, **options) -> ocp.CheckpointManager:
  note_filter = _DropReadOnlyNotes()
  absl_logger = logging_std.getLogger("absl")
  absl_logger.addFilter(note_filter)
  try:
    return _Manager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False, **options)
    )
  finally:
    absl_logger.removeFilter(note_filter)


def read(
  directory: str,
  target,
  step: int | str | None = None,
  *,
  best_metric: str = BEST_METRIC,
  best_mode: str = "max",
):
  """Restores `step` (an int, None/'latest' or 'best') of `directory` into `target`.

  Read-only, for looking at a run (eval, report, export) that may still be training:
  nothing in `directory` is created, cleaned up or moved. 'latest' falls back past
  unreadable checkpoints with a warning. Returns `(state, step)`.
  """
  directory = _abspath(directory)
  if not epath.Path(directory).is_dir():
    raise UserError(
      f"There are no checkpoints in {directory}: train the run first "
      "(--mode=train), or pass the --workdir of a trained run."
    )
  manager = _read_only_manager(
    directory, best_fn=_score_fn(best_metric, best_mode), best_mode="max"
  )
  try:
    steps = sorted(manager.all_steps())
    if not steps:
      raise UserError(
        f"There are no checkpoints in {directory}: train the run first "
        "(--mode=train), or pass the --workdir of a trained run."
      )
    if step in (None, "latest"):
      candidates = steps
    elif step == "best":
      best = manager.best_step()
      if best is None:
        raise UserError(
          f"No checkpoint in {directory} has eval metrics to pick the best "
          "by: pass --step=latest or a step number."
        )
      candidates = [best]
    elif isinstance(step, int) and step in steps:
      candidates = [step]
    else:
      raise UserError(
        f"There is no checkpoint at step {step} in {directory}: pass --step as "
        f"'latest', 'best' or one of {', '.join(map(str, steps))}."
      )
    tree = flax.serialization.to_state_dict(target)
    restored, got, failed = _read_newest(manager, directory, candidates, tree, where=directory)
  finally:
    manager.close()
  if restored is None:
    raise UserError(
      f"The checkpoint at step {failed[0][0]} in {directory} cannot be read "
      f"({failed[0][1]}): pass another --step."
    )
  return flax.serialization.from_state_dict(target, restored), got


# ------------------------------------------------------------------- reading


def _read_newest(manager, directory: str, steps, tree, *, where: str, partial=False, advice=None):
  """Reads the newest readable of `steps`: (restored, step, [(unreadable step, why)]).

  `restored` is None if none can be read. A structure mismatch raises a UserError.
  """
  failed = []
  for step in sorted(steps, reverse=True):
    try:
      restored = _read_step(
        manager, directory, step, tree, where=where, partial=partial, advice=advice
      )
      error = None
    except _Unreadable as e:
      restored, error = None, str(e)
    if not _all_processes_agree(error is None):  # All processes restore the same step.
      restored, error = None, error or "another process could not read it"
    if error is None:
      return restored, step, failed
    logging.warning(
      "The checkpoint at step %d in %s cannot be read (%s); trying the previous one.",
      step,
      directory,
      error,
    )
    failed.append((step, error))
  return None, None, failed


def _read_step(manager, directory: str, step: int, tree, *, where: str, partial=False, advice=None):
  """Reads `step` shaped like `tree`; _Unreadable if it cannot, UserError on mismatch."""
  step_dir = epath.Path(directory) / str(step)
  recorded = _recorded_checksums(step_dir)
  try:
    # Read from the files: a CheckpointManager that has not saved yet returns None here.
    handler = ocp.PyTreeCheckpointHandler()
    try:
      saved_d = integrity.describe(handler.metadata(step_dir / ITEM_NAME))
    finally:
      handler.close()
  except Exception as e:  # noqa: BLE001 - whatever Orbax raises on damaged metadata.
    raise _Unreadable(f"its metadata: {_short(e)}") from e
  if not saved_d:
    raise _Unreadable(f"{step_dir / ITEM_NAME} holds no arrays")
  target_d = integrity.describe(tree)
  if partial:
    prefixes = tuple(k.split("/")[0] for k in target_d)
    saved_d = {k: v for k, v in saved_d.items() if k.split("/")[0] in prefixes}
  integrity.check(saved_d, target_d, where=where, advice=advice)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  try:
    if partial:
      restored = manager.restore(
        step,
        args=ocp.args.PyTreeRestore(
          item=abstract,
          restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
          partial_restore=True,
        ),
      )
    else:
      restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # noqa: BLE001 - any tensorstore/Orbax read error.
    raise _Unreadable(_short(e)) from e
  if recorded is not None:
    actual = integrity.checksums(restored)
    bad = [k for k, v in actual.items() if k in recorded and recorded[k] != v]
    if bad:
      raise _Unreadable(
        f"entry {bad[0]} does not match its checksum"
        + (f" (nor do {len(bad) - 1} more)" if len(bad) > 1 else "")
      )
  return restored


def _recorded_checksums(step_dir: epath.Path) -> dict | None:
  """The checksums saved with the step; _Unreadable if its metadata file is damaged."""
  meta_path = step_dir / STEP_METADATA_FILE
  try:
    meta = json.loads(meta_path.read_text())
  except FileNotFoundError as e:
    raise _Unreadable(f"{meta_path} is missing") from e
  except Exception as e:  # noqa: BLE001 - truncated or garbled JSON, unreadable file.
    raise _Unreadable(f"{meta_path} is damaged: {_short(e)}") from e
  if not isinstance(meta, dict):
    raise _Unreadable(f"{meta_path} is damaged")
  custom = meta.get("custom_metadata") or {}
  return custom.get(_CHECKSUMS_KEY)  # None for checkpoints written without them.


# -------------------------------------------------------------------- helpers


def storage_error(exc: BaseException) -> str | None:
  """A short reason if `exc` (or what caused it) is a storage failure, else None."""
  seen, todo, generic = set(), [exc], None
  while todo:
    e = todo.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _SPACE_ERRNOS:
      return _SPACE_ERRNOS[e.errno]
    text = str(e)
    for code, reason in _SPACE_ERRNOS.items():
      if reason in text or f"os_error_code='{code}'" in text:
        return reason
    if generic is None and (isinstance(e, (OSError, TimeoutError)) or _STORAGE_STATUS.match(text)):
      generic = (
        f"{os.strerror(e.errno)}"
        if isinstance(e, OSError) and e.errno
        else f"Storage error ({_short(e)})"
      )
    todo.extend([e.__cause__, e.__context__, *getattr(e, "exceptions", ())])
  return generic


def _short(e: BaseException, limit: int = 240) -> str:
  text = " ".join(str(e).split())
  text = text.split(" [tensorstore_spec=")[0].split(" See full TensorStore details")[0]
  if len(text) > limit:
    text = text[: limit - 3] + "..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _abspath(directory: str) -> str:
  return os.path.abspath(directory) if "://" not in directory else directory


def _all_processes_agree(ok: bool) -> bool:
  """True only if `ok` on every process: all then restore the same step."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  flags = multihost_utils.process_allgather(np.array(ok, np.int32))
  return bool(np.all(flags))
