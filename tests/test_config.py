import pathlib

import ml_collections
import pytest
from conftest import ROOT, load_config

from flaxtrain import config_check
from flaxtrain.errors import UserError

CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py"))


def test_there_are_configs():
  assert {"fashion_cnn", "fashion_mlp", "mnist_cnn", "cifar10_cnn"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_locks_and_documents_its_launch_command(name):
  c = load_config(name)
  assert isinstance(c, ml_collections.ConfigDict)
  c.lock()
  with pytest.raises(AttributeError):
    c.batch_sise = 3  # A typo cannot add a key once locked.
  doc = (ROOT / "configs" / f"{name}.py").read_text()
  assert f"flaxtrain --config=configs/{name}.py" in doc


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_valid(name):
  from flaxtrain import experiment, parallel

  experiment.validate(load_config(name), parallel.DataParallel())


def test_typo_in_override_suggests_the_field():
  c = load_config("fashion_cnn")
  with pytest.raises(UserError, match=r"did you mean --config\.optimizer\.name\?"):
    config_check.check_overrides(c, ["--config.optimizer.nmae=x"])
  config_check.check_overrides(c, ["--config.optimizer.name=sgd", "--workdir=x"])


def test_unknown_nested_override_lists_valid_keys():
  with pytest.raises(UserError, match="valid keys of model: conv, dense, dropout, features, name"):
    config_check.check_overrides(load_config("fashion_cnn"), ["--config.model.nope.x=1"])


@pytest.mark.parametrize(
  "text,match",
  [
    (None, "does not exist"),
    ("def get_config(:\n", "syntax error at line 1"),
    ("X = 1\n", "no get_config"),
    ("def get_config():\n  return 3\n", "not an ml_collections.ConfigDict"),
    ("def get_config():\n  raise ValueError('boom')\n", "raised ValueError: boom"),
    ("import nonexistent_module_xyz\n", "failed to import"),
  ],
)
def test_bad_config_files(tmp_path: pathlib.Path, text, match):
  path = tmp_path / "cfg.py"
  if text is not None:
    path.write_text(text)
  with pytest.raises(UserError, match=match) as e:
    config_check.load_config_file(str(path))
  assert "\n" not in str(e.value)
