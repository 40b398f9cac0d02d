"""Runs the flaxtrain CLI on TFDS's mock data: `python tests/mock_cli.py NUM_EXAMPLES FLAGS...`.

Stands in for a machine that has the data: TFDS's `mock_data` makes preparation a no-op
and serves random records (images of random sizes), and the check for hand-downloaded
files (ImageNet's tars) is told they are there.
"""

import sys

if __name__ == "__main__":
  import tensorflow_datasets as tfds

  from flaxtrain import main
  from flaxtrain.data import prepare

  prepare._default_manual_dir = lambda builder: "/nonexistent-manual-dir"
  prepare._fail_fast_if_offline = lambda builder: None
  num = int(sys.argv.pop(1))
  with tfds.testing.mock_data(num_examples=num):
    main.run()
