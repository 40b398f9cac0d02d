"""Tests for flaxtrain.data.prepare, memory.load and the flaxtrain.datasets CLI: gzip header
restoration, preparation paths, file formats (TFRecord, ArrayRecord), user errors."""

import gzip
import hashlib
import os
import shutil
import socket

import numpy as np
import pytest
import requests
import tensorflow_datasets as tfds

from flaxtrain import datasets
from flaxtrain.data import memory, prepare
from flaxtrain.errors import UserError

DEBIAN_DIR = prepare.SYSTEM_COPIES["fashion_mnist"]
FASHION_FILES = sorted(prepare.ORIGINAL_GZIP_HEADERS["fashion_mnist"])
needs_debian_copy = pytest.mark.skipif(
  not os.path.isdir(DEBIAN_DIR),
  reason=f"{DEBIAN_DIR} absent: apt-get install dataset-fashion-mnist",
)


class FlaxtrainTinyImages(tfds.core.GeneratorBasedBuilder):
  """A registered dataset that prepares offline in milliseconds (3 channels, 2 classes)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(4, 5, 3)),
          "label": tfds.features.ClassLabel(names=["cat", "dog"]),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(6), "test": self._generate_examples(4)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"image": np.full((4, 5, 3), i, np.uint8), "label": i % 2}


class FlaxtrainTinyManual(FlaxtrainTinyImages):
  """Like FlaxtrainTinyImages, but its files must be downloaded by hand."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put tiny.zip from example.org in manual_dir.
  Then run again.
  """

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self, homepage="https://example.org/tiny", features=super()._info().features
    )


TINY = "flaxtrain_tiny_images"


def sha256(path) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def registered_sha256(name: str) -> dict[str, str]:
  """{file name: sha256} from TFDS's checksums file for `name`."""
  return {i.filename: i.checksum for i in tfds.builder_cls(name).url_infos.values()}


def assert_one_sentence(err: pytest.ExceptionInfo, *fragments: str) -> str:
  msg = str(err.value)
  assert "\n" not in msg and msg.endswith("."), msg
  for fragment in fragments:
    assert fragment in msg, msg
  return msg


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
  """A proxy switches off the fail-fast offline check; tests must not depend on the host's."""
  for var in prepare._PROXY_VARS:
    monkeypatch.delenv(var, raising=False)


@pytest.fixture
def offline(monkeypatch):
  """Any attempt to resolve a host name fails, as on a machine without network."""

  def no_dns(*args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

  monkeypatch.setattr(socket, "getaddrinfo", no_dns)


# ----------------------------------------------------------------------- gzip header


@needs_debian_copy
@pytest.mark.parametrize("fname", FASHION_FILES)
def test_restore_gzip_header_reproduces_tfds_checksum(tmp_path, fname):
  original_name, mtime = prepare.ORIGINAL_GZIP_HEADERS["fashion_mnist"][fname]
  src, dst = os.path.join(DEBIAN_DIR, fname), tmp_path / fname
  assert sha256(src) != registered_sha256("fashion_mnist")[fname]  # Debian's header differs.
  prepare.restore_gzip_header(src, dst, original_name=original_name, mtime=mtime)
  assert sha256(dst) == registered_sha256("fashion_mnist")[fname]
  assert os.listdir(tmp_path) == [fname]  # No temporary file left behind.


@needs_debian_copy
def test_restore_gzip_header_keeps_content_and_is_idempotent(tmp_path):
  fname = "t10k-labels-idx1-ubyte.gz"
  original_name, mtime = prepare.ORIGINAL_GZIP_HEADERS["fashion_mnist"][fname]
  once, twice = tmp_path / "once.gz", tmp_path / "twice.gz"
  prepare.restore_gzip_header(
    os.path.join(DEBIAN_DIR, fname), once, original_name=original_name, mtime=mtime
  )
  prepare.restore_gzip_header(once, twice, original_name=original_name, mtime=mtime)
  assert once.read_bytes() == twice.read_bytes()  # An original file is copied unchanged.
  with gzip.open(os.path.join(DEBIAN_DIR, fname)) as a, gzip.open(once) as b:
    assert a.read() == b.read()


def test_restore_gzip_header_handles_all_optional_fields(tmp_path):
  # FLG = FHCRC | FEXTRA | FNAME | FCOMMENT, then the fields in RFC 1952 order.
  body = gzip.compress(b"payload", mtime=0)[10:]
  src = tmp_path / "src.gz"
  src.write_bytes(
    b"\x1f\x8b\x08\x1e\0\0\0\0\x02\x03" + b"\x03\0abc" + b"old\0" + b"note\0" + b"\0\0" + body
  )
  prepare.restore_gzip_header(src, tmp_path / "dst.gz", original_name="new", mtime=7)
  assert (tmp_path / "dst.gz").read_bytes() == (b"\x1f\x8b\x08\x08\x07\0\0\0\x02\x03new\0" + body)
  assert gzip.decompress((tmp_path / "dst.gz").read_bytes()) == b"payload"


def test_restore_gzip_header_rejects_non_gzip(tmp_path):
  (tmp_path / "a.gz").write_bytes(b"not a gzip file")
  with pytest.raises(ValueError, match="not a gzip file"):
    prepare.restore_gzip_header(tmp_path / "a.gz", tmp_path / "b.gz", original_name="a", mtime=0)
  assert not (tmp_path / "b.gz").exists()


# ----------------------------------------------------------------------- loading


@pytest.fixture(scope="module")
def fashion_data_dir(real_data_dir):
  """fashion_mnist prepared offline from the Debian copy: the session's TFDS data dir (CI's
  `make data` prepares it through the same code), loaded here with the network cut off."""
  if not os.path.isdir(DEBIAN_DIR):
    pytest.skip(f"{DEBIAN_DIR} absent: apt-get install dataset-fashion-mnist")
  data_dir = real_data_dir
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(socket, "getaddrinfo", lambda *a, **k: pytest.fail("used the network"))
    loaded = memory.load("fashion_mnist", data_dir=data_dir, manual_dir=None)
  return data_dir, loaded


def test_load_fashion_mnist_from_system_copy(fashion_data_dir):
  data_dir, (spec, train, eval_) = fashion_data_dir
  assert spec == prepare.DatasetSpec(
    name="fashion_mnist",
    image_shape=(28, 28, 1),
    num_classes=10,
    class_names=(
      "T-shirt/top",
      "Trouser",
      "Pullover",
      "Dress",
      "Coat",
      "Sandal",
      "Shirt",
      "Sneaker",
      "Bag",
      "Ankle boot",
    ),
    train_split="train",
    eval_split="test",
    num_train=60000,
    num_eval=10000,
  )
  assert train["image"].shape == (60000, 28, 28, 1) and train["image"].dtype == np.uint8
  assert eval_["label"].shape == (10000,) and eval_["label"].dtype == np.int32
  assert sorted(np.bincount(train["label"])) == [6000] * 10  # The real, balanced data.
  assert os.listdir(os.path.join(data_dir, "downloads")) == []  # Staging cleaned up.


def test_prepared_copy_needs_no_source(fashion_data_dir, monkeypatch):
  monkeypatch.setattr(prepare, "SYSTEM_COPIES", {})
  monkeypatch.setattr(
    tfds.core.DatasetBuilder, "download_and_prepare", lambda *a, **k: pytest.fail("prepared again")
  )
  builder = prepare.prepare("fashion_mnist", data_dir=fashion_data_dir[0])
  assert builder.is_prepared()
  # A manual_dir the user names is still checked, even though it would not be needed.
  with pytest.raises(UserError, match="manual_dir=/nonexistent is not a readable directory"):
    prepare.prepare("fashion_mnist", data_dir=fashion_data_dir[0], manual_dir="/nonexistent")


def test_load_mnist_on_mock_data(tmp_path, monkeypatch):
  # mock_data makes download_and_prepare a no-op; stand in for a machine with internet.
  monkeypatch.setattr(prepare, "_fail_fast_if_offline", lambda builder: None)
  with tfds.testing.mock_data(num_examples=7):
    spec, train, eval_ = memory.load("mnist", data_dir=str(tmp_path))
  assert spec == prepare.DatasetSpec(
    name="mnist",
    image_shape=(28, 28, 1),
    num_classes=10,
    class_names=tuple(str(i) for i in range(10)),
    train_split="train",
    eval_split="test",
    num_train=7,
    num_eval=7,
  )
  for split in (train, eval_):
    assert split["image"].shape == (7, 28, 28, 1) and split["image"].dtype == np.uint8
    assert split["label"].shape == (7,) and split["label"].dtype == np.int32


def test_load_takes_shapes_classes_and_slices_from_tfds(tmp_path):
  spec, train, eval_ = memory.load(
    "flaxtrain_tiny_images", data_dir=str(tmp_path), train_split="train[:50%]"
  )
  assert (spec.image_shape, spec.num_classes, spec.class_names) == ((4, 5, 3), 2, ("cat", "dog"))
  assert (spec.num_train, spec.num_eval) == (3, 4)
  assert train["image"].shape == (3, 4, 5, 3) and eval_["label"].dtype == np.int32


# ----------------------------------------------------------------------- user errors


def test_unknown_dataset_suggests_close_match():
  with pytest.raises(UserError) as err:
    memory.load("fashon_mnist")
  assert_one_sentence(err, "'fashon_mnist'", "fashion_mnist", "tfds.list_builders()")
  assert err.value.__cause__ is not None


def test_dataset_without_image_and_label():
  with pytest.raises(UserError) as err:
    prepare.prepare("imdb_reviews")  # 'text' and 'label': fails before any download.
  assert_one_sentence(err, "imdb_reviews", "'image'", "image classification")


def test_dataset_with_varying_image_size_is_not_refused(tmp_path, offline):
  builder = tfds.builder("cats_vs_dogs", data_dir=str(tmp_path))
  assert None in builder.info.features["image"].shape
  prepare._check_features(builder)  # Does not raise: the caller decides.
  with pytest.raises(UserError) as err:  # Refused later only for want of the network.
    prepare.prepare("cats_vs_dogs", data_dir=str(tmp_path))
  assert_one_sentence(err, "could not be downloaded")


@pytest.mark.parametrize("name", ["mnist/nope", "mnist:9.9.9"])
def test_missing_config_or_version(name):
  with pytest.raises(UserError) as err:
    prepare.prepare(name)
  assert_one_sentence(err, repr(name), "config or version")
  assert err.value.__cause__ is not None


def test_missing_manual_dir(tmp_path):
  with pytest.raises(UserError) as err:
    memory.load("fashion_mnist", data_dir=str(tmp_path), manual_dir=str(tmp_path / "nope"))
  assert_one_sentence(err, f"--config.dataset.manual_dir={tmp_path / 'nope'}", "directory")


def test_manual_dir_missing_files_names_them(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "train-images-idx3-ubyte.gz").write_bytes(b"")
  with pytest.raises(UserError) as err:
    memory.load("fashion_mnist", data_dir=str(tmp_path / "data"), manual_dir=str(manual))
  msg = assert_one_sentence(
    err, "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte.gz"
  )
  assert "train-images" not in msg


def test_manual_dir_with_wrong_files_fails_checksum(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  for fname in FASHION_FILES:
    (manual / fname).write_bytes(gzip.compress(b"not the dataset"))
  with pytest.raises(UserError) as err:
    memory.load("fashion_mnist", data_dir=str(tmp_path / "data"), manual_dir=str(manual))
  msg = assert_one_sentence(err, "checksum", str(manual))
  assert any(f in msg for f in FASHION_FILES), msg
  assert type(err.value.__cause__).__name__ == "NonMatchingChecksumError"
  assert [p.name for p in manual.iterdir()] and all(  # The source dir is left untouched.
    gzip.decompress(p.read_bytes()) == b"not the dataset" for p in manual.iterdir()
  )


def test_manual_dir_with_non_gzip_file(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  for fname in FASHION_FILES:
    (manual / fname).write_bytes(b"html error page")
  with pytest.raises(UserError) as err:
    memory.load("fashion_mnist", data_dir=str(tmp_path / "data"), manual_dir=str(manual))
  assert_one_sentence(err, "is not a gzip file", "original")


def test_bad_split_lists_valid_ones(tmp_path):
  with pytest.raises(UserError) as err:
    memory.load("flaxtrain_tiny_images", data_dir=str(tmp_path), eval_split="validation")
  assert_one_sentence(err, "'validation'", "test, train")


def test_empty_split(tmp_path):
  with pytest.raises(UserError) as err:
    memory.load("flaxtrain_tiny_images", data_dir=str(tmp_path), train_split="train[:0]")
  assert_one_sentence(err, "'train[:0]'", "empty")


def test_offline_without_copy_when_download_fails(tmp_path, monkeypatch):
  def fail_download(*args, **kwargs):
    raise requests.ConnectionError("no network")

  monkeypatch.setattr(prepare, "_fail_fast_if_offline", lambda builder: None)
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail_download)
  with pytest.raises(UserError) as err:
    memory.load("mnist", data_dir=str(tmp_path))
  msg = assert_one_sentence(err, "internet", "--config.dataset.manual_dir=DIR")
  assert "apt-get" not in msg  # Debian packages fashion_mnist only.
  assert isinstance(err.value.__cause__, requests.ConnectionError)


def test_offline_fails_fast_and_names_debian_package(tmp_path, monkeypatch, offline):
  monkeypatch.setattr(prepare, "SYSTEM_COPIES", {})  # As if the package were not installed.
  monkeypatch.setattr(
    tfds.core.DatasetBuilder,
    "download_and_prepare",
    lambda *a, **k: pytest.fail("waited for TFDS's retries"),
  )
  with pytest.raises(UserError) as err:
    memory.load("fashion_mnist", data_dir=str(tmp_path))
  assert_one_sentence(
    err, "internet", "--config.dataset.manual_dir=DIR", "apt-get install dataset-fashion-mnist"
  )
  assert isinstance(err.value.__cause__, socket.gaierror)


def test_offline_check_defers_to_tfds_cache(tmp_path, monkeypatch, offline):
  # A file already in TFDS's default manual dir needs no network: let TFDS use it.
  manual = tmp_path / "downloads" / "manual"
  manual.mkdir(parents=True)
  shutil.copy(__file__, manual / "train-labels-idx1-ubyte.gz")
  builder = tfds.builder("mnist", data_dir=str(tmp_path))
  prepare._fail_fast_if_offline(builder)  # Does not raise.


def test_manual_dataset_fails_fast_naming_its_files(tmp_path, monkeypatch, offline):
  monkeypatch.setattr(
    tfds.core.DatasetBuilder,
    "download_and_prepare",
    lambda *a, **k: pytest.fail("started preparing"),
  )
  with pytest.raises(UserError) as err:
    prepare.prepare("imagenet2012", data_dir=str(tmp_path))
  assert_one_sentence(
    err,
    "by hand",
    "ILSVRC2012_img_train.tar",
    "ILSVRC2012_img_val.tar",
    "image-net.org",
    str(tmp_path / "downloads" / "manual"),
    "--config.dataset.manual_dir=DIR",
  )
  assert not (tmp_path / "imagenet2012").exists()


def test_manual_dataset_names_only_missing_files(tmp_path, offline):
  manual = tmp_path / "downloads" / "manual"
  manual.mkdir(parents=True)
  (manual / "ILSVRC2012_img_val.tar").write_bytes(b"")
  with pytest.raises(UserError) as err:
    prepare.prepare("imagenet2012", data_dir=str(tmp_path), random_access=True)
  msg = assert_one_sentence(err, "ILSVRC2012_img_train.tar")
  assert "img_val" not in msg


def test_manual_dataset_with_manual_dir_lacking_files(tmp_path):
  with pytest.raises(UserError) as err:
    prepare.prepare("imagenet2012", data_dir=str(tmp_path / "data"), manual_dir=str(tmp_path))
  assert_one_sentence(
    err,
    f"--config.dataset.manual_dir={tmp_path} lacks",
    "ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar",
  )


def test_manual_dataset_of_unknown_files_quotes_tfds(tmp_path, offline):
  with pytest.raises(UserError) as err:
    prepare.prepare("flaxtrain_tiny_manual", data_dir=str(tmp_path))
  assert_one_sentence(
    err,
    "by hand",
    "https://example.org/tiny",
    "'Put tiny.zip from example.org in manual_dir'",
    str(tmp_path / "downloads" / "manual"),
  )


def test_manual_dataset_prepares_from_default_manual_dir(tmp_path, offline):
  manual = tmp_path / "downloads" / "manual"
  manual.mkdir(parents=True)
  (manual / "tiny.zip").write_bytes(b"")  # This builder reads nothing: any file will do.
  builder = prepare.prepare("flaxtrain_tiny_manual", data_dir=str(tmp_path))
  assert prepare.has_format(builder, "tfrecord")


# ----------------------------------------------------------------------- file formats


def read_both_ways(data_dir) -> tuple[list[int], list[int]]:
  """The train split's pixel values through as_dataset (TFRecord) and tfds.data_source."""
  builder = tfds.builder(TINY, data_dir=data_dir)
  via_tf = [int(x["image"][0, 0, 0]) for x in tfds.as_numpy(builder.as_dataset(split="train"))]
  source = tfds.data_source(
    TINY,
    split="train",
    data_dir=data_dir,
    download=False,
    decoders={"image": tfds.decode.SkipDecoding()},
  )
  via_source = [int(decode_png(source[i]["image"])[0, 0, 0]) for i in range(len(source))]
  return via_tf, via_source


def decode_png(png: bytes) -> np.ndarray:
  return tfds.features.Image(shape=(4, 5, 3)).decode_example_np(png)


def tiny_files(builder) -> list[str]:
  return sorted(p.name for p in builder.data_path.iterdir())


def test_tfrecord_dataset_is_converted_in_place(tmp_path):
  data_dir = str(tmp_path)
  builder = prepare.prepare(TINY, data_dir=data_dir)
  assert prepare.has_format(builder, "tfrecord")
  assert not prepare.has_format(builder, "array_record")
  builder = prepare.prepare(TINY, data_dir=data_dir, random_access=True)
  assert prepare.has_format(builder, "tfrecord") and prepare.has_format(builder, "array_record")
  assert [f for f in tiny_files(builder) if "-train." in f] == [
    f"{TINY}-train.array_record-00000-of-00001",
    f"{TINY}-train.tfrecord-00000-of-00001",
  ]
  via_tf, via_source = read_both_ways(data_dir)
  assert sorted(via_tf) == list(range(6)) and via_source == via_tf  # Same records, same order.
  # Both readers also through the builders TFDS makes anew, as the training code does.
  assert len(list(tfds.builder(TINY, data_dir=data_dir).as_dataset(split="test"))) == 4


def test_converting_twice_is_a_no_op(tmp_path, monkeypatch):
  prepare.prepare(TINY, data_dir=str(tmp_path), random_access=True)
  builder = prepare.prepare(TINY, data_dir=str(tmp_path))
  builder = prepare.add_format(builder, "tfrecord")  # Prepared as ArrayRecord: converted.
  before = {p.name: os.stat(p).st_mtime_ns for p in builder.data_path.iterdir()}
  monkeypatch.setattr(prepare, "_convert_split", lambda *a: pytest.fail("converted again"))
  again = prepare.prepare(TINY, data_dir=str(tmp_path), random_access=True)
  assert prepare.add_format(again, "tfrecord") is again
  assert {p.name: os.stat(p).st_mtime_ns for p in again.data_path.iterdir()} == before


def test_new_dataset_for_random_access_is_array_record_only(tmp_path):
  builder = prepare.prepare(TINY, data_dir=str(tmp_path), random_access=True)
  assert prepare.has_format(builder, "array_record")
  assert not prepare.has_format(builder, "tfrecord")
  assert not any("tfrecord" in f for f in tiny_files(builder))
  # A caller without random access gets the same data, and has_format says how to read it.
  builder = prepare.prepare(TINY, data_dir=str(tmp_path))
  assert not prepare.has_format(builder, "tfrecord")
  assert len(tfds.data_source(TINY, split="test", data_dir=str(tmp_path), download=False)) == 4


def test_array_record_dataset_converted_back_serves_both_readers(tmp_path):
  prepare.prepare(TINY, data_dir=str(tmp_path), random_access=True)
  builder = prepare.add_format(prepare.prepare(TINY, data_dir=str(tmp_path)), "tfrecord")
  assert builder.info.file_format == tfds.core.FileFormat.TFRECORD  # What as_dataset reads.
  via_tf, via_source = read_both_ways(str(tmp_path))
  assert sorted(via_tf) == list(range(6)) and via_source == via_tf


def test_failed_conversion_leaves_no_partial_data(tmp_path, monkeypatch):
  builder = prepare.prepare(TINY, data_dir=str(tmp_path))
  before = tiny_files(builder)
  info_before = (builder.data_path / "dataset_info.json").read_bytes()
  real_read = prepare._read_records

  def read_then_fail(path, file_format):
    if "-test." in path.name:  # The second split: the first one is converted by then.
      yield from list(real_read(path, file_format))[:2]
      raise OSError("disk full")
    yield from real_read(path, file_format)

  monkeypatch.setattr(prepare, "_read_records", read_then_fail)
  with pytest.raises(OSError, match="disk full"):
    prepare.prepare(TINY, data_dir=str(tmp_path), random_access=True)
  after = tiny_files(builder)
  assert not any("incomplete" in f or "-test.array_record" in f for f in after), after
  assert (builder.data_path / "dataset_info.json").read_bytes() == info_before
  assert not prepare.has_format(prepare.prepare(TINY, data_dir=str(tmp_path)), "array_record")
  # The next run converts what is missing, keeping the whole shard written before.
  monkeypatch.setattr(prepare, "_read_records", real_read)
  converted = set(after) - set(before)
  assert converted == {f"{TINY}-train.array_record-00000-of-00001"}
  builder = prepare.prepare(TINY, data_dir=str(tmp_path), random_access=True)
  assert prepare.has_format(builder, "array_record")
  via_tf, via_source = read_both_ways(str(tmp_path))
  assert via_source == via_tf


def test_conversion_checks_record_counts(tmp_path, monkeypatch):
  builder = prepare.prepare(TINY, data_dir=str(tmp_path))
  real_read = prepare._read_records
  monkeypatch.setattr(
    prepare, "_read_records", lambda path, fmt: list(real_read(path, fmt))[:-1]
  )  # A record lost.
  with pytest.raises(UserError) as err:
    prepare.add_format(builder, "array_record")
  assert_one_sentence(err, "records, not the", "prepare flaxtrain_tiny_images again")
  assert not any("array_record" in f or "incomplete" in f for f in tiny_files(builder))


def test_has_format_before_preparation(tmp_path):
  builder = tfds.builder(TINY, data_dir=str(tmp_path))
  assert not prepare.has_format(builder, "tfrecord")
  with pytest.raises(ValueError):
    prepare.has_format(builder, "csv")


# ----------------------------------------------------------------------- CLI


def run_cli(capsys, *args) -> tuple[int, str, str]:
  code = datasets.main(["flaxtrain.datasets", *args])
  out, err = capsys.readouterr()
  return code, out, err


class FlaxtrainTinyVaryingImages(tfds.core.GeneratorBasedBuilder):
  """Images of varying size: they can only be streamed."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(names=["cat", "dog"]),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(6), "test": self._generate_examples(4)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"image": np.full((4 + i, 5, 3), i, np.uint8), "label": i % 2}


def test_cli_default_prepares_varying_size_images_for_streaming_only(tmp_path, capsys):
  name = "flaxtrain_tiny_varying_images"
  code, out, _ = run_cli(capsys, name, str(tmp_path))
  assert code == 0 and out.endswith("(array_record)\n"), out


def test_cli_default_leaves_both_formats_for_fixed_size_images(tmp_path, capsys):
  code, out, _ = run_cli(capsys, TINY, str(tmp_path))
  assert code == 0  # After TFDS's own lines:
  version_dir = tmp_path / TINY / "1.0.0"
  assert out.splitlines()[-1] == (
    f"{TINY} is ready in {version_dir} (tfrecord and array_record; decoded: test, train)"
  )
  kept = sorted(p.name.split("-")[0] for p in (version_dir / memory.DECODED_DIR).iterdir())
  assert kept == ["test", "train"]
  via_tf, via_source = read_both_ways(str(tmp_path))
  assert via_source == via_tf
  assert run_cli(capsys, TINY, str(tmp_path))[0] == 0  # Again: nothing to do.


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
def test_cli_one_format(tmp_path, capsys, file_format):
  # With TFRecord files (the in-memory source's) the splits are also kept decoded.
  decoded = "; decoded: test, train" if file_format == "tfrecord" else ""
  code, out, _ = run_cli(capsys, TINY, str(tmp_path), f"--format={file_format}")
  assert code == 0 and out.endswith(f"({file_format}{decoded})\n"), out
  # Asking for the other format then converts in place.
  other = {"array_record": "tfrecord", "tfrecord": "array_record"}[file_format]
  code, out, _ = run_cli(capsys, TINY, str(tmp_path), f"--format={other}")
  assert code == 0 and out.endswith("(tfrecord and array_record; decoded: test, train)\n"), out


def test_cli_manual_dataset_error(tmp_path, capsys, offline):
  code, out, err = run_cli(capsys, "imagenet2012", str(tmp_path))
  assert code == 1 and out == ""
  assert err.startswith("flaxtrain: error: Dataset imagenet2012 must be downloaded by hand")
  assert "--manual_dir=DIR" in err and "--config.dataset" not in err
  assert err.count("\n") == 1 and err.endswith(".\n")


@pytest.mark.parametrize("args", [[], ["--format=parquet", TINY], [TINY, "a", "b"]])
def test_cli_bad_usage(tmp_path, capsys, args):
  code, _, err = run_cli(capsys, *args)
  assert code == 2 and "usage: python -m flaxtrain.datasets NAME [DATA_DIR]" in err


# ------------------------------------------------------------ decoded copies of splits


def test_a_decoded_copy_is_read_next_time_and_decoded_again_when_stale(tmp_path, caplog):
  """The second load reads the .npz beside the prepared files instead of decoding; data
  prepared again, or a damaged copy, is decoded again (and said so), never served stale."""
  caplog.set_level("INFO")
  first = memory.load("flaxtrain_tiny_images", data_dir=str(tmp_path))
  (version_dir,) = {p.parent.parent for p in tmp_path.rglob(f"{memory.DECODED_DIR}/*.npz")}
  copies = sorted(version_dir.glob(f"{memory.DECODED_DIR}/*.npz"))
  assert [p.name.split("-")[0] for p in copies] == ["test", "train"]

  def no_decoding(*_):
    raise AssertionError("decoded again")

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(memory, "_read_split", no_decoding)
    mp.setattr(memory, "_read_records", no_decoding)
    again = memory.load("flaxtrain_tiny_images", data_dir=str(tmp_path))
  assert again[0] == first[0]
  for a, b in zip(first[1:], again[1:], strict=True):
    assert all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)

  copies[1].write_bytes(copies[1].read_bytes()[:100])  # Damaged: decoded and written again.
  caplog.clear()
  damaged = memory.load("flaxtrain_tiny_images", data_dir=str(tmp_path))
  assert np.array_equal(damaged[1]["image"], first[1]["image"])
  assert "Could not read the decoded copy" in caplog.text
  assert copies[1].stat().st_size > 100

  prepared = next(p for p in version_dir.iterdir() if ".tfrecord" in p.name)
  os.utime(prepared, ns=(0, 0))  # Prepared again: a new fingerprint, the old copies go.
  memory.load("flaxtrain_tiny_images", data_dir=str(tmp_path))
  assert sorted(version_dir.glob(f"{memory.DECODED_DIR}/*.npz")) != copies
  assert len(list(version_dir.glob(f"{memory.DECODED_DIR}/*"))) == 2  # No temporary files.


def test_a_copy_that_cannot_be_written_is_said_and_the_load_goes_on(tmp_path, caplog):
  """E.g. a read-only data dir: one warning, the decoded split, no file left behind."""
  memory.load("flaxtrain_tiny_images", data_dir=str(tmp_path))
  (copies,) = tmp_path.rglob(memory.DECODED_DIR)
  shutil.rmtree(copies)
  copies.write_text("not a directory")  # Where the copies would go: unwritable.
  caplog.set_level("INFO")
  spec, train, _ = memory.load("flaxtrain_tiny_images", data_dir=str(tmp_path))
  assert spec.num_train == len(train["label"]) == 6
  assert "Could not keep a decoded copy of split train" in caplog.text
  assert sorted(p.name for p in copies.parent.iterdir() if p.name.startswith(".")) == []
