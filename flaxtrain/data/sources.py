"""config -> (DatasetSpec, source): the one place that picks a data source.

A source has `plan` (the index plan), `description`, `train_batches(start, n, chunk)`,
`eval_batches()` (chunks of masked eval batches), `eval_examples(n)`, `input_wait_s`
(seconds the loop waited for train batches; None where it never waits),
`raise_if_failed()` (called by every process at the same steps: an input failure on one
process stops all of them) and `close()`.

`dataset.source`: 'memory' decodes both splits into host memory (fixed-size images);
'stream' reads records by random access and decodes them in Grain workers; 'auto'
streams when the images vary in size, when they must be resized or randomly cropped on
the host, or when the decoded splits would take more than a quarter of this machine's
memory.
"""

import dataclasses
import os

import ml_collections
from absl import logging

from flaxtrain import parallel
from flaxtrain.data import augment, memory, prepare, preprocess
from flaxtrain.errors import UserError

SOURCES = ("auto", "memory", "stream")
DEFAULT_VARYING_SIZE = 224  # Output side for datasets whose images vary in size.
MEMORY_FRACTION = 0.25  # 'auto' streams when decoded splits exceed this share of RAM.


@dataclasses.dataclass(frozen=True)
class Facts:
  """What the choice of source needs to know about a dataset, from its TFDS info."""

  image_shape: tuple  # (H, W, C); None where the images vary (C: channels not fixed).
  num_examples: int  # Train plus eval examples; 0 where unknown (e.g. mocked data).

  @property
  def varies(self) -> bool:
    return None in self.image_shape

  @property
  def channels(self) -> int:
    return self.image_shape[2] or 3  # Decoded as RGB when the dataset does not say.


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the data fields that can be checked before any data is touched."""
  ds, aug = config.dataset, config.augment
  if ds.source not in SOURCES:
    raise UserError(f"dataset.source must be one of {', '.join(SOURCES)}, got {ds.source!r}.")
  memory.on_device(ds.on_device, 0)  # A bad value fails here, before the data loads.
  preprocess.check_sizes(
    ds.image_size, aug.crop_area_range, aug.crop_aspect_range, ds.eval_crop_fraction
  )
  from flaxtrain.data import stream  # Grain is imported only where it is used.

  stream.check_workers(ds.workers, ds.threads, ds.prefetch)
  for key in ("mean", "std"):
    value = ds[key]
    if value is not None and (len(value) not in (1, 3) or (key == "std" and min(value) <= 0)):
      raise UserError(
        f"dataset.{key} must be None or 1 or 3 numbers in pixel units (0-255)"
        f"{', all positive' if key == 'std' else ''}, got {value!r}."
      )
  if (ds.mean is None) != (ds.std is None):
    raise UserError(
      "dataset.mean and dataset.std go together: set both, or neither for pixels scaled to [0, 1]."
    )
  if ds.mean is not None and config.task.name == "reconstruction":
    raise UserError(
      "The reconstruction task learns to output the pixels in [0, 1]: unset "
      "dataset.mean and dataset.std."
    )


def _check_normalization(ds, channels: int) -> None:
  for key in ("mean", "std"):
    if ds[key] is not None and len(ds[key]) not in (1, channels):
      raise UserError(
        f"dataset.{key} has {len(ds[key])} values but {ds.name}'s images have "
        f"{channels} channel(s): give 1 or {channels}."
      )


def inspect(config: ml_collections.ConfigDict) -> Facts:
  """The dataset's image shape and size from its TFDS info, before preparing anything:
  a dataset that will be streamed is then prepared as ArrayRecord directly."""
  ds = config.dataset
  builder = prepare.describe(ds.name, data_dir=ds.data_dir)
  splits = builder.info.splits
  try:
    num = sum(splits[s].num_examples for s in (ds.train_split, ds.eval_split)) if splits else 0
  except (KeyError, ValueError):  # A bad split name: the source's own check says so.
    num = 0
  return Facts(image_shape=tuple(builder.info.features["image"].shape), num_examples=num)


def choose(config: ml_collections.ConfigDict, facts: Facts) -> str:
  """'memory' or 'stream' for this config and dataset (see the module doc)."""
  ds, aug = config.dataset, config.augment
  h, w, _ = facts.image_shape
  resized = ds.image_size is not None and (facts.varies or (h, w) != (ds.image_size,) * 2)
  if ds.source == "memory":
    if facts.varies:
      raise UserError(
        f"Dataset {ds.name!r} has images of varying size {facts.image_shape}, "
        "which cannot be held as one array in memory: set "
        "--config.dataset.source=stream (or auto)."
      )
    if resized or aug.random_resized_crop:
      raise UserError(
        "dataset.image_size and augment.random_resized_crop are done on the "
        "host while streaming: set --config.dataset.source=stream (or auto)."
      )
    return "memory"
  if ds.source == "stream":
    return "stream"
  if facts.varies or resized or aug.random_resized_crop:
    return "stream"
  decoded = facts.num_examples * h * w * facts.channels
  if not fits_in_memory(decoded):
    logging.info("Dataset %s decodes to %.1f GB: streaming it.", ds.name, decoded / 1e9)
    return "stream"
  return "memory"


def fits_in_memory(decoded_bytes: int) -> bool:
  """The in-memory rule: decoded splits up to MEMORY_FRACTION of physical memory."""
  return decoded_bytes <= MEMORY_FRACTION * _physical_memory()


def _physical_memory() -> int:
  try:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return 1 << 34


def prepare_data(config: ml_collections.ConfigDict) -> None:
  """Makes the dataset ready for the source this config will use (ArrayRecord to stream)."""
  ds = config.dataset
  if choose(config, inspect(config)) == "stream":
    prepare.prepare(ds.name, data_dir=ds.data_dir, manual_dir=ds.manual_dir, random_access=True)


def make(config: ml_collections.ConfigDict, par: parallel.DataParallel):
  """The dataset's spec and its source; the config is validated (`validate`) already."""
  facts = inspect(config)
  _check_normalization(config.dataset, facts.channels)
  kind = choose(config, facts)
  if kind == "stream":
    return _stream(config, par)
  ds = config.dataset
  spec, train, evald = memory.load(
    ds.name,
    data_dir=ds.data_dir,
    manual_dir=ds.manual_dir,
    train_split=ds.train_split,
    eval_split=ds.eval_split,
  )
  augment.validate(config.augment, spec.image_shape)
  source = memory.MemorySource(
    train,
    evald,
    par=par,
    seed=config.seed,
    batch_size=config.batch_size,
    eval_batch_size=config.eval_batch_size,
    on_device=ds.on_device,
  )
  return spec, source


def transforms(image_shape, config: ml_collections.ConfigDict):
  """(model input shape, train Transform, eval Transform) for a dataset's TFDS image shape.

  Pure: no data is read. Fixed-size images are kept as they are unless a size or random
  crops are asked for; varying sizes default to DEFAULT_VARYING_SIZE. Centre crops of
  eval_crop_fraction are for images of varying size (ImageNet's 224 of 256); fixed-size
  images, and training without random crops, are only resized.
  """
  ds, aug = config.dataset, config.augment
  h, w, c = image_shape
  c = c or 3
  if c not in (1, 3):
    raise UserError(
      f"Dataset {ds.name!r} has {c}-channel images: streaming decodes 1 "
      "(grayscale) or 3 (RGB) channels."
    )
  varies = h is None or w is None
  size = ds.image_size or (DEFAULT_VARYING_SIZE if varies else None)
  if size is None and aug.random_resized_crop:
    if h != w:
      raise UserError(
        f"augment.random_resized_crop makes square crops, and {ds.name}'s "
        f"images are {h}x{w}: set --config.dataset.image_size."
      )
    size = h
  as_stored = size is None or (h, w) == (size, size)
  common = dict(
    size=None if as_stored else size,
    channels=c,
    area_range=tuple(aug.crop_area_range),
    aspect_range=tuple(aug.crop_aspect_range),
  )
  eval_t = preprocess.Transform(
    train=False, **common, crop_fraction=ds.eval_crop_fraction if varies else 1.0
  )
  if aug.random_resized_crop:
    common["size"] = size  # Crops are resized even when the images have that size.
  train_t = preprocess.Transform(
    train=True, random_resized_crop=aug.random_resized_crop, crop_fraction=1.0, **common
  )
  return ((h, w, c) if size is None else (size, size, c)), train_t, eval_t


def _stream(config: ml_collections.ConfigDict, par: parallel.DataParallel):
  import tensorflow_datasets as tfds

  from flaxtrain.data import stream

  ds = config.dataset
  builder = prepare.prepare(
    ds.name, data_dir=ds.data_dir, manual_dir=ds.manual_dir, random_access=True
  )
  for split in (ds.train_split, ds.eval_split):
    prepare.check_split(builder, split)
  shape, train_t, eval_t = transforms(builder.info.features["image"].shape, config)
  augment.validate(config.augment, shape)

  def records(split):
    return builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})

  train_records, eval_records = records(ds.train_split), records(ds.eval_split)
  label = builder.info.features["label"]
  spec = prepare.DatasetSpec(
    name=ds.name,
    image_shape=shape,
    num_classes=label.num_classes,
    class_names=tuple(label.names),
    train_split=ds.train_split,
    eval_split=ds.eval_split,
    num_train=len(train_records),
    num_eval=len(eval_records),
  )
  source = stream.StreamSource(
    train_records,
    eval_records,
    par=par,
    image_shape=shape,
    seed=config.seed,
    batch_size=config.batch_size,
    eval_batch_size=config.eval_batch_size,
    train_transform=train_t,
    eval_transform=eval_t,
    train_split=ds.train_split,
    eval_split=ds.eval_split,
    workers=ds.workers,
    threads=ds.threads,
    prefetch=ds.prefetch,
  )
  return spec, source
