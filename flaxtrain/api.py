"""flaxtrain from Python (a notebook, a script): `load` a run, `train` a config.

    import flaxtrain
    run = flaxtrain.load("runs/fashion_cnn")            # latest checkpoint; or step="best", 936
    probs = run.predict(images)                         # uint8 [N, H, W, C] -> [N, classes]
    summary = flaxtrain.train("fashion_cnn", "runs/try", num_epochs=2,
                              optimizer__learning_rate=1e-3)

`load` needs neither the run's devices nor its data: a checkpoint written by 2 hosts x 4
devices loads into a 1-device session (the checkpoint is restored into this process's
first device, whatever the run used).
"""

import copy
import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from flaxtrain import (
  checkpointing,
  config_check,
  config_files,
  evaluate,
  experiment,
  models,
  optimizers,
  parallel,
  steps,
  tasks,
  workdirs,
)
from flaxtrain.data import prepare
from flaxtrain.errors import UserError
from flaxtrain.models import analysis


@dataclasses.dataclass
class Run:
  """A trained run's checkpoint, ready to apply: config, model, variables, task."""

  workdir: str
  step: int
  config: ml_collections.ConfigDict
  spec: prepare.DatasetSpec  # Image shape, class count and names of the run's dataset.
  model: Any  # A linen or NNX model behind models/adapters.py: `model.apply(variables, x)`.
  variables: dict  # {"params": ..., **model_state}; the EMA params when the run kept one.
  task: tasks.Task
  summary: dict | None  # The run's summary.json, if it finished.

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.spec.class_names

  def apply(self, images, batch_size: int = 256) -> np.ndarray:
    """The model's raw outputs (e.g. logits) for uint8 images [N, H, W, C]."""
    return self._batched(images, batch_size, raw=True)

  def predict(self, images, batch_size: int = 256) -> np.ndarray:
    """The task's output for uint8 images [N, H, W, C] (or one [H, W, C] image): class
    probabilities [N, classes] for classification, images in [0, 1] for reconstruction.

    Images are prepared as the run's eval data was: the dataset's own size, or for
    streamed datasets resized and centre-cropped to `config.dataset.image_size`.
    """
    return self._batched(images, batch_size, raw=False)

  def _batched(self, images, batch_size: int, raw: bool) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
      raise UserError(
        f"predict and apply take uint8 images (pixels 0-255, as the dataset stores them), "
        f"got {images.dtype}: convert them, or call run.model.apply(run.variables, x, "
        "train=False) on floats normalised as in training."
      )
    shape = tuple(self.spec.image_shape)
    single = images.shape == shape
    if single:
      images = images[None]
    if images.shape[1:] != shape:
      raise UserError(
        f"Images must be [N, {', '.join(map(str, shape))}] (or one "
        f"[{', '.join(map(str, shape))}] image) as the run's eval data, got shape "
        f"{tuple(images.shape)}: resize or crop them first."
      )
    fn = self._fn(raw)
    outputs = []
    for start in range(0, len(images), batch_size):
      chunk = images[start : start + batch_size]
      pad = batch_size - len(chunk) if len(images) > batch_size else 0
      if pad:  # One compiled shape for every chunk.
        chunk = np.concatenate([chunk, np.zeros((pad, *shape), chunk.dtype)])
      outputs.append(np.asarray(fn(self.variables, chunk))[: len(chunk) - pad])
    if not outputs:  # No images: the output's shape from one padded example.
      return np.asarray(fn(self.variables, np.zeros((1, *shape), np.uint8)))[:0]
    out = np.concatenate(outputs)
    return out[0] if single else out

  def _fn(self, raw: bool):
    cache = self.__dict__.setdefault("_compiled", {})
    if raw not in cache:
      dtype = steps.DTYPES[self.config.compute_dtype]
      norm = steps.normalization(self.config)

      def fn(variables, images):
        out = self.model.apply(variables, steps.preprocess(images, dtype, norm), train=False)
        return out.astype(jnp.float32) if raw else self.task.predict(out)

      cache[raw] = jax.jit(fn)
    return cache[raw]


def load(workdir: str, step: int | str = "latest") -> Run:
  """The checkpoint `step` ('latest', 'best' by the task's eval metric, or a step number)
  of the run in `workdir`, on this process's first device."""
  if isinstance(step, str) and step.isdigit():
    step = int(step)
  if isinstance(step, bool) or (step not in ("latest", "best") and not isinstance(step, int)):
    raise UserError(f"step={step!r} is not a checkpoint: pass 'latest', 'best' or a step number.")
  evaluate.check_run(workdir, step)
  config = _run_config(workdir)
  spec = _run_spec(workdir, config)
  dtype = steps.DTYPES[config.compute_dtype]
  model = models.get(config.model, spec.num_classes, dtype, spec.image_shape)
  task = tasks.get(config.task, spec.num_classes)
  steps_per_epoch = max(1, spec.num_train // config.batch_size)
  # Only the optimizer state's structure matters here, not its schedule's values.
  tx, _ = optimizers.make(
    config.optimizer,
    config.schedule,
    steps_per_epoch=steps_per_epoch,
    total_steps=config.num_train_steps or config.num_epochs * steps_per_epoch,
    params=lambda: analysis.param_shapes(model, spec.image_shape),
  )
  par = parallel.DataParallel(jax.local_devices()[:1])
  target = steps.init_state(
    model, tx, spec.image_shape, config.seed, par, ema=bool(config.ema_decay)
  )
  state, restored_step = checkpointing.read(
    os.path.join(workdir, "checkpoints"),
    target,
    step,
    best_metric=task.best_metric,
    best_mode=task.best_mode,
  )
  variables = {"params": steps.eval_params(state), **state.model_state}
  return Run(
    workdir=str(workdir),
    step=restored_step,
    config=config,
    spec=spec,
    model=model,
    variables=variables,
    task=task,
    summary=workdirs.read_summary(workdir),
  )


def train(
  config: str | ml_collections.ConfigDict = config_files.DEFAULT,
  workdir: str | None = None,
  **overrides,
) -> dict:
  """Trains (or resumes) `config` in `workdir`; returns the run's summary.

  `config` is a packaged config's name, a config file's path or a ConfigDict;
  `overrides` set its fields: `num_epochs=2`, `optimizer__learning_rate=1e-3` (or
  `**{"optimizer.learning_rate": 1e-3}`). The default workdir is runs/<config name>.
  Uses every device JAX sees in this process. After a stop signal (SIGTERM, Ctrl-C) the
  checkpoint is saved and the summary is only `{"step": N, "stopped": True}`.
  """
  from flaxtrain import console, loop, progress

  if isinstance(config, ml_collections.ConfigDict):
    name = "run"
    config = copy.deepcopy(config)  # The caller's stays as it was.
  else:
    name = epath.Path(str(config)).stem
    config = config_files.load(str(config))
  for key, value in overrides.items():
    _override(config, key.replace("__", "."), value)
  config.lock()
  workdir = workdir or os.path.join("runs", name)
  with console.api_logging() as terminal:
    bar = progress.Progress(process_index=jax.process_index(), log_handler=terminal)
    try:
      return loop.train_and_evaluate(config, workdir, progress=bar)
    finally:
      bar.close()


def _override(config: ml_collections.ConfigDict, key: str, value):
  config_check.check_overrides(config, [f"--config.{key}=..."])  # Unknown keys: a sentence.
  *path, last = key.split(".")
  node = config
  for part in path:
    node = node[part]
  try:
    node[last] = value
  except (TypeError, ValueError) as e:
    raise UserError(
      f"{key}={value!r} does not fit the config field ({' '.join(str(e).split())}): pass a "
      f"value of the field's type ({type(node[last]).__name__})."
    ) from e


def _run_config(workdir: str) -> ml_collections.ConfigDict:
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise UserError(
      f"{workdir} has no config.json, so its model is unknown: pass the workdir of a run "
      "that flaxtrain trained."
    )
  try:
    saved = json.loads(path.read_text())
  except ValueError as e:
    raise UserError(f"{path} is not valid JSON ({e}): restore it from the run's copy.") from e
  return ml_collections.ConfigDict(_tuples(saved))


def _tuples(value):
  """JSON's lists back to the tuples the config held."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def _run_spec(workdir: str, config) -> prepare.DatasetSpec:
  """The dataset's shape and classes as the run recorded them (dataset.json), else from
  the dataset itself (older runs: loads it)."""
  path = epath.Path(workdir) / workdirs.SPEC_FILE
  if path.exists():
    fields = json.loads(path.read_text())
    fields["image_shape"] = tuple(fields["image_shape"])
    fields["class_names"] = tuple(fields["class_names"])
    return prepare.DatasetSpec(**fields)
  exp = experiment.Experiment(config, parallel.DataParallel(jax.local_devices()[:1]))
  try:
    return exp.spec
  finally:
    exp.data.close()
