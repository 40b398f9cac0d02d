"""Checks flaxtrain on this machine's accelerator (or CPU): tests, throughput, MFU, determinism.

    bash scripts/accelerator_check.sh            # detects the device, installs the extra
    python scripts/accelerator_check.py --platform=gpu --out=DIR [--tiny] [--skip_tests]

Measured on synthetic data (random images in memory, nothing downloaded), each part in a
fresh process so that the parent never holds the device:

  tests        a device-count-agnostic subset of tests/test_train.py and
               tests/test_training_options.py (`TESTS`), on the default backend.
  throughput   fashion_cnn (configs/fashion_cnn.py) and ResNet-50 at 224 px in bfloat16
               (configs/imagenet_resnet50.py's model, 1000 classes): train examples/s through
               flaxtrain's own compiled chunk, `Experiment(config).train_chunk`, dispatched
               as the loop does, with steps_per_dispatch 1 and 25; MFU (XLA's cost analysis
               of the step over the device's dense bf16 peak, `PEAK_BF16`; none on CPU);
               and the ratio to a bare `jax.jit` step of the same model and optimizer
               (device-resident batch, donated state, no host sync in the timed loop),
               target >= `TARGET_VS_BARE`.
  determinism  two identical short runs of fashion_cnn with topology_invariant_shards, on
               GPU under XLA's deterministic-ops flags: their parameters must be bitwise equal.

--tiny shrinks everything to a CPU smoke test (small batches, 10 steps, ResNet-50 replaced
by a one-block resnet_small at 32 px); its figures say nothing about an accelerator.
Prints a table and writes DIR/accelerator_check.json. Exit status 1 when a test, a
measurement or the determinism check fails (the ratio to the bare step is only reported).
"""

import argparse
import collections
import concurrent.futures
import contextlib
import datetime
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
# This checkout's flaxtrain, installed or not, and scripts/benchmark.py's helpers.
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
import benchmark  # noqa: E402

REPORT_NAME = "accelerator_check.json"
TARGET_VS_BARE = 0.95  # flaxtrain's step at most 5% slower than a bare jitted step.
DISPATCHES = (1, 25)
TINY_CNN = {"features": (8, 16), "dense": (32,)}  # tests/conftest.py's tiny_config.
# Added on GPU for the determinism check and the tests; dropped when this jaxlib's XLA
# does not know one (it aborts on unknown flags).
GPU_DETERMINISM_FLAGS = (
  "--xla_gpu_deterministic_ops=true",
  "--xla_gpu_exclude_nondeterministic_ops=true",
)
# Tests that touch the devices and hold on any device count (the rest of those files
# assume 4 fake CPU devices): the chunked loop, device-side batches, BatchNorm over the
# global batch, bfloat16, the topology-invariant reduction.
TESTS = (
  "tests/test_train.py::test_resume_continues_from_the_saved_step_and_matches",
  "tests/test_train.py::test_steps_per_dispatch_does_not_change_results",
  "tests/test_train.py::test_host_gathered_batches_give_the_same_run",
  "tests/test_train.py::test_nan_stops_training_without_saving_it",
  "tests/test_training_options.py::test_batch_stats_are_updated_in_training_and_used_in_eval",
  "tests/test_training_options.py::test_batchnorm_training_does_not_depend_on_the_device_count",
  "tests/test_training_options.py::"
  "test_topology_invariant_shards_give_the_same_bits_on_1_2_and_4_devices",
  "tests/test_training_options.py::test_bfloat16_trains_stays_finite_and_keeps_float32_state",
  "tests/test_training_options.py::test_augmented_training_is_identical_on_one_and_four_devices",
)

# Dense (no sparsity) bfloat16 peak FLOP/s of one JAX device, by the words of
# `device.device_kind` (matched as consecutive words, case-insensitive; the longest key
# wins, so "TPU v5 lite" is not "TPU v5"). NVIDIA's datasheets quote bf16 Tensor Core
# FLOP/s "with sparsity": the dense peak is half of that.
PEAK_BF16 = {
  # nvidia.com/en-us/data-center/h100, datasheet: 1,979 TFLOPS with sparsity (SXM; its
  # device_kind is "NVIDIA H100 80GB HBM3"), 1,513 (PCIe), 1,671 (NVL).
  "H100": 989e12,
  "H100 PCIe": 756e12,
  "H100 NVL": 835e12,
  # nvidia.com/en-us/data-center/h200, datasheet: 1,979 TFLOPS with sparsity (SXM), 1,671 (NVL).
  "H200": 989e12,
  "H200 NVL": 835e12,
  # nvidia.com/en-us/data-center/grace-hopper-superchip: the H100-class GPU, 1,979 with sparsity.
  "GH200": 989e12,
  # nvidia.com/en-us/data-center/a100, datasheet: 312 TFLOPS dense (624 with sparsity).
  "A100": 312e12,
  # nvidia.com/en-us/data-center/l4, datasheet: 242 TFLOPS with sparsity.
  "L4": 121e12,
  # nvidia.com/en-us/data-center/l40s, datasheet: 362.05 TFLOPS dense (733 with sparsity).
  "L40S": 362e12,
  # cloud.google.com/tpu/docs/system-architecture-tpu-vm: v2 45 and v3 123 TFLOPS per
  # chip of two TensorCores, each its own JAX device.
  "TPU v2": 22.5e12,
  "TPU v3": 61.5e12,
  # cloud.google.com/tpu/docs/v4: 275 TFLOPS per chip (one JAX device per chip).
  "TPU v4": 275e12,
  # cloud.google.com/tpu/docs/v5e: 197 TFLOPS per chip; device_kind "TPU v5 lite".
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  # cloud.google.com/tpu/docs/v5p: 459 TFLOPS per chip; device_kind "TPU v5".
  "TPU v5": 459e12,
  "TPU v5p": 459e12,
  # cloud.google.com/tpu/docs/v6e: 918 TFLOPS per chip; device_kind "TPU v6 lite".
  "TPU v6 lite": 918e12,
  "TPU v6e": 918e12,
}


def log(msg: str):
  print(f"[accelerator_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _words(text: str) -> list[str]:
  return [w for w in re.split(r"[\s_-]+", text.lower()) if w]


def peak_bf16(device_kind: str, platform: str) -> tuple[float | None, str]:
  """(dense bf16 peak FLOP/s of one device, where the figure comes from); None on CPU."""
  if platform == "cpu":
    return None, "CPU: no MFU"
  kind = _words(device_kind)
  best = None
  for key in PEAK_BF16:
    k = _words(key)
    if any(kind[i : i + len(k)] == k for i in range(len(kind) - len(k) + 1)):
      if best is None or len(k) > len(_words(best)):
        best = key
  if best is None:
    return None, f"{device_kind!r} is not in PEAK_BF16 (scripts/accelerator_check.py): no MFU"
  return PEAK_BF16[best], f"{best} dense bf16 datasheet peak (PEAK_BF16)"


# ------------------------------------------------------------------ synthetic data


@contextlib.contextmanager
def synthetic_data(shape, num_classes: int, num_train: int, num_eval: int, seed: int = 0):
  """Random uint8 images in memory instead of a TFDS dataset, as tests/conftest.py's
  `patch_synthetic` does: `memory.load` and `sources.inspect` replaced while inside."""
  from flaxtrain.data import memory, prepare, sources

  rng = np.random.default_rng(seed)
  shape = tuple(shape)

  def split(n):
    return {
      "image": rng.integers(0, 256, (n, *shape), dtype=np.uint8),
      "label": rng.integers(0, num_classes, n).astype(np.int32),
    }

  train, evald = split(num_train), split(num_eval)

  def load(name, **_):
    spec = prepare.DatasetSpec(
      name=name,
      image_shape=shape,
      num_classes=num_classes,
      class_names=tuple(str(i) for i in range(num_classes)),
      train_split="train",
      eval_split="test",
      num_train=num_train,
      num_eval=num_eval,
    )
    return spec, train, evald

  saved = memory.load, sources.inspect
  memory.load = load
  sources.inspect = lambda config: sources.Facts(shape, num_train + num_eval)
  try:
    yield train
  finally:
    memory.load, sources.inspect = saved


# ------------------------------------------------------------------ what is measured


def model_specs(tiny: bool, platform: str) -> list[dict]:
  """The two models with their batch per device and step counts for this platform."""
  accel = platform != "cpu"  # A full check on a CPU: small step counts, still slow.
  cnn = {
    "name": "fashion_cnn",
    "label": "fashion_cnn, TINY batch" if tiny else "fashion_cnn",
    "config": "fashion_cnn",
    "image_shape": (28, 28, 1),
    "num_classes": 10,
    "per_device_batch": 32 if tiny else 128,
    "steps": 10 if tiny else (500 if accel else 50),
    "warmup": 0 if tiny else (50 if accel else 5),
  }
  if tiny:
    resnet = {
      "name": "resnet_small_32px_bf16_tiny",
      "label": "TINY stand-in for ResNet-50: resnet_small (one block, width 8) at 32 px, bf16",
      "config": "imagenet_resnet50",
      "model": {"name": "resnet_small", "stage_sizes": (1,), "width": 8, "stem": "small"},
      "image_shape": (32, 32, 3),
      "num_classes": 1000,
      "per_device_batch": 8,
      "steps": 10,
      "warmup": 0,
    }
  else:
    resnet = {
      "name": "resnet50_224px_bf16",
      "label": "ResNet-50 at 224 px, bf16 (configs/imagenet_resnet50.py's model)",
      "config": "imagenet_resnet50",
      "image_shape": (224, 224, 3),
      "num_classes": 1000,
      "per_device_batch": 128 if accel else 8,
      "steps": 100 if accel else 3,
      "warmup": 25 if accel else 0,
    }
  for spec in (cnn, resnet):
    spec["tiny"] = tiny
  return [cnn, resnet]


def make_config(spec: dict, global_batch: int, dispatch: int, total_steps: int):
  """The model's config file on in-memory synthetic data, with no host-side augmentation
  and none on the device either (the bare step has none)."""
  import ml_collections

  from flaxtrain import config_files

  c = config_files.load(spec["config"])
  if spec.get("model"):
    c.model = ml_collections.ConfigDict({**c.model.to_dict(), **spec["model"]})
  c.dataset.name = f"synthetic_{spec['name']}"
  c.dataset.source = "memory"
  c.dataset.image_size = None
  c.augment.random_resized_crop = False
  c.augment.flip = False
  c.augment.crop_padding = 0
  c.augment.erase_prob = 0.0
  # A smaller batch than the recipe's gets a learning rate scaled as the recipes scale it
  # (linearly): ResNet-50's 0.4 is for batch 1024, and random labels diverge at it.
  c.optimizer.learning_rate *= min(1.0, global_batch / c.batch_size)
  c.batch_size = global_batch
  c.eval_batch_size = global_batch
  c.steps_per_dispatch = dispatch
  c.num_train_steps = total_steps
  return c


def _run_chunks(exp, state, step: int, num_steps: int):
  """Dispatches as the loop does: chunks of up to steps_per_dispatch, each chunk's
  non-finite flag read after the next one is dispatched (at most two in flight)."""
  end, previous = step + num_steps, None
  while step < end:
    n = min(exp.plan.steps_per_dispatch, end - step)
    state, _, bad = exp.train_chunk(state, step, n)
    _raise_if_bad(exp, previous)
    previous = bad
    step += n
  _raise_if_bad(exp, previous)
  return state, step


def _raise_if_bad(exp, bad):
  # A non-finite step ends its chunk early: the timing would be wrong.
  if bad is not None and int(exp.par.to_host(bad)) >= 0:
    raise RuntimeError(f"non-finite loss or gradient at step {int(exp.par.to_host(bad))}")


def time_flaxtrain(exp, initial, steps: int, warmup: int) -> dict:
  """Examples/s of `steps` steps through `Experiment.train_chunk` after compile and warm-up,
  from the host TrainState `initial`."""
  import jax

  state = exp.par.replicate(initial)
  t = time.perf_counter()
  state, step = _run_chunks(exp, state, 0, 1)  # Compiles the chunk.
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - t
  state, step = _run_chunks(exp, state, step, warmup)
  jax.block_until_ready(state)
  t = time.perf_counter()
  state, step = _run_chunks(exp, state, step, steps)
  jax.block_until_ready(state)
  seconds = time.perf_counter() - t
  return {"seconds": seconds, "steps": steps, "first_call_s": compile_s}


def bare_step_fn(model, tx, dtype, norm):
  """A plain train step of `model` with optax `tx`, written the way a JAX user would."""
  import jax
  import jax.numpy as jnp
  import optax

  def loss_fn(params, model_state, images, labels):
    x = images.astype(jnp.float32) / 255.0
    if norm is not None:
      mean, std = (jnp.asarray(v, jnp.float32) for v in norm)
      x = (x * 255.0 - mean) / std
    x = x.astype(dtype)

    logits, new_vars = model.apply(
      {"params": params, **model_state}, x, train=True, mutable=[*model_state, "losses"]
    )
    new_state = {k: v for k, v in new_vars.items() if k in model_state}
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return jnp.mean(loss), new_state

  def step(state, images, labels):
    params, model_state, opt_state = state
    (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, model_state, images, labels
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), model_state, opt_state), loss

  return step


@contextlib.contextmanager
def _without_data_parallel_axis():
  """flaxtrain's BatchNorm averages its statistics over the axis `parallel.AXIS` of its
  shard_map; traced with None instead, it is the plain layer a bare step would use, its
  statistics over the (global, under jit) batch. Fails loudly, as an unbound axis name,
  should the models stop reading `parallel.AXIS` when they are called."""
  from flaxtrain import parallel

  saved, parallel.AXIS = parallel.AXIS, None
  try:
    yield
  finally:
    parallel.AXIS = saved


def _flops(stage) -> float | None:
  """XLA's cost analysis of a jax.stages.Lowered (before XLA's optimizations: the model's
  FLOPs, not those of fused or rematerialized code) or Compiled; None if it has none."""
  try:
    return benchmark.xla_flops(stage)
  except Exception:  # noqa: BLE001 - some backends do not implement it.
    return None


def time_bare(exp, initial, batch: dict, steps: int, warmup: int) -> dict:
  """Examples/s of a bare jitted step of exp's model and optimizer from the host TrainState
  `initial` (parameters, model state, optimizer state), and the step's XLA FLOPs."""
  import jax

  from flaxtrain import parallel

  rep, split = exp.par.sharding(parallel.REPLICATED), exp.par.sharding(parallel.BATCH)
  state = exp.par.replicate((initial.params, initial.model_state, initial.opt_state))
  images = jax.device_put(batch["image"], split)
  labels = jax.device_put(batch["label"], split)
  jitted = jax.jit(
    bare_step_fn(exp.model, exp.tx, exp.dtype, exp.norm),
    donate_argnums=(0,),
    in_shardings=(rep, split, split),
    out_shardings=(rep, rep),
  )
  t = time.perf_counter()
  with _without_data_parallel_axis():
    lowered = jitted.lower(state, images, labels)
  step = lowered.compile()
  flops = _flops(lowered) or _flops(step)
  state, loss = step(state, images, labels)
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - t
  for _ in range(warmup):
    state, loss = step(state, images, labels)
  jax.block_until_ready(state)
  t = time.perf_counter()
  for _ in range(steps):
    state, loss = step(state, images, labels)
  jax.block_until_ready(state)
  seconds = time.perf_counter() - t
  if not np.isfinite(float(loss)):
    raise RuntimeError("the bare step's loss is not finite")
  return {
    "seconds": seconds,
    "steps": steps,
    "first_call_s": compile_s,
    "step_flops": flops,
    "num_params": int(sum(x.size for x in jax.tree.leaves(state[0]))),
  }


def _rates(timing: dict, global_batch: int, flops, peak, num_devices: int) -> dict:
  step_s = timing["seconds"] / timing["steps"]
  out = {
    "examples_per_sec": global_batch / step_s,
    "step_ms": 1e3 * step_s,
    "steps_timed": timing["steps"],
    "first_call_s": timing["first_call_s"],
    "tflops_per_sec": flops / step_s / 1e12 if flops else None,
    "mfu": flops / step_s / (peak * num_devices) if flops and peak else None,
  }
  return out


def measure_model(spec: dict, par) -> dict:
  from flaxtrain import experiment

  n_dev = par.num_devices
  platform, kind = par.devices[0].platform, par.devices[0].device_kind
  batch = spec["per_device_batch"] * n_dev
  total = 1 + spec["warmup"] + spec["steps"]
  peak, _ = peak_bf16(kind, platform)
  default = experiment.default_steps_per_dispatch(platform, lambda: True)  # CNNs all.
  out = {
    "label": spec["label"],
    "tiny": spec["tiny"],
    "config": f"configs/{spec['config']}.py",
    "image_shape": list(spec["image_shape"]),
    "num_classes": spec["num_classes"],
    "global_batch": batch,
    "per_device_batch": spec["per_device_batch"],
    "warmup_steps": spec["warmup"],
    "default_steps_per_dispatch": default,
  }
  with synthetic_data(spec["image_shape"], spec["num_classes"], 2 * batch, batch) as train:
    exps = {k: experiment.Experiment(make_config(spec, batch, k, total), par) for k in DISPATCHES}
  first = exps[DISPATCHES[0]]
  out["model"] = first.config.model.name
  out["compute_dtype"] = first.config.compute_dtype
  out["optimizer"] = first.config.optimizer.name
  # One initial state for all three: on CPU, compiling a ResNet's initializers takes longer
  # than compiling its train step.
  initial = par.to_host(first.init_state())
  log(f"{spec['name']}: bare jitted step, global batch {batch}")
  batch_0 = {k: v[:batch] for k, v in train.items()}
  bare = time_bare(first, initial, batch_0, spec["steps"], spec["warmup"])
  flops = bare.pop("step_flops")
  out["num_params"] = bare.pop("num_params")
  out["step_flops"] = flops
  out["bare"] = _rates(bare, batch, flops, peak, n_dev)
  out["flaxtrain"] = {}
  for k, exp in exps.items():
    log(f"{spec['name']}: flaxtrain, steps_per_dispatch {k}")
    timing = time_flaxtrain(exp, initial, spec["steps"], spec["warmup"])
    out["flaxtrain"][str(k)] = _rates(timing, batch, flops, peak, n_dev)
  del exps
  ours = out["flaxtrain"][str(default)]["examples_per_sec"]
  out["flaxtrain_vs_bare"] = ours / out["bare"]["examples_per_sec"]
  out["vs_bare_verdict"] = "PASS" if out["flaxtrain_vs_bare"] >= TARGET_VS_BARE else "WARN"
  out["device_memory"] = benchmark.device_memory(par.devices[0])
  return out


# ------------------------------------------------------------------ workers


def worker_throughput(spec: dict) -> dict:
  import jax

  from flaxtrain import parallel

  par = parallel.DataParallel()
  dev = par.devices[0]
  peak, source = peak_bf16(dev.device_kind, dev.platform)
  out = {
    "platform": dev.platform,
    "device_kind": dev.device_kind,
    "num_devices": par.num_devices,
    "num_processes": par.num_processes,
    "peak_bf16_flops_per_device": peak,
    "peak_source": source,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "jax_version": jax.__version__,
    "models": {},
  }
  for model in model_specs(spec["tiny"], dev.platform):
    try:
      out["models"][model["name"]] = measure_model(model, par)
    except Exception as e:  # noqa: BLE001 - reported, and the other model still measured.
      log(f"{model['name']} failed: {type(e).__name__}: {e}")
      out["models"][model["name"]] = {"error": f"{type(e).__name__}: {e}"}
  return out


def determinism_spec(tiny: bool) -> dict:
  if tiny:  # The tests' small CNN: compiles in a second.
    return {"steps": 3, "per_shard_batch": 4, "shards": 4, "model": TINY_CNN}
  return {"steps": 50, "per_shard_batch": 16, "shards": 4, "model": None}


def worker_determinism(spec: dict) -> dict:
  """One short topology-invariant run of fashion_cnn; its parameters saved to spec['npz']."""
  import jax

  from flaxtrain import experiment, parallel

  devices = jax.devices()
  # Shards: a power of two that the device count divides; so the devices used are too.
  n = 1 << (len(devices).bit_length() - 1)
  shards = max(spec["shards"], n)
  par = parallel.DataParallel(devices[:n])
  batch = shards * spec["per_shard_batch"]
  model = {"name": "fashion_cnn", "config": "fashion_cnn", "model": spec["model"]}
  with synthetic_data((28, 28, 1), 10, 4 * batch, batch):
    config = make_config(model, batch, 0, spec["steps"])  # The platform's default dispatch.
    config.topology_invariant_shards = shards
    exp = experiment.Experiment(config, par)
  state, _ = _run_chunks(exp, exp.init_state(), 0, spec["steps"])
  params = par.to_host(state.params)
  flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree.leaves_with_path(params)}
  np.savez(spec["npz"], **flat)
  return {
    "devices": par.num_devices,
    "device_kind": par.devices[0].device_kind,
    "global_batch": batch,
    "shards": shards,
    "steps": spec["steps"],
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


WORKERS = {"throughput": worker_throughput, "determinism": worker_determinism}


# ------------------------------------------------------------------ orchestration


def worker_env(extra_xla_flags=()) -> dict:
  env = dict(os.environ)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  flags = " ".join([env.get("XLA_FLAGS", ""), *extra_xla_flags]).strip()
  if flags:
    env["XLA_FLAGS"] = flags
  return env


def _run(cmd: list[str], env: dict, timeout: float, forward: str | None = None):
  """(exit status, last lines of stderr); stderr lines starting with `forward` are echoed."""
  tail = collections.deque(maxlen=60)
  with subprocess.Popen(
    cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
  ) as p:

    def pump():
      for line in p.stderr:
        tail.append(line.rstrip())
        if forward and line.startswith(forward):
          print(line, end="", file=sys.stderr, flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
      rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      p.kill()
      rc = p.wait()
      tail.append(f"killed after {timeout:.0f} s")
    reader.join(timeout=10)
  return rc, "\n".join(tail)


def spawn(kind: str, spec: dict, tmp: str, env: dict, timeout: float) -> dict:
  """Runs a worker in a fresh interpreter; its result, or {'error': ..., 'stderr_tail': ...}."""
  out = os.path.join(tmp, f"{kind}-{time.monotonic_ns()}.json")
  cmd = [
    sys.executable,
    os.path.abspath(__file__),
    "--_worker",
    kind,
    json.dumps({**spec, "out": out}),
  ]
  rc, tail = _run(cmd, env, timeout, forward="[accelerator_check")
  if rc != 0 or not os.path.exists(out):
    return {"error": f"{kind} worker exited with {rc}", "stderr_tail": tail[-4000:]}
  with open(out) as f:
    return json.load(f)


def run_determinism(tiny: bool, platform: str, tmp: str, timeout: float) -> dict:
  """Two identical topology-invariant runs in two processes; bitwise-equal params or not."""
  flags = list(GPU_DETERMINISM_FLAGS) if platform == "gpu" else []
  spec = determinism_spec(tiny)
  unknown_flags = []

  def run(i):
    env = worker_env(flags)
    return spawn("determinism", {**spec, "npz": f"{tmp}/params{i}.npz"}, tmp, env, timeout)

  if platform == "cpu":  # Side by side: processes cannot share a GPU's memory or a TPU.
    log("determinism: 2 runs at once")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      runs = list(pool.map(run, range(2)))
  else:
    runs = []
    for i in range(2):
      log(f"determinism: run {i + 1} of 2")
      while True:
        result = run(i)
        unknown = re.findall(r"Unknown flags? in XLA_FLAGS: (\S+)", result.get("stderr_tail", ""))
        dropped = [f for f in flags if any(u.startswith(f.split("=")[0]) for u in unknown)]
        if not dropped:
          break
        log(f"this XLA does not know {', '.join(dropped)}: running without it")
        flags = [f for f in flags if f not in dropped]
        unknown_flags += dropped
      runs.append(result)
  out = {
    "option": "--config.topology_invariant_shards",
    "model": "fashion_cnn" + (" (TINY: features (8, 16), dense (32,))" if tiny else ""),
    "steps": spec["steps"],
    "xla_flags_added": flags,
    "xla_flags_unknown": unknown_flags,
    "runs": runs,
    "bitwise_equal": None,
    "max_abs_param_diff": None,
    "verdict": "FAIL",
  }
  if any("error" in r for r in runs):
    return out
  a, b = np.load(f"{tmp}/params0.npz"), np.load(f"{tmp}/params1.npz")
  equal = sorted(a.files) == sorted(b.files) and all(
    a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a.files
  )
  out["shards"], out["global_batch"] = runs[0]["shards"], runs[0]["global_batch"]
  out["bitwise_equal"] = equal
  out["max_abs_param_diff"] = max(
    float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) for k in a.files
  )
  out["verdict"] = "PASS" if equal else "FAIL"
  return out


def run_tests(platform: str, flags: list[str], timeout: float) -> dict:
  import importlib.util

  if importlib.util.find_spec("pytest") is None:
    return {
      "status": "failed",
      "summary": "pytest is not installed: pip install pytest, or pass --skip-tests",
      "selected": list(TESTS),
    }
  log(f"tests: {len(TESTS)} device tests on {platform}")
  t = time.perf_counter()
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS]
  env = worker_env(flags)
  # The test suite runs on the CPU unless told otherwise (tests/conftest.py): here, the
  # accelerator's devices.
  env["JAX_PLATFORMS"] = {"gpu": "cuda", "tpu": "tpu"}.get(platform, "cpu")
  with tempfile.TemporaryFile("w+") as f:
    try:
      rc = subprocess.run(
        cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
      ).returncode
    except subprocess.TimeoutExpired:
      rc = "timeout"
    f.seek(0)
    output = f.read()
  summary = next(
    (
      ln.strip("= ")
      for ln in reversed(output.splitlines())
      if re.search(r"\d+ (passed|failed)", ln)
    ),
    "no pytest summary",
  )
  log(f"tests: {summary}")
  return {
    "status": "passed" if rc == 0 else "failed",
    "exit_code": rc,
    "summary": summary,
    "selected": list(TESTS),
    "xla_flags_added": flags,
    "wall_s": time.perf_counter() - t,
    "output_tail": None if rc == 0 else output[-4000:],
  }


# ------------------------------------------------------------------ report


def _fmt(value, spec: str, none: str = "-") -> str:
  return none if value is None else format(value, spec)


def table(report: dict) -> str:
  tp = report["throughput"]
  lines = []
  kind = tp.get("device_kind", "?")
  lines.append(
    f"flaxtrain accelerator check: {tp.get('num_devices', '?')} x {kind} "
    f"({tp.get('platform', '?')}), jax {report['versions'].get('jax')}"
  )
  if report["tiny"]:
    lines.append("TINY: CPU smoke test with small models and batches; not an accelerator figure.")
  lines.append(f"detected: {report['detected']}; install: {report['install']}")
  t = report["tests"]
  ran = f" ({t['summary']}" if t.get("summary") else ""
  ran += f", {t['wall_s']:.0f} s)" if t.get("wall_s") is not None else (")" if ran else "")
  lines.append(f"tests: {t['status']}{ran}")
  peak = _fmt(tp.get("peak_bf16_flops_per_device"), ".3g")
  lines.append(f"peak: {peak} FLOP/s per device: {tp.get('peak_source')}")
  lines.append("")
  cols = (
    f"{'model':34s} {'batch':>6s} {'dispatch':>12s} {'examples/s':>11s} {'ms/step':>8s} "
    f"{'TFLOP/s':>8s} {'MFU':>6s}"
  )
  lines += [cols, "-" * len(cols)]
  for name, m in tp.get("models", {}).items():
    if "error" in m:
      lines.append(f"{name:34s} ERROR {m['error'][:80]}")
      continue
    rows = [(f"flaxtrain {k}", r) for k, r in m["flaxtrain"].items()] + [("bare jit", m["bare"])]
    for i, (label, r) in enumerate(rows):
      first = name if i == 0 else ""
      mfu = _fmt(r["mfu"] and 100 * r["mfu"], ".1f") + ("%" if r["mfu"] else "")
      lines.append(
        f"{first:34s} {m['global_batch']:6d} {label:>12s} {r['examples_per_sec']:11,.0f} "
        f"{r['step_ms']:8.2f} {_fmt(r['tflops_per_sec'], '8.3f'):>8s} {mfu:>6s}"
      )
    lines.append(
      f"{'':34s} flaxtrain (dispatch {m['default_steps_per_dispatch']}) / bare: "
      f"{m['flaxtrain_vs_bare']:.3f}  {m['vs_bare_verdict']} (target >= {TARGET_VS_BARE})"
    )
  d = report["determinism"]
  lines.append("")
  if d["bitwise_equal"] is None:
    result = f"no result ({d['runs'][-1].get('error', '?')})"
  elif d["bitwise_equal"]:
    result = "bitwise equal parameters"
  else:
    result = f"parameters differ (max |diff| {d['max_abs_param_diff']:.3g})"
  flags = " ".join(d["xla_flags_added"]) or "no XLA flags added"
  lines.append(
    f"determinism: 2 runs x {d['steps']} steps of {d['model']}, topology_invariant_shards="
    f"{d.get('shards', '?')} ({flags}): {result}  {d['verdict']}"
  )
  lines.append(f"status: {report['status']}; report: {report['report_path']}")
  return "\n".join(lines)


def failures(report: dict) -> list[str]:
  out = []
  if report["tests"]["status"] == "failed":
    out.append("tests failed")
  tp = report["throughput"]
  if "error" in tp:
    out.append("throughput worker failed")
  for name, m in tp.get("models", {}).items():
    if "error" in m:
      out.append(f"{name} measurement failed")
  if report["determinism"]["verdict"] != "PASS":
    out.append("determinism check failed")
  detected, platform = report["detected"].split()[0], tp.get("platform")
  if platform and detected in ("gpu", "tpu") and platform != detected:
    extra = {"gpu": "cuda12", "tpu": "tpu"}[detected]
    out.append(
      f"a {detected} was found but jax runs on the {platform}: pip install -e '.[{extra}]'"
    )
  return out


def versions() -> dict:
  from importlib import metadata

  out = benchmark.versions(with_torch=False)
  out.pop("torch", None)
  for name in ("jax-cuda12-plugin", "jax-cuda12-pjrt", "libtpu"):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return out


def parse_args(argv):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--out", required=True, help=f"directory for {REPORT_NAME}")
  p.add_argument(
    "--platform", default="cpu", choices=("gpu", "tpu", "cpu"), help="the device detected"
  )
  p.add_argument("--detected_by", default="", help="how it was detected (for the report)")
  p.add_argument("--install", default="skipped", help="what the install step did (for the report)")
  p.add_argument("--tiny", action="store_true", help="a CPU smoke test: small models, few steps")
  p.add_argument("--skip_tests", action="store_true", help="do not run the device tests")
  p.add_argument("--timeout", type=float, default=600, help="seconds per worker process")
  return p.parse_args(argv)


def main(argv) -> int:
  args = parse_args(argv)
  started = time.time()
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, REPORT_NAME)
  report = {
    "check": "flaxtrain accelerator check",
    "tiny": args.tiny,
    "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    "detected": f"{args.platform} ({args.detected_by or 'given'})",
    "install": args.install,
    "machine": benchmark.machine_info(),
    "versions": versions(),
    "target_vs_bare": TARGET_VS_BARE,
    "report_path": path,
  }
  with tempfile.TemporaryDirectory(prefix="accelerator-check-") as tmp:
    report["determinism"] = run_determinism(args.tiny, args.platform, tmp, args.timeout)
    if args.skip_tests:
      report["tests"] = {"status": "skipped", "selected": list(TESTS)}
    else:
      report["tests"] = run_tests(
        args.platform, report["determinism"]["xla_flags_added"], args.timeout
      )
    log("throughput: " + ("tiny models" if args.tiny else "fashion_cnn and ResNet-50"))
    report["throughput"] = spawn("throughput", {"tiny": args.tiny}, tmp, worker_env(), args.timeout)
  problems = failures(report)
  report["status"] = "FAIL: " + "; ".join(problems) if problems else "ok"
  report["wall_s"] = time.time() - started
  with open(path, "w") as f:
    json.dump(report, f, indent=2, default=str)
    f.write("\n")
  print(table(report), flush=True)
  return 1 if problems else 0


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "--_worker":
    spec = json.loads(sys.argv[3])
    result = WORKERS[sys.argv[2]](spec)
    with open(spec["out"], "w") as f:
      json.dump(result, f, default=str)
  else:
    sys.exit(main(sys.argv[1:]))
