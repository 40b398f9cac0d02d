"""`python -m flaxtrain.datasets NAME [DATA_DIR]`: prepare a dataset ahead of training."""

import sys

from absl import logging

from flaxtrain.data import prepare
from flaxtrain.errors import UserError


def main(argv) -> int:
  if len(argv) < 2:
    print("usage: python -m flaxtrain.datasets NAME [DATA_DIR]", file=sys.stderr)
    return 2
  try:
    builder = prepare.prepare(argv[1], data_dir=argv[2] if len(argv) > 2 else None)
  except UserError as e:
    print(f"flaxtrain: error: {e}", file=sys.stderr)
    return 1
  print(f"{builder.name} is ready in {builder.data_dir}")
  return 0


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)
  sys.exit(main(sys.argv))
