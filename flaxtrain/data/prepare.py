"""What TFDS image-classification datasets exist, and how they are made ready to read.

`prepare` makes a dataset ready in the TFDS data dir, trying in order:
  1. data already prepared there (no network);
  2. `manual_dir`, the original files, checksums verified by TFDS;
  3. a known system copy, e.g. Debian's `dataset-fashion-mnist` package;
  4. TFDS's normal download (the default for anyone with internet).

Datasets that must be downloaded by hand (ImageNet) fail before any work when their files
are in neither `manual_dir` nor TFDS's default manual dir, saying which files and where.

`prepare(..., random_access=True)` also makes ArrayRecord files, which `tfds.data_source`
reads: a new dataset is prepared as ArrayRecord only, one prepared as TFRecord only is converted
in place (both formats afterwards, as `tfds convert_format` leaves them). `has_format` tells
which readers a prepared dataset serves: `as_dataset` needs 'tfrecord', `tfds.data_source`
'array_record'. Every step leaves complete data or none: TFDS prepares in an `incomplete.*`
dir renamed when done, and the conversion renames each shard, then `dataset_info.json`, into
place only once written in full.

Debian's Fashion-MNIST files differ from the originals only in their 10-byte gzip header
(stored file name dropped, mtime changed). Rewriting the original header reproduces the
files byte for byte, so TFDS's registered sha256 checksums still hold and the stock builder
prepares the real dataset from them. Debian has no package for plain MNIST.
"""

import dataclasses
import difflib
import functools
import os
import pathlib
import shutil
import socket
import struct
import tempfile
import urllib.error
import urllib.parse

import requests
import tensorflow_datasets as tfds
from absl import logging
from tensorflow_datasets.core import dataset_info as dataset_info_lib
from tensorflow_datasets.core import file_adapters
from tensorflow_datasets.core.download import download_manager, resource

from flaxtrain import console
from flaxtrain.errors import UserError

# {dataset: {file in manual_dir: (name stored in the original gzip header, original mtime)}}.
ORIGINAL_GZIP_HEADERS = {
  "fashion_mnist": {
    "train-images-idx3-ubyte.gz": ("train-images-idx3-ubyte", 0x59A7E9DE),
    "train-labels-idx1-ubyte.gz": ("train-labels-idx1-ubyte", 0x59A7E9DE),
    "t10k-images-idx3-ubyte.gz": ("t10k-images-idx3-ubyte", 0x59A7E9F3),
    "t10k-labels-idx1-ubyte.gz": ("t10k-labels-idx1-ubyte", 0x59A7E9F3),
  },
}

# {dataset: directory where a system package installs the original files}.
SYSTEM_COPIES = {
  "fashion_mnist": "/usr/share/datasets/fashion-mnist",  # apt-get install dataset-fashion-mnist
}
_SYSTEM_PACKAGES = {"fashion_mnist": "dataset-fashion-mnist"}

# {dataset: (files its TFDS builder reads from the manual dir, where to get them)}. TFDS has
# no URL for these, so their names are only in the builders' code.
_IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
_IMAGENET_SITE = "https://image-net.org/download-images"
MANUAL_FILES = {
  "imagenet2012": (_IMAGENET_TARS, _IMAGENET_SITE),
  "imagenet2012_subset": (_IMAGENET_TARS, _IMAGENET_SITE),
  "imagenet2012_fewshot": (_IMAGENET_TARS, _IMAGENET_SITE),
  "imagenet_lt": (_IMAGENET_TARS, _IMAGENET_SITE),
  "imagenet2012_corrupted": (("ILSVRC2012_img_val.tar",), _IMAGENET_SITE),  # No train split.
}

ARRAY_RECORD, TFRECORD = tfds.core.FileFormat.ARRAY_RECORD, tfds.core.FileFormat.TFRECORD

# What a failed download looks like (TFDS uses requests, and urllib for ftp).
_NETWORK_ERRORS = (
  requests.RequestException,
  urllib.error.URLError,
  socket.gaierror,
  ConnectionError,
  TimeoutError,
  tfds.download.DownloadError,
)
_PROXY_VARS = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  name: str
  image_shape: tuple[int, int, int]  # (H, W, C) from the TFDS info, never hard-coded
  num_classes: int
  class_names: tuple[str, ...]
  train_split: str
  eval_split: str
  num_train: int
  num_eval: int


def prepare(
  name: str,
  *,
  data_dir: str | None = None,
  manual_dir: str | None = None,
  random_access: bool = False,
) -> tfds.core.DatasetBuilder:
  """Returns the builder of `name` with its data prepared in `data_dir` (see module doc).

  With `random_access`, the data has ArrayRecord files for `tfds.data_source`. Without, it
  is prepared as TFRecord if new, but may have been prepared as ArrayRecord only before: the
  caller checks `has_format(builder, 'tfrecord')` before reading with `as_dataset`.
  """
  builder = _builder(name, data_dir)
  _check_features(builder)  # Before any download: it would be wasted.
  if manual_dir is not None:  # A dir the user named must be right, even if unused now.
    _check_manual_dir(builder, manual_dir)
  if _is_prepared(builder):
    logging.info("Dataset %s: using the prepared copy in %s.", name, builder.data_dir)
    return add_format(builder, ARRAY_RECORD) if random_access else builder
  system_dir = None if manual_dir is not None else _system_copy(builder)
  if manual_dir is None and system_dir is None and builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    manual_dir = _default_manual_dir(builder)  # Fails now, not after hours, if files lack.
  if random_access:  # Only the format differs: the same sources and checks apply.
    builder = _builder(name, data_dir, file_format=ARRAY_RECORD)
  if manual_dir is not None:
    logging.info("Dataset %s: preparing from manual_dir %s.", name, manual_dir)
    _prepare_from_dir(builder, manual_dir)
  elif system_dir is not None:
    logging.info("Dataset %s: preparing from the system copy in %s.", name, system_dir)
    _prepare_from_dir(builder, system_dir)
  else:
    logging.info("Dataset %s: downloading with TFDS into %s.", name, builder.data_dir_root)
    _download_and_prepare(builder)
  return builder


def describe(name: str, *, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """The builder of `name`, checked to be image classification, without preparing anything.

  Its `info` has the features (image shape, classes) and, where TFDS knows them before
  preparation, the split sizes.
  """
  builder = _builder(name, data_dir)
  _check_features(builder)
  return builder


def has_format(builder: tfds.core.DatasetBuilder, file_format: str | tfds.core.FileFormat) -> bool:
  """Whether the prepared data of `builder` has files in `file_format`.

  'tfrecord' is what `as_dataset` reads, 'array_record' what `tfds.data_source` reads. False
  while the dataset is not prepared.
  """
  file_format = tfds.core.FileFormat.from_value(file_format)
  return _is_prepared(builder) and file_format in _formats(builder.info)


def add_format(
  builder: tfds.core.DatasetBuilder, file_format: str | tfds.core.FileFormat
) -> tfds.core.DatasetBuilder:
  """Returns the builder of the prepared dataset of `builder`, with files in `file_format` too.

  Converts in place, from TFRecord to ArrayRecord or back: afterwards `dataset_info.json`
  names TFRecord as `file_format` when there is some (what `as_dataset` reads) and the other
  format in `alternative_file_formats` (where `tfds.data_source` finds it), which is what
  `tfds convert_format` leaves. A no-op when the files are already there.
  """
  file_format = tfds.core.FileFormat.from_value(file_format)
  if has_format(builder, file_format):
    return builder
  if not _is_prepared(builder):
    raise ValueError(f"Dataset {builder.name} is not prepared in {builder.data_dir}.")
  source = builder.info.file_format
  if not os.access(builder.data_dir, os.W_OK):
    raise UserError(
      f"Dataset {builder.name} in {builder.data_dir} has no {file_format.value} "
      f"files and that directory is read-only (e.g. a gcsfuse mount): run python "
      f"-m flaxtrain.datasets {builder.name} --format={file_format.value} where "
      "it is writable, then copy it again."
    )
  logging.info(
    "Dataset %s: converting its %s files to %s in place in %s.",
    builder.name,
    source.value,
    file_format.value,
    builder.data_dir,
  )
  for split in builder.info.splits.values():
    _convert_split(builder, split, source, file_format)
  _list_format(builder.data_path, file_format)  # Last: a failure before lists nothing.
  return _reload(builder)


def restore_gzip_header(
  src: str | os.PathLike, dst: str | os.PathLike, *, original_name: str, mtime: int
) -> None:
  """Copies gzip file `src` to `dst` with the header FNAME=`original_name`, MTIME=`mtime`.

  Only the header changes: the deflate stream and the CRC32/size trailer are copied as is,
  so the content is untouched. XFL and OS are kept from `src`; any FEXTRA, FCOMMENT or FHCRC
  field is dropped. `dst` appears atomically (written next to it, then renamed).
  """
  src, dst = pathlib.Path(src), pathlib.Path(dst)
  with open(src, "rb") as f:
    xfl_os = _skip_gzip_header(f, src)
    header = (
      b"\x1f\x8b\x08"
      + bytes([_FNAME])
      + struct.pack("<I", mtime)
      + xfl_os
      + original_name.encode("latin-1")
      + b"\0"
    )  # RFC 1952: FNAME is ISO 8859-1.
    with tempfile.NamedTemporaryFile(dir=dst.parent, prefix=f".{dst.name}.", delete=False) as out:
      try:
        out.write(header)
        shutil.copyfileobj(f, out, 1 << 20)
      except BaseException:
        os.unlink(out.name)
        raise
  os.replace(out.name, dst)


# --------------------------------------------------------------------------- gzip header

_FEXTRA, _FNAME, _FCOMMENT, _FHCRC = 0x04, 0x08, 0x10, 0x02


def _skip_gzip_header(f, path) -> bytes:
  """Reads past the gzip header of `f`; returns its XFL and OS bytes."""
  fixed = f.read(10)
  if len(fixed) < 10 or fixed[:3] != b"\x1f\x8b\x08":
    raise ValueError(f"{path} is not a gzip file.")
  flags = fixed[3]
  if flags & _FEXTRA:
    (xlen,) = struct.unpack("<H", f.read(2))
    f.read(xlen)
  for flag in (_FNAME, _FCOMMENT):  # Both NUL-terminated, in this order.
    if flags & flag:
      while f.read(1) not in (b"\0", b""):
        pass
  if flags & _FHCRC:
    f.read(2)
  return fixed[8:10]


# --------------------------------------------------------------------------- preparation


def _builder(name: str, data_dir: str | None, **kwargs) -> tfds.core.DatasetBuilder:
  try:
    return tfds.builder(name, data_dir=data_dir, **kwargs)
  except tfds.core.registered.DatasetNotFoundError as e:
    # Community datasets would need the network just to list them.
    known = tfds.list_builders(with_community_datasets=False)
    close = difflib.get_close_matches(name.split(":")[0].split("/")[0], known, n=3)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise UserError(f"Unknown dataset {name!r}: {hint}tfds.list_builders() lists them all.") from e
  except (ValueError, AssertionError) as e:  # A config or version the dataset lacks.
    detail = str(e).split("\n")[0].split('": ', 1)[-1].split(". ")[0].rstrip(".")
    raise UserError(
      f"Cannot use dataset {name!r} ({detail}): fix the config or version in the name."
    ) from e


def _check_features(builder) -> None:
  """The training loop needs an `image` and a class `label`.

  Images of varying size, (None, None, C), pass: the caller decides whether it can read them
  (streaming resizes them; the in-memory source cannot stack them).
  """
  features = builder.info.features
  image = features["image"] if "image" in features else None
  label = features["label"] if "label" in features else None
  if not (isinstance(image, tfds.features.Image) and isinstance(label, tfds.features.ClassLabel)):
    raise UserError(
      f"Dataset {builder.name!r} has features {sorted(features)}, not an "
      "'image' and a class 'label': pick an image classification dataset."
    )


def _expected_files(builder) -> list[str]:
  """Names TFDS looks for in a manual_dir: the registered file names of its URLs.

  A dataset downloaded by hand reads files that TFDS has no URL for (its URLs, if any, are
  extra files it downloads itself): those of MANUAL_FILES, or none known.
  """
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    return sorted(MANUAL_FILES.get(builder.name, ((), None))[0])
  return sorted(info.filename for info in (builder.url_infos or {}).values() if info.filename)


def _default_manual_dir(builder) -> str:
  """TFDS's default manual dir, where the files of a dataset downloaded by hand must be."""
  manual_dir = builder.data_dir_root / "downloads" / "manual"
  expected = _expected_files(builder)
  if expected:
    missing = [f for f in expected if not (manual_dir / f).is_file()]
  else:  # Names unknown: TFDS itself only asks for a non-empty dir.
    missing = [] if manual_dir.is_dir() and any(manual_dir.iterdir()) else ["files"]
  if not missing:
    return os.fspath(manual_dir)
  where = MANUAL_FILES.get(builder.name, ((), None))[1] or builder.info.homepage
  if expected:
    what = f"{' and '.join(missing)} from {where}"
  else:
    first_line = builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip().splitlines()[0].strip()
    what = f"its files from {where} (TFDS says: {first_line.rstrip('.')!r})"
  raise UserError(
    f"Dataset {builder.name} must be downloaded by hand: get {what} and put them "
    f"in {manual_dir}, or in a dir named by --config.dataset.manual_dir=DIR."
  )


def _check_manual_dir(builder, manual_dir: str) -> None:
  flag = f"--config.dataset.manual_dir={manual_dir}"
  if not os.path.isdir(manual_dir) or not os.access(manual_dir, os.R_OK | os.X_OK):
    raise UserError(
      f"{flag} is not a readable directory: point it at the folder holding "
      f"the original {builder.name} files."
    )
  if missing := [
    f for f in _expected_files(builder) if not os.path.isfile(os.path.join(manual_dir, f))
  ]:
    raise UserError(
      f"{flag} lacks {', '.join(missing)}: put the original {builder.name} "
      "files there under these names."
    )


def _system_copy(builder) -> str | None:
  """The system copy of this dataset's original files, if one is installed and complete."""
  path = SYSTEM_COPIES.get(builder.name)
  expected = _expected_files(builder)
  if path and expected and all(os.path.isfile(os.path.join(path, f)) for f in expected):
    return path
  return None


def _prepare_from_dir(builder, source_dir: str) -> None:
  """Prepares from the original files in `source_dir`, restoring gzip headers if known."""
  headers = ORIGINAL_GZIP_HEADERS.get(builder.name)
  if not headers:
    _prepare_with_manual_dir(builder, source_dir, source_dir)
    return
  # Restored copies go next to TFDS's downloads (same disk; the source stays read-only).
  downloads = builder.data_dir_root / "downloads"
  downloads.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=downloads, prefix=f"{builder.name}-staging-") as stage:
    for fname in _expected_files(builder):
      src, dst = os.path.join(source_dir, fname), os.path.join(stage, fname)
      if fname in headers:
        _restore_or_fail(src, dst, headers[fname])
      else:
        os.symlink(os.path.abspath(src), dst)
    # Extracting inside the stage too: TFDS's extracted copies are only needed until prepared.
    _prepare_with_manual_dir(builder, stage, source_dir, extract_dir=os.path.join(stage, "x"))


def _restore_or_fail(src: str, dst: str, header: tuple[str, int]) -> None:
  try:
    restore_gzip_header(src, dst, original_name=header[0], mtime=header[1])
  except ValueError as e:
    raise UserError(
      f"{src} is not a gzip file: replace it with the original {os.path.basename(src)}."
    ) from e


def _prepare_with_manual_dir(
  builder, manual_dir: str, shown_dir: str, extract_dir: str | None = None
) -> None:
  config = tfds.download.DownloadConfig(manual_dir=manual_dir, extract_dir=extract_dir)
  try:
    console.import_tensorflow_quietly()  # TFDS writes the records with it.
    builder.download_and_prepare(download_config=config)
  except download_manager.NonMatchingChecksumError as e:
    bad = [i.filename for url, i in builder.url_infos.items() if url in str(e)]
    raise UserError(
      f"{', '.join(bad) or 'A file'} in {shown_dir} does not match TFDS's "
      f"registered checksum: replace it with the original download."
    ) from e


def _download_and_prepare(builder) -> None:
  """TFDS's own download; fails in seconds, not minutes of retries, when clearly offline."""
  try:
    _fail_fast_if_offline(builder)
    console.import_tensorflow_quietly()  # TFDS writes the records with it.
    builder.download_and_prepare()
  except _NETWORK_ERRORS as e:
    raise UserError(_no_data_message(builder.name)) from e


def _no_data_message(name: str) -> str:
  package = _SYSTEM_PACKAGES.get(name)
  apt = f", or `apt-get install {package}`" if package else ""
  return (
    f"Dataset {name} is not prepared and could not be downloaded: connect to the "
    f"internet for TFDS's download, or pass --config.dataset.manual_dir=DIR with the "
    f"original {name} files{apt}."
  )


def _fail_fast_if_offline(builder) -> None:
  """Raises socket.gaierror when no download host resolves and nothing is cached.

  Offline, TFDS retries each URL ten times with exponential backoff (over 3 minutes).
  A proxy may resolve names for us, so with one configured TFDS is left to try.
  """
  urls = builder.url_infos or {}
  if not urls or any(os.environ.get(v) for v in _PROXY_VARS) or _any_cached(builder):
    return
  last_error = None
  for host in {urllib.parse.urlsplit(u).hostname for u in urls}:
    try:
      socket.getaddrinfo(host, 443)
      return
    except socket.gaierror as e:
      last_error = e
  raise last_error


def _any_cached(builder) -> bool:
  """Whether TFDS would find some download already in its cache or default manual dir."""
  downloads = builder.data_dir_root / "downloads"
  for url, info in builder.url_infos.items():
    fname = resource.get_dl_fname(url, info.checksum)
    paths = [downloads / builder.name / fname, downloads / fname]  # Current and legacy layout.
    if info.filename:
      paths.append(downloads / "manual" / info.filename)
    if any(p.exists() for p in paths):
      return True
  return False


# --------------------------------------------------------------------------- file formats


def _is_prepared(builder) -> bool:
  return builder.data_path.exists() and builder.is_prepared()  # exists(): spares a warning.


def _formats(info) -> set:
  # The proto too: TFDS 4.9.10 restores `alternative_file_formats` only there (see below).
  alternatives = {
    tfds.core.FileFormat.from_value(f) for f in info.as_proto.alternative_file_formats
  }
  return {info.file_format, *info.alternative_file_formats, *alternatives}


def _convert_split(builder, split, source, target) -> None:
  """Writes each shard of `split` in `target` next to its `source` file, shard by shard.

  A shard appears only complete and checked (written to an `incomplete.*` file, then renamed):
  an interrupted conversion leaves whole shards, which the next one keeps, and at worst stray
  `incomplete.*` files after a hard kill, which no reader opens.
  """
  num_shards = len(split.shard_lengths)
  template = split.filename_template.replace(filetype_suffix=target.file_suffix)
  shards = zip(split.filepaths, split.shard_lengths, strict=True)
  for index, (path, expected) in enumerate(shards):
    out = template.sharded_filepath(shard_index=index, num_shards=num_shards)
    if out.exists():
      continue
    with tfds.core.utils.incomplete_file(out) as tmp:  # Deleted if anything raises.
      count = _copy_records(path, source, tmp, target)
      if count != expected:
        raise UserError(
          f"{path} holds {count} records, not the {expected} that "
          f"{builder.data_path}/dataset_info.json lists: delete "
          f"{builder.data_path} and prepare {builder.name} again."
        )


def _copy_records(path, source, out, target) -> int:
  """Writes the records of shard `path` to `out`; returns how many."""
  count = 0

  def records():
    nonlocal count
    for record in _read_records(path, source):
      count += 1
      yield None, record

  if target == TFRECORD:
    console.import_tensorflow_quietly()  # TFDS writes TFRecord files with it.
  file_adapters.ADAPTER_FOR_FORMAT[target].write_examples(out, records())
  return count


def _reload(builder) -> tfds.core.DatasetBuilder:
  """A new builder for the same data: a builder's info keeps the formats it first read."""
  if isinstance(builder, tfds.core.read_only_builder.ReadOnlyBuilder):  # No code to run.
    return tfds.builder_from_directory(builder.data_path)
  return type(builder)(
    data_dir=os.fspath(builder.data_dir_root),
    config=builder.builder_config,
    version=str(builder.version),
  )


def _read_records(path, file_format):
  """Yields the serialized examples of one shard, in order."""
  if file_format == TFRECORD:
    tf = console.import_tensorflow_quietly()
    # In batches: one record per step costs ~40 us of tf.data overhead, 20x the read.
    for batch in tf.data.TFRecordDataset(os.fspath(path)).batch(1024).as_numpy_iterator():
      yield from batch
  elif file_format == ARRAY_RECORD:
    from array_record.python import array_record_module

    reader = array_record_module.ArrayRecordReader(os.fspath(path))
    try:
      total = reader.num_records()
      for start in range(0, total, 1024):
        yield from reader.read(start, min(start + 1024, total))
    finally:
      reader.close()
  else:
    raise ValueError(f"Cannot convert from {file_format.value} files.")


def _list_format(data_path, file_format) -> None:
  """Adds `file_format` to `dataset_info.json`, replaced atomically (it also serves the other
  format's readers). TFRecord stays, or becomes, the main format, which `as_dataset` reads."""
  proto = dataset_info_lib.read_proto_from_builder_dir(data_path)
  formats = {proto.file_format, *proto.alternative_file_formats, file_format.value}
  main = TFRECORD.value if TFRECORD.value in formats else proto.file_format
  proto.file_format = main
  proto.alternative_file_formats[:] = sorted(formats - {main})
  info_path = dataset_info_lib.dataset_info_path(data_path)
  with tfds.core.utils.incomplete_file(info_path) as tmp:
    tmp.write_text(dataset_info_lib.get_dataset_info_json(proto))


def _restore_alternative_formats(read_from_directory):
  """TFDS 4.9.10 reads `alternative_file_formats` from dataset_info.json into the info's proto
  but not into `info.alternative_file_formats`, the list `tfds.data_source` looks in: without
  this, a dataset converted in place (TFRecord + ArrayRecord) fails there with 'Random access
  data source for file format TFRECORD is not supported'."""

  @functools.wraps(read_from_directory)
  def wrapper(self, *args, **kwargs):
    read_from_directory(self, *args, **kwargs)
    listed = self.alternative_file_formats  # TFDS's own list, not a copy.
    for value in self.as_proto.alternative_file_formats:
      if tfds.core.FileFormat.from_value(value) not in listed:
        listed.append(tfds.core.FileFormat.from_value(value))

  wrapper.flaxtrain_restores_alternative_formats = True
  return wrapper


# Applied on import, so that `tfds.data_source` works wherever flaxtrain reads data.
if not hasattr(tfds.core.DatasetInfo.read_from_directory, "flaxtrain_restores_alternative_formats"):
  tfds.core.DatasetInfo.read_from_directory = _restore_alternative_formats(
    tfds.core.DatasetInfo.read_from_directory
  )


# --------------------------------------------------------------------------- reading


def check_split(builder, split: str) -> None:
  splits = builder.info.splits
  if not splits:  # Unknown until prepared (e.g. under tfds.testing.mock_data): TFDS decides.
    return
  try:
    num_examples = splits[split].num_examples  # Parses slices too, e.g. 'train[:90%]'.
  except (KeyError, ValueError) as e:
    raise UserError(
      f"Dataset {builder.name} has no split {split!r}: use one of "
      f"{', '.join(sorted(splits))} (slices like 'train[:90%]' work too)."
    ) from e
  if not num_examples:
    raise UserError(f"Split {split!r} of dataset {builder.name} is empty: pick a larger one.")
