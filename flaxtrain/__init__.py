"""flaxtrain: train JAX/Flax models from config files.

From Python: `flaxtrain.train(config, workdir, **overrides)` trains and returns the
summary; `flaxtrain.load(workdir, step="latest")` returns a trained run with `predict`.
Importing flaxtrain starts nothing (JAX loads at the first call).
"""

__version__ = "0.1.0"


def load(workdir: str, step: "int | str" = "latest"):
  """The run in `workdir` at checkpoint `step` ('latest', 'best' or a number): its
  config, model and variables on this process's first device, and `predict(images)`."""
  from flaxtrain import api

  return api.load(workdir, step)


def train(config="fashion_cnn", workdir: "str | None" = None, **overrides) -> dict:
  """Trains (or resumes) `config` (a packaged name, a path or a ConfigDict) in `workdir`
  with `overrides` (`num_epochs=2`, `optimizer__learning_rate=1e-3`); returns the summary."""
  from flaxtrain import api

  return api.train(config, workdir, **overrides)
