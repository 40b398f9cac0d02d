"""`python -m flaxtrain.datasets NAME [DATA_DIR] [--manual_dir=DIR] [--format=FORMAT]`: prepare a
dataset ahead of training.

--format=auto (the default): ArrayRecord only for datasets whose images vary in size (they
can only be streamed: ImageNet, Imagenette), both formats otherwise. --format=both leaves
TFRecord files, which the in-memory source reads, and ArrayRecord files, which streaming
reads, converted in place from the TFRecord ones. --format=array_record or tfrecord makes
only what one source needs; a dataset already prepared in the other format is converted in
place, and keeps both. With TFRecord files, the splits are also decoded once and kept
beside them (flaxtrain-decoded/), when they fit the in-memory source's memory rule: the
first training run then starts as fast as later ones.
"""

import argparse
import sys

from absl import logging

from flaxtrain.data import memory, prepare, sources
from flaxtrain.errors import UserError

USAGE = (
  "python -m flaxtrain.datasets NAME [DATA_DIR] [--manual_dir=DIR] "
  "[--format=auto|both|array_record|tfrecord]"
)
FORMATS = ("auto", "both", "array_record", "tfrecord")


def main(argv) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m flaxtrain.datasets", usage=USAGE, description=__doc__.split("\n\n", 1)[1]
  )
  parser.add_argument("name", metavar="NAME", help="a TFDS name, e.g. fashion_mnist")
  parser.add_argument(
    "data_dir",
    metavar="DATA_DIR",
    nargs="?",
    help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)",
  )
  parser.add_argument(
    "--manual_dir", metavar="DIR", help="dir holding the original files, e.g. ImageNet's tars"
  )
  parser.add_argument(
    "--format", choices=FORMATS, default="auto", help="file formats to leave (default: auto)"
  )
  try:
    args = parser.parse_args(argv[1:])
  except SystemExit as e:  # Bad usage (argparse printed why) or --help.
    return e.code
  try:
    if args.format == "auto":
      shape = prepare.describe(args.name, data_dir=args.data_dir).info.features["image"].shape
      args.format = "array_record" if None in shape[:2] else "both"
    builder = prepare.prepare(
      args.name,
      data_dir=args.data_dir,
      manual_dir=args.manual_dir,
      random_access=args.format == "array_record",
    )
    if args.format in ("both", "tfrecord"):
      builder = prepare.add_format(builder, "tfrecord")  # Only if prepared for streaming.
    if args.format == "both":
      builder = prepare.add_format(builder, "array_record")
    decoded = _keep_decoded(builder) if prepare.has_format(builder, "tfrecord") else []
  except UserError as e:
    # The messages name train's flag; here the same setting is --manual_dir.
    message = str(e).replace("--config.dataset.manual_dir=", "--manual_dir=")
    print(f"flaxtrain: error: {message}", file=sys.stderr)
    return 1
  formats = [f for f in ("tfrecord", "array_record") if prepare.has_format(builder, f)]
  kept = f"; decoded: {', '.join(decoded)}" if decoded else ""
  print(f"{builder.name} is ready in {builder.data_dir} ({' and '.join(formats)}{kept})")
  return 0


def _keep_decoded(builder) -> list[str]:
  """The splits kept decoded for the in-memory source (the one that reads TFRecord files):
  all of them, when they fit its memory rule (see data/sources.py)."""
  h, w, c = builder.info.features["image"].shape
  splits = sorted(builder.info.splits)
  if h is None or w is None:  # Varying sizes (--format=both asked for): streamed only.
    return []
  size = sum(builder.info.splits[s].num_examples for s in splits) * h * w * c
  if not splits or not sources.fits_in_memory(size):
    return []
  memory.keep_decoded(builder, splits)
  return splits


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)
  sys.exit(main(sys.argv))
