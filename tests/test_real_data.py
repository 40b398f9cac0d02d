"""A short run on the real Fashion-MNIST, prepared offline from Debian's copy."""

import pytest
from conftest import load_config

from flaxtrain import loop

pytestmark = pytest.mark.slow


def test_short_real_run_reaches_80_percent(real_data_dir, tmp_path):
  c = load_config("fashion_cnn")
  c.dataset.data_dir = real_data_dir
  c.num_train_steps = 300  # 0.64 epoch at batch 128.
  c.log_every_steps = 100
  summary = loop.train_and_evaluate(c, str(tmp_path))
  assert summary["eval_examples"] == 10_000
  assert summary["eval_accuracy"] >= 0.80, summary
