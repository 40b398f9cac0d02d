"""Shared test set-up: 4 fake CPU devices in-process, synthetic learnable data."""

import os

# Must be set before JAX initializes its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The tests simulate devices on the CPU, also where an accelerator's jax plugin or libtpu is
# installed (libtpu prints start-up errors on a machine without TPUs); the TPU topology tests
# compile through libtpu all the same. scripts/accelerator_check.sh sets it to the device.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import atexit  # noqa: E402
import importlib.util  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# A persistent XLA compilation cache for the whole test run: made by the first pytest process
# (xdist's controller, or a plain run) and shared by its workers and the CLI subprocesses
# their tests start (they inherit the environment): most tests compile the same few train
# steps, and a hit skips XLA's compile. The cache is keyed by the program, the compile
# options and the versions, so a hit is the executable a fresh compile gives. A size limit
# makes JAX lock the directory (filelock) around each read and write, so that processes
# never read an entry another is still writing. A new directory every run: every
# `make test` starts cold.
if "FLAXTRAIN_TEST_XLA_CACHE" not in os.environ:
  os.environ["FLAXTRAIN_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="flaxtrain-test-xla-cache-")
  atexit.register(shutil.rmtree, os.environ["FLAXTRAIN_TEST_XLA_CACHE"], ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["FLAXTRAIN_TEST_XLA_CACHE"]
os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(16 << 30)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The longest test files first (measured in CI), the rest in their usual order: pytest-xdist
# (`--dist loadfile --no-loadscope-reorder`, the Makefile's) hands out whole files in this
# order, so no long file starts last while the other workers have run out of work.
LONGEST_FIRST = (
  "test_stream",
  "test_multiprocess",
  "test_training_options",
  "test_faults",
  "test_cli",
  "test_user_models",
  "test_benchmark",
  "test_launch",
  "test_train",
  "test_randaugment",
  "test_mix",
  "test_pretrained",
  "test_topology",
  "test_modes",
  "test_models",
  "test_accelerator_check",
  "test_real_data",
  "test_api",
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # Stable: order kept within.


def load_config(name: str):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def synthetic_split(n: int, seed: int, shape=(28, 28, 1), num_classes: int = 10):
  """Images whose brightness pattern depends on the label: learnable in a few steps."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, n).astype(np.int32)
  base = np.random.default_rng(1234).random((num_classes, *shape))  # Same in every split.
  noise = rng.random((n, *shape))
  images = (255 * (0.7 * base[labels] + 0.3 * noise)).astype(np.uint8)
  return {"image": images, "label": labels}


@pytest.fixture
def synthetic_data(monkeypatch):
  """Replaces memory.load with a small learnable dataset (2,048 train / 500 eval)."""
  return patch_synthetic(monkeypatch)


def patch_synthetic(monkeypatch):
  from flaxtrain.data import memory, prepare, sources

  def load(name, **_):
    spec = prepare.DatasetSpec(
      name=name,
      image_shape=(28, 28, 1),
      num_classes=10,
      class_names=tuple(str(i) for i in range(10)),
      train_split="train",
      eval_split="test",
      num_train=2048,
      num_eval=500,
    )
    return spec, synthetic_split(2048, 0), synthetic_split(500, 1)

  monkeypatch.setattr(memory, "load", load)
  monkeypatch.setattr(sources, "inspect", lambda config: sources.Facts((28, 28, 1), 2548))
  return load


def tiny_config(**overrides):
  c = load_config("fashion_cnn")
  c.model.features = (8, 16)
  c.model.dense = (32,)
  c.batch_size = 64
  c.eval_batch_size = 128
  c.num_epochs = 2
  c.log_every_steps = 8
  c.optimizer.learning_rate = 1e-2
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


@pytest.fixture(scope="session")
def real_data_dir(tmp_path_factory):
  """A TFDS data dir with the real Fashion-MNIST prepared (offline, from Debian's copy)."""
  from flaxtrain.data import prepare

  if not os.path.isdir(prepare.SYSTEM_COPIES["fashion_mnist"]) and not os.environ.get(
    "TFDS_DATA_DIR"
  ):
    pytest.skip("needs Debian's dataset-fashion-mnist (CI installs it) or a TFDS_DATA_DIR")
  data_dir = os.environ.get("TFDS_DATA_DIR") or str(tmp_path_factory.mktemp("tfds"))
  prepare.prepare("fashion_mnist", data_dir=data_dir)
  return data_dir


TINY_FLAGS = [
  "--config.model.features=(8, 16)",
  "--config.model.dense=(32,)",
  "--config.log_every_steps=10",
]


def make_image_dataset(
  data_dir,
  name: str,
  num_train: int,
  num_eval: int,
  *,
  sizes=(24, 72),
  shape=None,
  encoding="jpeg",
  corrupt=(),
  file_format="array_record",
  channels: int = 3,
):
  """Writes a learnable image dataset as a prepared TFDS dataset under `data_dir`.

  Images are `synthetic_split` patterns scaled to random sizes in `sizes` (or to the fixed
  `shape`), encoded as JPEG or PNG; train record ids in `corrupt` hold undecodable bytes.
  """
  import io

  import cv2
  import tensorflow_datasets as tfds

  def examples(n, seed, bad=()):
    rng = np.random.default_rng(seed + 100)
    split = synthetic_split(n, seed, shape=(16, 16, channels))
    for i in range(n):
      h, w = shape[:2] if shape else rng.integers(sizes[0], sizes[1], 2)
      image = cv2.resize(split["image"][i], (int(w), int(h)), interpolation=cv2.INTER_NEAREST)
      image = image.reshape(int(h), int(w), channels)
      if i in bad:
        image = io.BytesIO(b"\xff\xd8\xff\xe0 not a JPEG")
      yield i, {"image": image, "label": int(split["label"][i])}

  features = tfds.features.FeaturesDict(
    {
      "image": tfds.features.Image(
        shape=(*(shape[:2] if shape else (None, None)), channels), encoding_format=encoding
      ),
      "label": tfds.features.ClassLabel(num_classes=10),
    }
  )
  return tfds.dataset_builders.store_as_tfds_dataset(
    name=name,
    version="1.0.0",
    features=features,
    data_dir=str(data_dir),
    split_datasets={
      "train": list(examples(num_train, 0, set(corrupt))),
      "test": list(examples(num_eval, 1)),
    },
    file_format=file_format,
  )
