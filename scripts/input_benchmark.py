"""Input-only benchmark: flaxtrain's streamed train preprocessing vs the Flax ImageNet tf.data.

    .venv/bin/python scripts/benchmark.py --input   # or: make bench ARGS=--input
    .venv/bin/python scripts/benchmark.py --input --input_images=2000 --rounds=3 --input_workers=0,2

The data: `--input_images` ImageNet-like JPEGs (sides 300-500 x 350-500, quality 90) made from
matplotlib's sample photograph (grace_hopper.jpg) by random crops, rescales, flips, sharpening,
colour jitter and sensor-like noise, stored as a TFDS ArrayRecord dataset under
`--input_data_dir` (reused when already there; default a temporary directory).

For every round, in this order, each in a fresh subprocess:

  flaxtrain W  `records.TrainStep` over `tfds.data_source(..., SkipDecoding)` of the ArrayRecord
     files, `Transform(size=224, channels=3, train=True, random_resized_crop=True)`, run by
     Grain exactly as `stream.StreamSource` runs it (its own `_iterate`: `to_iter_dataset` with
     `--input_threads` threads and `mp_prefetch` with W worker processes), for W in
     `--input_workers`. Output: uint8 [B, 224, 224, 3]. Records are read from the files.
  tf.data  the Flax ImageNet example's train pipeline (examples/imagenet/input_pipeline.py),
     reimplemented: raw bytes in memory (as its `cache()`), repeat, shuffle(16 B), map(
     decode_and_random_crop (extract_jpeg_shape + sample_distorted_bounding_box +
     decode_and_crop_jpeg, centre-crop fallback), bicubic resize to 224, random flip, mean/std
     normalisation; AUTOTUNE), batch(B), prefetch(10), private threadpool of the core count.
     Output: float32 [B, 224, 224, 3], as the example's (it casts to bf16 only with
     half_precision).
  decode   single thread (pinned to one core), ms per image on the same JPEGs: full
     cv2.imdecode, flaxtrain's Transform and its parts, tf.io.decode_jpeg,
     tf.io.decode_and_crop_jpeg with the example's random window, and the example's whole
     per-image preprocessing.

Rates are images/s over `--input_batches` batches after `--input_warmup` batches, medians over
rounds. The JSON goes to stdout (and --json_out); progress goes to stderr.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark as bench  # noqa: E402

DATASET = "flaxtrain_input_bench"
SIZE = 224
NUM_CLASSES = 10
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)  # The Flax example's normalisation.
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
CROP_PADDING = 32


def _cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _records(data_dir: str, split: str = "train"):
  import tensorflow_datasets as tfds

  return tfds.data_source(
    DATASET,
    split=split,
    data_dir=data_dir,
    download=False,
    decoders={"image": tfds.decode.SkipDecoding()},
  )


# ---------------------------------------------------------------- data


def make_jpegs(n: int, seed: int) -> list[bytes]:
  """`n` distinct ImageNet-like JPEGs from matplotlib's sample photograph."""
  import cv2
  import matplotlib.cbook
  import numpy as np

  photo = cv2.imread(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
  big_h, big_w = photo.shape[:2]
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    h, w = int(rng.integers(300, 501)), int(rng.integers(350, 501))
    area = rng.uniform(0.2, 1.0) * big_h * big_w
    ratio = w / h * np.exp(rng.uniform(-0.2, 0.2))
    cw = int(min(big_w, np.sqrt(area * ratio)))
    ch = int(min(big_h, np.sqrt(area / ratio)))
    y, x = int(rng.integers(0, big_h - ch + 1)), int(rng.integers(0, big_w - cw + 1))
    im = cv2.resize(photo[y : y + ch, x : x + cw], (w, h), interpolation=cv2.INTER_CUBIC)
    im = im.astype(np.float32)
    im += 1.5 * (im - cv2.GaussianBlur(im, (0, 0), 2.0))  # Detail back after upscaling.
    if rng.random() < 0.5:
      im = im[:, ::-1]
    im *= rng.uniform(0.8, 1.2, 3)  # Colour balance.
    mean = im.mean()
    im = (im - mean) * rng.uniform(0.7, 1.3) + mean + rng.uniform(-30, 30)
    gray = im.mean(-1, keepdims=True)
    im = gray + (im - gray) * rng.uniform(0.5, 1.5)  # Saturation.
    im += rng.normal(0, rng.uniform(4, 12), (h, w, 1))  # Sensor noise: texture to encode.
    im = np.clip(im, 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(im), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    out.append(buf.tobytes())
  return out


def worker_input_data(spec: dict) -> dict:
  """Writes the dataset unless `spec['data_dir']` already holds it; returns its statistics."""
  marker = os.path.join(spec["data_dir"], "made.json")
  if os.path.exists(marker):
    with open(marker) as f:
      return {**json.load(f), "reused": True}
  import numpy as np
  import tensorflow_datasets as tfds

  t = time.perf_counter()
  n, seed = spec["num_images"], spec["seed"]
  train, test = make_jpegs(n, seed), make_jpegs(max(8, n // 10), seed + 1)
  labels = np.random.default_rng(seed).integers(0, NUM_CLASSES, len(train) + len(test))
  examples = [{"image": b, "label": int(y)} for b, y in zip(train + test, labels, strict=True)]
  features = tfds.features.FeaturesDict(
    {
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
      "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
    }
  )
  if os.path.isdir(os.path.join(spec["data_dir"], DATASET)):  # A half-written earlier try.
    shutil.rmtree(os.path.join(spec["data_dir"], DATASET))
  tfds.dataset_builders.store_as_tfds_dataset(
    name=DATASET,
    version="1.0.0",
    features=features,
    split_datasets={
      "train": list(enumerate(examples[:n])),
      "test": list(enumerate(examples[n:])),
    },
    data_dir=spec["data_dir"],
    file_format="array_record",
  )
  from flaxtrain.data import preprocess

  pixels = [np.prod(preprocess.header_size(b)) for b in train]
  info = {
    "num_train": n,
    "num_test": len(test),
    "mean_jpeg_kb": float(np.mean([len(b) for b in train]) / 1e3),
    "mean_megapixels": float(np.mean(pixels) / 1e6),
    "source_photo": "matplotlib sample_data/grace_hopper.jpg",
    "jpeg_quality": 90,
    "make_s": time.perf_counter() - t,
  }
  with open(marker, "w") as f:
    json.dump(info, f)
  return {**info, "reused": False}


# ---------------------------------------------------------------- workers


def _timed(it, warmup: int, batches: int) -> dict:
  """images/s of `it` over `batches` batches after `warmup` (the first one included)."""
  t = time.perf_counter()
  first = next(it)
  first_s = time.perf_counter() - t
  for _ in range(warmup - 1):
    next(it)
  before = bench._cpu_snapshot()
  t = time.perf_counter()
  n = 0
  for _ in range(batches):
    n += len(next(it)["label"])
  seconds = time.perf_counter() - t
  after = bench._cpu_snapshot()
  busy = None
  if before[1] is not None and after[1] is not None:
    busy = (after[1] - before[1]) / (seconds * (os.cpu_count() or 1))
  return {
    "examples_per_sec": n / seconds,
    "timed_images": n,
    "timed_s": seconds,
    "first_batch_s": first_s,
    "machine_busy_share": busy,  # Of all cores while timed (1.0: every core busy).
    "output": f"{first['image'].dtype} {list(first['image'].shape)}",
  }


def worker_input_flaxtrain(spec: dict) -> dict:
  import types

  import grain
  import numpy as np
  from absl import flags

  from flaxtrain.data import plan as plan_lib
  from flaxtrain.data import preprocess, records, stream

  flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags.
  source = _records(spec["data_dir"])
  batch = spec["batch_size"]
  plan = plan_lib.IndexPlan(
    num_train=len(source),
    num_eval=batch,
    batch_size=batch,
    eval_batch_size=batch,
    num_devices=1,
    seed=0,
  )
  transform = preprocess.Transform(size=SIZE, channels=3, train=True, random_resized_crop=True)
  train_fn = records.TrainStep(source, "train", np.arange(batch), transform, (SIZE, SIZE, 3), plan)
  # StreamSource.train_batches's dataset, iterated by StreamSource's own _iterate.
  spec["threads"] = stream.default_threads(spec["threads"], spec["workers"])  # -1: auto.
  settings = types.SimpleNamespace(
    workers=spec["workers"], threads=spec["threads"], prefetch=spec["prefetch"]
  )
  dataset = grain.MapDataset.range(0, stream._ENDLESS).map(train_fn)
  it = stream.StreamSource._iterate(settings, dataset)
  result = _timed(it, spec["warmup"], spec["batches"])
  return {**result, **{k: spec[k] for k in ("workers", "threads", "prefetch", "batch_size")}}


def _flax_example():
  """The Flax ImageNet example's train preprocessing (examples/imagenet/input_pipeline.py)."""
  import tensorflow as tf

  def distorted_bounding_box_crop(image_bytes):
    shape = tf.io.extract_jpeg_shape(image_bytes)
    begin, size, _ = tf.image.sample_distorted_bounding_box(
      shape,
      bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
      min_object_covered=0.1,
      aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
      area_range=(0.08, 1.0),
      max_attempts=10,
      use_image_if_no_bounding_boxes=True,
    )
    offset_y, offset_x, _ = tf.unstack(begin)
    target_h, target_w, _ = tf.unstack(size)
    window = tf.stack([offset_y, offset_x, target_h, target_w])
    return tf.io.decode_and_crop_jpeg(image_bytes, window, channels=3)

  def resize(image):
    return tf.image.resize([image], [SIZE, SIZE], method=tf.image.ResizeMethod.BICUBIC)[0]

  def decode_and_center_crop(image_bytes):
    shape = tf.io.extract_jpeg_shape(image_bytes)
    h, w = shape[0], shape[1]
    side = tf.cast((SIZE / (SIZE + CROP_PADDING)) * tf.cast(tf.minimum(h, w), tf.float32), tf.int32)
    window = tf.stack([((h - side) + 1) // 2, ((w - side) + 1) // 2, side, side])
    return resize(tf.io.decode_and_crop_jpeg(image_bytes, window, channels=3))

  def decode_and_random_crop(image_bytes):
    image = distorted_bounding_box_crop(image_bytes)
    original = tf.io.extract_jpeg_shape(image_bytes)
    same = tf.reduce_sum(tf.cast(tf.equal(original, tf.shape(image)), tf.int32)) >= 3
    return tf.cond(same, lambda: decode_and_center_crop(image_bytes), lambda: resize(image))

  def preprocess_for_train(image_bytes):
    image = tf.reshape(decode_and_random_crop(image_bytes), [SIZE, SIZE, 3])
    image = tf.image.random_flip_left_right(image)
    image -= tf.constant(MEAN_RGB, shape=[1, 1, 3], dtype=image.dtype)
    image /= tf.constant(STDDEV_RGB, shape=[1, 1, 3], dtype=image.dtype)
    return tf.image.convert_image_dtype(image, dtype=tf.float32)

  return distorted_bounding_box_crop, preprocess_for_train


def _all_records(data_dir: str, limit: int | None = None):
  source = _records(data_dir)
  n = len(source) if limit is None else min(limit, len(source))
  rows = [source[i] for i in range(n)]
  return [r["image"] for r in rows], [int(r["label"]) for r in rows]


def worker_input_tfdata(spec: dict) -> dict:
  import numpy as np
  import tensorflow as tf

  tf.config.set_visible_devices([], "GPU")
  _, preprocess_for_train = _flax_example()
  images, labels = _all_records(spec["data_dir"])  # Raw bytes in memory, as its cache().
  batch = spec["batch_size"]
  ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": np.array(labels, np.int64)})
  options = tf.data.Options()
  options.threading.private_threadpool_size = spec["threads"]  # The example: 48 (TPU host).
  ds = ds.with_options(options).cache().repeat().shuffle(16 * batch, seed=0)
  ds = ds.map(
    lambda ex: {"image": preprocess_for_train(ex["image"]), "label": ex["label"]},
    num_parallel_calls=tf.data.AUTOTUNE,
  )
  ds = ds.batch(batch, drop_remainder=True).prefetch(10)
  it = (tf.nest.map_structure(lambda x: x._numpy(), b) for b in ds)  # As its prepare_tf_data.
  result = _timed(it, spec["warmup"], spec["batches"])
  return {**result, "threadpool": spec["threads"], "batch_size": batch}


def _ms_per_image(fn, items, reps: int) -> float:
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    for item in items:
      fn(item)
    best = min(best, time.perf_counter() - t)
  return 1e3 * best / len(items)


def worker_input_decode(spec: dict) -> dict:
  """Single-thread ms per image of each decode and preprocessing step, on one core."""
  if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  import cv2
  import numpy as np
  import tensorflow as tf

  from flaxtrain.data import plan as plan_lib
  from flaxtrain.data import preprocess, records

  tf.config.set_visible_devices([], "GPU")
  tf.config.threading.set_inter_op_parallelism_threads(1)
  tf.config.threading.set_intra_op_parallelism_threads(1)
  reps = spec["reps"]
  source = _records(spec["data_dir"])
  data, _ = _all_records(spec["data_dir"], spec["images"])
  m = len(data)
  transform = preprocess.Transform(size=SIZE, channels=3, train=True, random_resized_crop=True)
  seeds = [[0, records._HOST_AUGMENT, 0, i] for i in range(m)]
  ms = {}
  ms["record_read"] = _ms_per_image(lambda i: source[i], range(m), reps)
  ms["rng_create"] = _ms_per_image(np.random.default_rng, seeds, reps)
  ms["cv2_imdecode_full"] = _ms_per_image(
    lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), data, reps
  )
  ms["flaxtrain_decode_full_rgb"] = _ms_per_image(lambda b: preprocess.decode(b, 3), data, reps)
  ms["flaxtrain_header"] = _ms_per_image(preprocess.header_size, data, reps)
  pairs = list(zip(data, seeds, strict=True))
  ms["flaxtrain_transform"] = _ms_per_image(
    lambda p: transform(p[0], np.random.default_rng(p[1])), pairs, reps
  )
  ms["flaxtrain_transform"] -= ms["rng_create"]
  # The resize alone, on the crops the Transform takes (its interpolation rule).
  crops, reduced, area = [], 0, 0.0
  for b, seed in pairs:
    h, w = preprocess.header_size(b)
    y, x, ch, cw = preprocess.random_resized_crop_box(
      np.random.default_rng(seed), h, w, transform.area_range, transform.aspect_range
    )
    reduced += min(ch, cw) // 2 >= SIZE
    area += ch * cw / (h * w)
    crops.append(np.ascontiguousarray(preprocess.decode(b, 3)[y : y + ch, x : x + cw]))

  def resize(crop):
    shrink = crop.shape[0] > SIZE and crop.shape[1] > SIZE
    cv2.resize(crop, (SIZE, SIZE), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)

  ms["flaxtrain_resize"] = _ms_per_image(resize, crops, reps)
  batch = min(spec["batch_size"], m)
  plan = plan_lib.IndexPlan(
    num_train=m, num_eval=batch, batch_size=batch, eval_batch_size=batch, num_devices=1, seed=0
  )
  step = records.TrainStep(source, "train", np.arange(batch), transform, (SIZE, SIZE, 3), plan)
  steps = list(range(max(1, m // batch)))
  ms["flaxtrain_train_step_per_image"] = _ms_per_image(step, steps, reps) / batch

  crop_fn, preprocess_for_train = _flax_example()
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  options.autotune.enabled = False
  raw = tf.data.Dataset.from_tensor_slices(data).with_options(options)

  def tf_ms(fn):
    # One batch per pass over the images (of each output's last value, which no graph
    # rewrite can compute without the op): no per-image Python; the iterator is made and
    # warmed up before timing.
    last = lambda b: tf.cast(tf.reshape(fn(b), [-1])[-1], tf.float32)  # noqa: E731
    it = iter(raw.repeat().map(last).batch(m))
    next(it)
    return _ms_per_image(lambda _: next(it), [None], reps) / m

  ms["tf_extract_jpeg_shape"] = tf_ms(lambda b: tf.io.extract_jpeg_shape(b))
  ms["tf_decode_jpeg_full"] = tf_ms(lambda b: tf.io.decode_jpeg(b, channels=3))
  ms["tf_decode_and_crop_jpeg"] = tf_ms(crop_fn)  # Incl. extract_jpeg_shape + box sampling.
  ms["tf_flax_preprocess_for_train"] = tf_ms(preprocess_for_train)
  return {
    "ms_per_image": ms,
    "images": m,
    "reduced_scale_share": reduced / m,  # Crops the Transform decodes at 1/2 scale or less.
    "mean_crop_area_share": area / m,
  }


WORKERS = {
  "input_data": worker_input_data,
  "input_flaxtrain": worker_input_flaxtrain,
  "input_tfdata": worker_input_tfdata,
  "input_decode": worker_input_decode,
}


# ---------------------------------------------------------------- orchestration


def versions() -> dict:
  from importlib import metadata

  out = {"python": platform.python_version()}
  for name in (
    "grain",
    "array-record",
    "tensorflow",
    "tensorflow-cpu",
    "tensorflow-datasets",
    "opencv-python-headless",
    "numpy",
    "pillow",
  ):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  try:
    import cv2

    info = cv2.getBuildInformation()
    out["cv2_jpeg"] = next(
      (ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.strip().startswith("JPEG:")),
      None,
    )
  except ImportError:
    out["cv2_jpeg"] = None
  return out


def summarize(runs: list[dict], keys=("examples_per_sec", "first_batch_s", "machine_busy_share")):
  ok = [r for r in runs if "error" not in r]
  if not ok:
    first = runs[0] if runs else {}
    return {"error": first.get("error", "not run"), "stderr_tail": first.get("stderr_tail")}
  out = {k: bench.median([r.get(k) for r in ok]) for k in keys}
  out["per_round"] = [r["examples_per_sec"] for r in ok]
  out["others_cpu_share"] = bench.median([r.get("others_cpu_share") for r in ok])
  for k, v in ok[0].items():
    if k not in out and k not in ("timed_s", "examples_per_sec"):
      out.setdefault(k, v)
  return out


def parse_args(argv):
  p = argparse.ArgumentParser(
    prog="benchmark.py --input",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--input_images", type=int, default=2000, help="JPEGs in the train split")
  p.add_argument(
    "--input_data_dir",
    default=None,
    help="where the JPEG dataset is made, or reused (default: a temporary directory)",
  )
  p.add_argument("--input_seed", type=int, default=0, help="seed of the made JPEGs")
  p.add_argument("--input_batch", type=int, default=128, help="images per batch (per process)")
  p.add_argument("--input_warmup", type=int, default=3, help="batches run before timing")
  p.add_argument("--input_batches", type=int, default=16, help="batches timed")
  p.add_argument("--input_workers", default="0,1,2", help="Grain worker counts to measure")
  p.add_argument(
    "--input_threads",
    type=int,
    default=None,
    help="Grain threads per worker (default: config dataset.threads)",
  )
  p.add_argument(
    "--input_prefetch",
    type=int,
    default=None,
    help="Grain batches prefetched per worker (default: config dataset.prefetch)",
  )
  p.add_argument(
    "--input_decode_images", type=int, default=500, help="JPEGs timed one by one (decode costs)"
  )
  p.add_argument("--input_decode_reps", type=int, default=2, help="passes over them (best kept)")
  p.add_argument("--config", help=argparse.SUPPRESS)  # From `make bench`; not used here.
  p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
  p.add_argument("--json_out", default=None, help="also write the JSON here")
  p.add_argument(
    "--quiet_wait",
    type=float,
    default=30.0,
    help="before each measurement, wait up to this many seconds for other processes to "
    "leave the CPUs idle (0: don't)",
  )
  args = p.parse_args(argv)
  args.input_workers = [int(w) for w in args.input_workers.split(",") if w.strip()]
  if (
    args.input_images < 8
    or args.input_batch < 1
    or args.input_batch > args.input_images
    or args.input_warmup < 1
    or args.input_batches < 1
    or args.rounds < 1
    or args.input_decode_reps < 1
    or not args.input_workers
    or min(args.input_workers) < 0
  ):
    p.error(
      "need --input_images >= 8, 1 <= --input_batch <= --input_images, --input_warmup, "
      "--input_batches, --rounds and --input_decode_reps >= 1 and worker counts >= 0"
    )
  if args.input_threads is None or args.input_prefetch is None:
    from flaxtrain import config_lib

    base = config_lib.get_base_config().dataset
    args.input_threads = args.input_threads or base.threads
    args.input_prefetch = args.input_prefetch or base.prefetch
  return args


def main(argv) -> int:
  args = parse_args(argv)
  started = time.time()
  cores = _cores()
  report = {
    "benchmark": "input only: flaxtrain's streamed train preprocessing (Grain) vs the Flax "
    "ImageNet example's tf.data pipeline",
    "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    "machine": bench.machine_info(),
    "versions": versions(),
    "settings": {
      "images": args.input_images,
      "batch_size": args.input_batch,
      "image_size": SIZE,
      "warmup_batches": args.input_warmup,
      "timed_batches": args.input_batches,
      "workers": args.input_workers,
      "threads_per_worker": args.input_threads,
      "prefetch_per_worker": args.input_prefetch,
      "tf_data_threadpool": cores,
      "rounds": args.rounds,
      "quiet_wait_s": args.quiet_wait,
      "flaxtrain_output": "uint8 (normalised on the device)",
      "tf_data_output": "float32, mean/std normalised (as the Flax example without half_precision)",
      "tf_data_source": "raw JPEG bytes in memory (the example's cache()); flaxtrain reads "
      "the ArrayRecord files",
    },
  }
  timed = {"warmup": args.input_warmup, "batches": args.input_batches}
  runs = {w: [] for w in args.input_workers}
  tf_runs, decode_runs = [], []
  with tempfile.TemporaryDirectory(prefix="flaxtrain-input-bench-") as tmp:
    root = os.path.abspath(args.input_data_dir or os.path.join(tmp, "data"))
    data_dir = os.path.join(root, f"n{args.input_images}-seed{args.input_seed}")
    os.makedirs(data_dir, exist_ok=True)
    bench.log(f"JPEG dataset in {data_dir}")
    data = bench.spawn(
      "input_data",
      {"data_dir": data_dir, "num_images": args.input_images, "seed": args.input_seed},
      tmp,
    )
    if "error" in data:
      raise SystemExit("benchmark --input: could not make the JPEG dataset")
    data.pop("others_cpu_share", None)
    data["data_dir"] = data_dir if args.input_data_dir else None
    report["data"] = data
    common = {"data_dir": data_dir, "batch_size": args.input_batch}
    for rnd in range(args.rounds):
      tag = f"round {rnd + 1}/{args.rounds}"
      for w in args.input_workers:
        bench.log(f"{tag}: flaxtrain, {w} Grain worker(s) x {args.input_threads} thread(s)")
        spec = {**common, **timed, "workers": w, "threads": args.input_threads}
        spec["prefetch"] = args.input_prefetch
        runs[w].append(bench.spawn("input_flaxtrain", spec, tmp, quiet_wait=args.quiet_wait))
      bench.log(f"{tag}: tf.data (the Flax ImageNet example's pipeline)")
      spec = {**common, **timed, "threads": cores}
      tf_runs.append(bench.spawn("input_tfdata", spec, tmp, quiet_wait=args.quiet_wait))
      bench.log(f"{tag}: single-thread decode costs")
      spec = {**common, "images": args.input_decode_images, "reps": args.input_decode_reps}
      decode_runs.append(bench.spawn("input_decode", spec, tmp, quiet_wait=args.quiet_wait))

  flax = {str(w): summarize(runs[w]) for w in args.input_workers}
  rates = {w: v.get("examples_per_sec") for w, v in flax.items() if v.get("examples_per_sec")}
  best = max(rates, key=rates.get) if rates else None
  tf_data = summarize(tf_runs)
  ok = [r for r in decode_runs if "error" not in r]
  decode = {"error": decode_runs[0].get("error"), "stderr_tail": decode_runs[0].get("stderr_tail")}
  if ok:
    keys = ok[0]["ms_per_image"]
    decode = {k: bench.median([r["ms_per_image"].get(k) for r in ok]) for k in keys}
  report["input_examples_per_sec"] = rates.get(best)
  report["workers_used"] = None if best is None else int(best)
  report["flaxtrain_examples_per_sec_by_workers"] = rates
  report["tf_data_examples_per_sec"] = tf_data.get("examples_per_sec")
  report["flaxtrain_vs_tf_data"] = bench.ratio(rates.get(best), tf_data.get("examples_per_sec"))
  report["decode_ms_per_image"] = decode
  if ok:
    report["decode_crops"] = {
      k: bench.median([r[k] for r in ok])
      for k in ("images", "reduced_scale_share", "mean_crop_area_share")
    }
  report["flaxtrain"] = flax
  report["tf_data"] = tf_data
  report["machine"]["loadavg_end"] = os.getloadavg()
  report["benchmark_wall_s"] = time.time() - started
  bench.print_report(report, args.json_out)
  return 0 if best is not None and "error" not in tf_data and ok else 1


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "--_worker":
    bench.run_worker_main(sys.argv[2], sys.argv[4])
  else:
    sys.exit(main(sys.argv[1:]))
