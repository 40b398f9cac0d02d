"""flaxtrain as a user installs it: packaged configs by name, --help, --list_configs, a wheel."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from importlib import metadata

import pytest
from conftest import ROOT, load_config

from flaxtrain import config_files
from flaxtrain.errors import UserError

CONFIG_NAMES = sorted(p.stem for p in (ROOT / "configs").glob("*.py"))
MODES = ("train", "describe", "eval", "report", "export")
# What a user's shell has: no test settings for JAX devices.
USER_ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
# Exits 0 without importing JAX or TensorFlow: what `--help` and `--list_configs` promise.
NO_JAX = (
  "import sys\n"
  "from flaxtrain import main\n"
  "try:\n"
  "  main.run()\n"
  "except SystemExit as e:\n"
  "  assert not e.code, e.code\n"
  "started = {'jax', 'tensorflow', 'tensorflow_datasets'} & set(sys.modules)\n"
  "assert not started, started\n"
)


def flaxtrain(*args, cwd, python=sys.executable, env=None):
  return subprocess.run(
    [python, "-m", "flaxtrain", *args],
    cwd=cwd,
    env={**USER_ENV, **(env or {})},
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_a_bare_name_is_a_packaged_config():
  assert config_files.names() == CONFIG_NAMES
  assert config_files.resolve("fashion_cnn") == ROOT / "configs" / "fashion_cnn.py"
  assert config_files.load("fashion_cnn").to_dict() == load_config("fashion_cnn").to_dict()
  summaries = config_files.packaged()
  assert list(summaries) == CONFIG_NAMES
  assert summaries["fashion_cnn"].startswith("The default: the Flax tutorial's CNN")
  assert all(s and "\n" not in s for s in summaries.values())


def test_a_path_is_a_path(tmp_path):
  assert config_files.resolve("configs/fashion_cnn.py") == pathlib.Path("configs/fashion_cnn.py")
  mine = tmp_path / "fashion_cnn.py"  # Named like a packaged config: the path wins.
  mine.write_text("X = 1\n")
  assert config_files.resolve(str(mine)) == mine
  with pytest.raises(UserError, match="does not exist"):
    config_files.resolve(str(tmp_path / "nope.py"))


def test_an_unknown_name_fails_in_one_sentence_listing_the_names():
  with pytest.raises(UserError) as e:
    config_files.resolve("fashion_cn")
  message = str(e.value)
  assert message.startswith("Unknown config 'fashion_cn' (did you mean fashion_cnn?)")
  assert ", ".join(CONFIG_NAMES) in message and "\n" not in message


# Only in make test; on the newest stack same there (our own name resolution).
@pytest.mark.slow
def test_cli_resolves_names_from_any_directory(tmp_path):
  # --mode=eval stops at the missing workdir, after the config and its overrides loaded:
  # config.model.hidden exists in fashion_mlp only, and the workdir is named after it.
  for config in (["--config=fashion_mlp"], ["--config", "fashion_mlp"]):
    r = flaxtrain(*config, "--config.model.hidden=(64,)", "--mode=eval", cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert "--workdir runs/fashion_mlp does not exist" in r.stderr
  r = flaxtrain("--mode=eval", cwd=tmp_path)  # The default config, outside the checkout.
  assert "--workdir runs/fashion_cnn does not exist" in r.stderr
  assert list(tmp_path.iterdir()) == []


# Only in make test; on the newest stack same there (our own name resolution).
@pytest.mark.slow
def test_cli_still_takes_paths(tmp_path):
  mine = tmp_path / "my_config.py"
  mine.write_text(
    "from flaxtrain import config_lib\n\n\n"
    "def get_config():\n"
    "  c = config_lib.get_base_config()\n"
    "  c.batch_size = 64\n"
    "  return c\n"
  )
  r = flaxtrain(f"--config={mine}", "--config.batch_size=32", "--mode=eval", cwd=tmp_path)
  assert "--workdir runs/my_config does not exist" in r.stderr
  nothing = tmp_path / "nothing"  # Not the checkout's runs/, which may hold a real run.
  r = flaxtrain("--config=configs/fashion_cnn.py", "--mode=eval", f"--workdir={nothing}", cwd=ROOT)
  assert f"--workdir {nothing} does not exist" in r.stderr
  r = flaxtrain("--config=configs/fashion_cnn.py", "--mode=eval", cwd=tmp_path)  # Relative.
  assert "Config file configs/fashion_cnn.py does not exist" in r.stderr


def test_cli_unknown_name_is_one_sentence_and_writes_nothing(tmp_path):
  r = flaxtrain("--config=fashion_cn", f"--workdir={tmp_path / 'run'}", cwd=tmp_path)
  assert r.returncode == 2
  errors = [line for line in r.stderr.splitlines() if line.startswith("flaxtrain: error:")]
  assert len(errors) == 1, r.stderr
  assert "Unknown config 'fashion_cn' (did you mean fashion_cnn?)" in errors[0]
  assert ", ".join(CONFIG_NAMES) in errors[0]
  assert "Traceback" not in r.stderr
  assert list(tmp_path.iterdir()) == []


def check_help(stdout: str):
  assert stdout.startswith("Usage: flaxtrain [--config=NAME_OR_PATH]")
  for mode in MODES:
    assert f"\n  {mode} " in stdout
  for flag in ("--config=NAME_OR_PATH", "--list_configs", "--workdir=DIR", "--mode", "--step"):
    assert f"\n  {flag}" in stdout
  assert "(default: fashion_cnn)" in stdout and "(default: latest)" in stdout
  assert "--config.KEY=VALUE" in stdout and "--config.batch_size=256" in stdout
  assert "did you mean --config.optimizer.name?" in " ".join(stdout.split())
  for name in CONFIG_NAMES:
    assert f"\n  {name} " in stdout
  assert "config_lib.py" in stdout and "README.md" in stdout


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(tmp_path, flag):
  r = flaxtrain(flag, cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  assert r.stderr == ""  # Neither TensorFlow's nor JAX's start-up notes.
  check_help(r.stdout)
  r = subprocess.run([sys.executable, "-c", NO_JAX, flag], cwd=tmp_path, capture_output=True)
  assert r.returncode == 0, r.stderr.decode()


def test_list_configs(tmp_path):
  r = flaxtrain("--list_configs", cwd=tmp_path)
  assert r.returncode == 0 and r.stderr == "", r.stderr
  lines = r.stdout.splitlines()
  summaries = config_files.packaged()
  assert [line.split()[0] for line in lines] == list(summaries)
  column = len(max(summaries, key=len)) + 2
  for line, (name, summary) in zip(lines, summaries.items(), strict=True):
    assert line == f"{name:<{column}}{summary}"
  r = subprocess.run(
    [sys.executable, "-c", NO_JAX, "--list_configs"], cwd=tmp_path, capture_output=True
  )
  assert r.returncode == 0, r.stderr.decode()


# The wheel, installed into a fresh venv (not editable). The venv borrows the main venv's
# installed dependencies through a .pth line: a path line puts that site-packages on
# sys.path without running the .pth files in it, so the editable flaxtrain stays out.


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
  """flaxtrain's wheel, built offline from a copy of the working tree."""
  setuptools = metadata.version("setuptools")
  assert int(setuptools.split(".")[0]) >= 77, (
    f"setuptools {setuptools} cannot build flaxtrain: pip install 'setuptools>=77' (make venv)"
  )
  tmp = tmp_path_factory.mktemp("wheel")
  src = tmp / "src"
  junk = shutil.ignore_patterns("__pycache__", "*.egg-info")
  for name in ("flaxtrain", "configs"):
    shutil.copytree(ROOT / name, src / name, ignore=junk)
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, src / name)
  subprocess.run(
    [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    + ["--quiet", "-w", str(tmp / "dist"), str(src)],
    check=True,
    timeout=300,
  )
  (path,) = (tmp / "dist").glob("flaxtrain-*.whl")
  return path


def test_wheel_holds_the_package_and_the_configs(wheel):
  files = set(zipfile.ZipFile(wheel).namelist())
  source = {
    p.relative_to(ROOT).as_posix()
    for p in (ROOT / "flaxtrain").rglob("*.py")
    if "__pycache__" not in p.parts
  }
  assert source <= files, f"missing from pyproject.toml's packages: {sorted(source - files)}"
  assert {f"flaxtrain/configs/{name}.py" for name in CONFIG_NAMES} <= files
  assert not any(f.startswith("configs/") for f in files)  # No top-level `configs` package.


def python_paths(python) -> dict:
  code = "import json, sysconfig; print(json.dumps(sysconfig.get_paths()))"
  return json.loads(subprocess.check_output([python, "-c", code], text=True))


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> pathlib.Path:
  """A fresh venv with the wheel installed; returns its bin/ directory."""
  env_dir = tmp_path_factory.mktemp("venv")
  venv.EnvBuilder(with_pip=False).create(env_dir)
  bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
  python = str(bin_dir / "python")
  ours = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
  site = pathlib.Path(python_paths(python)["purelib"])
  (site / "flaxtrain_test_deps.pth").write_text("\n".join(sorted(ours)) + "\n")
  subprocess.run(
    [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--ignore-installed"]
    + [str(wheel)],
    check=True,
    env=USER_ENV,
    timeout=300,
  )
  return bin_dir


@pytest.mark.slow  # A fresh venv and a run: make test only.
def test_wheel_installed_trains_from_an_empty_directory(installed, real_data_dir, tmp_path):
  python = str(installed / "python")
  site = pathlib.Path(python_paths(python)["purelib"])
  code = (
    "import json, flaxtrain, flaxtrain.configs\n"
    "from flaxtrain import config_files\n"
    "print(json.dumps([flaxtrain.__file__, list(flaxtrain.configs.__path__),"
    " str(config_files.resolve('fashion_cnn'))]))"
  )
  out = subprocess.check_output([python, "-c", code], cwd=tmp_path, env=USER_ENV, text=True)
  package, configs, fashion_cnn = json.loads(out)
  assert pathlib.Path(package) == site / "flaxtrain" / "__init__.py"  # The wheel's copy.
  assert [pathlib.Path(p) for p in configs] == [site / "flaxtrain" / "configs"]
  assert pathlib.Path(fashion_cnn) == site / "flaxtrain" / "configs" / "fashion_cnn.py"

  def run(*args):
    r = subprocess.run(
      [str(installed / "flaxtrain"), *args],
      cwd=tmp_path,
      env={**USER_ENV, "TFDS_DATA_DIR": real_data_dir},
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout

  assert "fashion_cnn" in [line.split()[0] for line in run("--list_configs").splitlines()]
  check_help(run("--help"))
  r = flaxtrain("--list_configs", cwd=tmp_path, python=python)
  assert r.returncode == 0 and "fashion_cnn " in r.stdout, r.stderr
  assert list(tmp_path.iterdir()) == []

  run(
    "--config=fashion_cnn",
    "--workdir=run",
    f"--config.dataset.data_dir={real_data_dir}",
    "--config.num_train_steps=20",
    "--config.log_every_steps=10",
    "--config.model.features=(8, 16)",
    "--config.model.dense=(32,)",
  )
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert summary["step"] == 20 and summary["eval_examples"] == 10_000, summary
  assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
