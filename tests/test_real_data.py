"""A short run on the real Fashion-MNIST, prepared offline from Debian's copy."""

import os

import pytest
from conftest import load_config

from flaxtrain import datasets, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  if not os.path.isdir(datasets.SYSTEM_COPIES["fashion_mnist"]) and not os.environ.get(
      "TFDS_DATA_DIR"):
    pytest.skip("needs Debian's dataset-fashion-mnist (CI installs it) or a TFDS_DATA_DIR")
  return os.environ.get("TFDS_DATA_DIR") or str(tmp_path_factory.mktemp("tfds"))


def test_short_real_run_reaches_80_percent(data_dir, tmp_path):
  c = load_config("fashion_cnn")
  c.dataset.data_dir = data_dir
  c.num_train_steps = 300  # 0.64 epoch at batch 128.
  c.log_every_steps = 100
  summary = train.train_and_evaluate(c, str(tmp_path))
  assert summary["eval_examples"] == 10_000
  assert summary["eval_accuracy"] >= 0.80, summary
