"""Benchmarks flaxtrain as users run it, against peers; and the loop's own cost.

    make bench                      # full runs, 2 epochs: flaxtrain CLI vs PyTorch eager
                                    # and the Flax tutorial loop (scripts/bench_full.py),
                                    # then the --overhead table below
    make bench ARGS=--full          # the same, 10 epochs
    make bench ARGS=--overhead      # the loop's own cost on tiny models against the
                                    # leanest jitted loop (scripts/bench_overhead.py)
    make bench ARGS=--window        # diagnostic: a 400-step window early in training
    make bench ARGS=--input         # input pipeline only (scripts/input_benchmark.py)

The full-run and overhead modes print markdown tables (and --json_out writes the JSON);
`--rounds` (default 1, for speed: figures on a shared machine are noisy) interleaves the
contenders. `--smoke` makes every full-run "epoch" --smoke_steps steps (tests).

--window, the diagnostic (JSON on stdout): for every batch size and round, in this order,
each in a fresh subprocess (so XLA_FLAGS and device counts are clean):

  A  flaxtrain: the `flaxtrain` CLI itself (`flaxtrain.main.run()`, every flag and device
     default as a user gets them) with --config.batch_size=B and num_train_steps /
     eval_every_steps / checkpoint_every_steps = 1 + warmup + steps + 1. Timers wrap
     `Pipeline.train_batches` (host input work; the gaps between its calls are whole loop
     iterations), the compiled eval function, `Checkpointer.save` and JAX's compile events.
  B  the Flax tutorial loop, reimplemented here: the same CNN in flax.linen, optax SGD 0.1
     momentum 0.9, one `jax.jit` train step, host shuffling per epoch with numpy fancy
     indexing, float32 /255 on the host, 1 default JAX CPU device (no XLA_FLAGS).
  C  PyTorch eager, same model/optimizer/batch, torch.set_num_threads(2) (if torch imports).

Each measures steady state: `warmup` steps (compilation included) are run and discarded,
then `steps` steps are timed, input included. It leaves out what a real run carries
(per-epoch eval, permutation, checkpoint and TensorBoard writer threads) and catches
PyTorch in its first few hundred steps: use the full-run mode for comparisons. Results are
medians over rounds (default 3 here); ratios are flaxtrain / tutorial and flaxtrain /
max(tutorial, torch) at the same batch. With --window --full, also the whole config
through the CLI next to the tutorial's 10 epochs.

FLOP utilization: XLA's cost analysis of a jitted forward+backward of the model at the
per-device batch (x devices) per step, over the device's peak; on CPU over the float32
`jnp.dot` rate measured in the same invocation on 1 default CPU device.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPAWN_ENV = "FLAXTRAIN_BENCH_SPAWN_T"
DEFAULT_CONFIG = os.path.join("configs", "fashion_cnn.py")
FASHION_MNIST_TRAIN = 60_000
ISSUE_TUTORIAL_10_EPOCHS_S = 219.0  # The issue's figure for the tutorial loop on this machine.
TARGETS = {
  "throughput_vs_tutorial_b32": 1.5,
  "throughput_vs_fastest_reference_b128": 1.2,
  "full_10_epochs_wall_vs_tutorial": 0.5,
  "checkpoint_share_of_wall": 0.02,
  "time_to_first_step_s": 15.0,
}
# bfloat16 dense peaks (FLOP/s) of accelerators, by a substring of `device_kind`. CPUs (and
# anything unknown) use the matmul rate measured in the same invocation instead.
KNOWN_PEAKS = {
  "H200": 989e12,
  "H100": 989e12,
  "A100": 312e12,
  "L4": 121e12,
  "TPU v6": 918e12,
  "TPU v5p": 459e12,
  "TPU v5": 197e12,
  "TPU v4": 275e12,
}


def log(msg: str):
  print(f"[benchmark {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(values):
  values = [v for v in values if v is not None]
  return statistics.median(values) if values else None


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux.


def device_memory(device):
  """Peak/in-use bytes from `device.memory_stats()`; None where unsupported (CPU)."""
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 - some backends raise instead of returning None.
    return None
  if not stats:
    return None
  keys = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
  return {k: int(stats[k]) for k in keys if k in stats} or None


def xla_flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):  # Older JAX: one dict per computation.
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


# ---------------------------------------------------------------- worker: flaxtrain


def worker_flaxtrain(spec: dict) -> dict:
  """Runs the real CLI in this process with timers around the loop's parts.

  With spec['full'], the timers only observe (no repeated eval, no extra saves, no FLOPs).
  """
  spawn_t = float(os.environ[SPAWN_ENV])
  full = bool(spec.get("full"))
  compile_events = []  # (wall time, event, seconds)

  import jax

  from flaxtrain import (
    checkpointing,
    loop,
    main,
    models,
    parallel,
    steps,
    tasks,
  )
  from flaxtrain.data import memory
  from flaxtrain.models import analysis

  def on_event(event, seconds, **kwargs):
    if event.startswith("/jax/core/compile/"):
      name = str(kwargs.get("fun_name", "?"))
      compile_events.append((time.time(), event.rsplit("/", 1)[-1], seconds, name))

  jax.monitoring.register_event_duration_secs_listener(on_event)

  calls = []  # (enter, exit, start_step, num_steps) of every Pipeline.train_batches call.
  orig_train_batches = memory.MemorySource.train_batches

  def train_batches(self, start_step, num_steps, chunk):
    t = time.perf_counter()
    out = orig_train_batches(self, start_step, num_steps, chunk)
    calls.append((t, time.perf_counter(), start_step, num_steps))
    return out

  memory.MemorySource.train_batches = train_batches

  evals = []  # (seconds, first_call) of the compiled eval function.
  chunks = []  # (start, dispatch seconds, dispatch + compute seconds) of each train call.
  orig_compile = parallel.DataParallel.compile

  def compile_(self, fn, *args, **kwargs):
    jitted = orig_compile(self, fn, *args, **kwargs)
    name = getattr(fn, "__name__", "")
    if name == "chunk" and not full:  # Train step(s): time the dispatch.

      def timed_chunk(*a):
        # The loop does not wait here: it checks this chunk's non-finite flag after
        # dispatching the next one, so waiting shows up in the next iteration.
        t = time.perf_counter()
        out = jitted(*a)
        t_dispatched = time.perf_counter()
        chunks.append((t, t_dispatched - t, t_dispatched - t))
        return out

      return timed_chunk
    if name != "evaluate":
      return jitted

    def timed(*a):
      out = None
      # The first call compiles: time it, then time a second, identical call (pure).
      for _ in range(2 if not evals and not full else 1):
        t = time.perf_counter()
        out = jax.block_until_ready(jitted(*a))
        evals.append((time.perf_counter() - t, not evals))
      return out

    return timed

  parallel.DataParallel.compile = compile_

  saves, waits = [], []
  orig_save, orig_wait = checkpointing.Checkpointer.save, checkpointing.Checkpointer.wait

  def save(self, step, state, *a, **k):
    captured["last_saved"] = (step, state)
    t = time.perf_counter()
    try:
      return orig_save(self, step, state, *a, **k)
    finally:
      saves.append(time.perf_counter() - t)

  def wait(self):
    t = time.perf_counter()
    try:
      return orig_wait(self)
    finally:
      waits.append(time.perf_counter() - t)

  checkpointing.Checkpointer.save, checkpointing.Checkpointer.wait = save, wait

  captured = {}
  orig_load = memory.load

  def load(*a, **k):
    t = time.perf_counter()
    out = orig_load(*a, **k)
    captured["spec"], captured["data_load_s"] = out[0], time.perf_counter() - t
    return out

  memory.load = load
  orig_tae = loop.train_and_evaluate

  def train_and_evaluate(config, workdir, *a, **k):
    captured["config"], captured["t_call"] = config, time.time()
    summary = orig_tae(config, workdir, *a, **k)
    captured["summary"] = summary
    return summary

  loop.train_and_evaluate = train_and_evaluate

  sys.argv = ["flaxtrain", *spec["cli_args"]]
  try:
    main.run()
  except SystemExit as e:
    if e.code not in (0, None):
      raise RuntimeError(f"flaxtrain exited with {e.code}") from None
  end_t = time.time()
  summary = captured["summary"]
  config, ds = captured["config"], captured["spec"]
  batch = config.batch_size
  if full:
    wall = end_t - spawn_t
    saving = sum(saves) + sum(waits)
    return {
      "summary": summary,
      "process_wall_s": wall,
      "time_to_first_step_s": captured["t_call"] + summary["time_to_first_step_s"] - spawn_t,
      "checkpoints": len(saves),
      "checkpoint_s": saving,
      "checkpoint_share": saving / wall,
      "evals": len(evals),
      "eval_s": sum(s for s, _ in evals),
      "eval_share": sum(s for s, _ in evals) / wall,
      "input_share": sum(c[1] - c[0] for c in calls) / wall,
      "peak_host_memory_mib": peak_rss_mib(),
    }

  # Steady state: loop iterations whose steps come after the first dispatch and warm-up;
  # an iteration runs from one train_batches call to the next (input, step, bookkeeping).
  first = 1 + spec["warmup"]
  steady = [i for i in range(len(calls) - 1) if calls[i][2] >= first]
  loop_s = calls[steady[-1] + 1][0] - calls[steady[0]][0] if steady else None
  loop_steps = sum(calls[i][3] for i in steady)
  input_s = sum(calls[i][1] - calls[i][0] for i in steady)
  ex_per_s = loop_steps * batch / loop_s if loop_s else None
  t0, t1 = (calls[steady[0]][0], calls[steady[-1] + 1][0]) if steady else (0.0, 0.0)
  in_steady = [c for c in chunks if t0 <= c[0] < t1]
  dispatch_s = sum(c[1] for c in in_steady) if in_steady else None
  device_s = sum(c[2] for c in in_steady) if in_steady else None

  first_step_abs = captured["t_call"] + summary["time_to_first_step_s"]
  before_first = [e for e in compile_events if e[0] <= first_step_abs]
  compiling = ("backend_compile_duration", "jaxpr_to_mlir_module_duration")
  by_function = {}
  for _, ev, sec, name in before_first:
    if ev in compiling:
      by_function[name] = by_function.get(name, 0.0) + sec
  tracing = sum(sec for _, ev, sec, _ in before_first if ev == "jaxpr_trace_duration")
  top = sorted(by_function.items(), key=lambda kv: -kv[1])[:4]

  eval_first = next((s for s, first_call in evals if first_call), None)
  eval_steady = [s for s, first_call in evals if not first_call]
  eval_s = min(eval_steady) if eval_steady else None
  eval_examples = summary.get("eval_examples") or ds.num_eval

  par = parallel.DataParallel()
  n_dev = par.num_devices
  model = models.get(
    config.model, ds.num_classes, steps.DTYPES[config.compute_dtype], ds.image_shape
  )
  flops_per_device = analysis.step_flops(
    model,
    tasks.get(config.task, ds.num_classes),
    ds.image_shape,
    batch // n_dev,
    steps.DTYPES[config.compute_dtype],
  )
  step_s = batch / ex_per_s if ex_per_s else None
  steps_per_epoch = ds.num_train // batch
  first_save_s = saves[0] if saves else None
  save_s = _steady_save_s(checkpointing, captured.get("last_saved"), spec["workdir"])
  ckpt_share = None
  if first_save_s is not None and save_s is not None and step_s:
    # A run of num_epochs at the default cadence (one save per epoch; the first is slower).
    epochs = config.num_epochs
    epoch_s = steps_per_epoch * step_s + (eval_s or 0.0)
    saving = first_save_s + (epochs - 1) * save_s
    ckpt_share = saving / (epochs * epoch_s + saving)
  return {
    "batch_size": batch,
    "devices": n_dev,
    "per_device_batch": batch // n_dev,
    "platform": par.devices[0].platform,
    "device_kind": par.devices[0].device_kind,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "train_examples_per_sec": ex_per_s,
    "summary_train_examples_per_sec": summary.get("train_examples_per_sec"),
    "step_ms": 1e3 * step_s if step_s else None,
    "steady_steps": loop_steps,
    "input_wait_share": input_s / loop_s if loop_s else None,
    "input_ms_per_step": 1e3 * input_s / loop_steps if loop_steps else None,
    # One loop iteration = input + train call (dispatch) + host work (waiting for the
    # previous chunk's flag, metrics, ReportProgress, logging).
    "dispatch_ms_per_step": 1e3 * dispatch_s / loop_steps if dispatch_s else None,
    "call_ms_per_step": 1e3 * device_s / loop_steps if device_s else None,
    "host_other_ms_per_step": 1e3 * (loop_s - input_s - device_s) / loop_steps
    if device_s
    else None,
    "time_to_first_step_s": first_step_abs - spawn_t,
    "time_to_first_step_in_train_s": summary["time_to_first_step_s"],
    "first_dispatch_s": summary.get("first_dispatch_s"),
    # Before the first step: start-up (interpreter, imports, flags), data, compilation.
    "startup_s": captured["t_call"] - spawn_t,
    "data_load_s": captured.get("data_load_s"),
    "compile_s": sum(by_function.values()),
    "compile_by_function_s": dict(top),
    "trace_s": tracing,
    "eval_examples_per_sec": eval_examples / eval_s if eval_s else None,
    "eval_s": eval_s,
    "eval_first_call_s": eval_first,
    "checkpoint_first_save_s": first_save_s,
    "checkpoint_save_s": save_s,
    "checkpoint_wait_s": max(waits) if waits else None,
    "checkpoint_share_est": ckpt_share,
    "peak_host_memory_mib": peak_rss_mib(),
    "device_memory": device_memory(par.devices[0]),
    "step_flops": flops_per_device * n_dev if flops_per_device else None,
    "eval_accuracy": summary.get("eval_accuracy"),
    "wall_s": summary.get("wall_s"),
    "process_wall_s": time.time() - spawn_t,
  }


def _steady_save_s(checkpointing, last_saved, workdir: str, n: int = 3) -> float | None:
  """Median blocking time of further saves of the final state with flaxtrain's Checkpointer.

  The run's own first save also pays Orbax's one-time set-up; later saves don't.
  """
  if last_saved is None:
    return None
  step, state = last_saved
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "extra_checkpoints"))
  times = []
  for i in range(n):
    t = time.perf_counter()
    ckpt.save(step + i, state, force=True)
    times.append(time.perf_counter() - t)
  ckpt.wait()
  ckpt.close()
  return statistics.median(times)


# ---------------------------------------------------------------- worker: tutorial


def _load_arrays(spec: dict):
  """(train_images, train_labels, test_images, test_labels): uint8 NHWC, int labels."""
  import numpy as np

  if spec.get("npz"):
    d = np.load(spec["npz"])
    return d["train_image"], d["train_label"], d["test_image"], d["test_label"]
  from flaxtrain.data import memory

  _, tr, te = memory.load("fashion_mnist", data_dir=spec.get("data_dir"))
  return tr["image"], tr["label"], te["image"], te["label"]


def worker_data(spec: dict) -> dict:
  import numpy as np

  from flaxtrain.data import memory

  _, tr, te = memory.load("fashion_mnist", data_dir=spec.get("data_dir"))
  np.savez(
    spec["npz"],
    train_image=tr["image"],
    train_label=tr["label"],
    test_image=te["image"],
    test_label=te["label"],
  )
  return {"num_train": len(tr["label"]), "num_eval": len(te["label"])}


def _batches(images, labels, batch: int, seed: int = 0):
  """Host-side shuffling per epoch; numpy fancy indexing; float32 /255 on the host."""
  import numpy as np

  rng = np.random.default_rng(seed)
  n = len(labels)
  while True:
    perm = rng.permutation(n)
    for i in range(0, n - batch + 1, batch):
      idx = perm[i : i + batch]
      yield images[idx].astype(np.float32) / 255.0, labels[idx]


def _tutorial_parts():
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax
  from flax.training import train_state

  class CNN(nn.Module):
    """The Flax tutorial's CNN."""

    @nn.compact
    def __call__(self, x):
      x = nn.Conv(features=32, kernel_size=(3, 3))(x)
      x = nn.relu(x)
      x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
      x = nn.Conv(features=64, kernel_size=(3, 3))(x)
      x = nn.relu(x)
      x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
      x = x.reshape((x.shape[0], -1))
      x = nn.Dense(features=256)(x)
      x = nn.relu(x)
      return nn.Dense(features=10)(x)

  def create_state(seed=0):
    model = CNN()
    params = model.init(jax.random.key(seed), jnp.ones([1, 28, 28, 1]))["params"]
    return train_state.TrainState.create(
      apply_fn=model.apply, params=params, tx=optax.sgd(0.1, momentum=0.9)
    )

  def loss_fn(params, apply_fn, images, labels):
    logits = apply_fn({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

  @jax.jit
  def train_step(state, images, labels):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, logits), grads = grad_fn(state.params, state.apply_fn, images, labels)
    state = state.apply_gradients(grads=grads)
    return state, loss, jnp.mean(jnp.argmax(logits, -1) == labels)

  @jax.jit
  def eval_step(state, images, labels):
    logits = state.apply_fn({"params": state.params}, images)
    return jnp.sum(jnp.argmax(logits, -1) == labels)

  return create_state, loss_fn, train_step, eval_step


def _matmul_rate(n: int = 2048, reps: int = 6) -> float:
  """Best float32 FLOP/s of a jitted n x n `jnp.dot` on the default device."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    dot(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n**3 / best


def worker_tutorial(spec: dict) -> dict:
  import jax
  import jax.numpy as jnp

  create_state, loss_fn, train_step, _ = _tutorial_parts()
  train_x, train_y, _, _ = _load_arrays(spec)
  batch, warmup, steps = spec["batch_size"], spec["warmup"], spec["steps"]
  state = create_state()
  it = _batches(train_x, train_y, batch)
  for _ in range(warmup):
    state, loss, _ = train_step(state, *next(it))
  jax.block_until_ready(state)
  t = time.perf_counter()
  for _ in range(steps):
    state, loss, _ = train_step(state, *next(it))
  jax.block_until_ready((state, loss))
  seconds = time.perf_counter() - t

  x = jnp.zeros((batch, 28, 28, 1), jnp.float32)
  y = jnp.zeros((batch,), jnp.int32)
  grad = jax.jit(jax.value_and_grad(lambda p, a, b: loss_fn(p, state.apply_fn, a, b)[0]))
  flops = xla_flops(grad.lower(state.params, x, y).compile())
  return {
    "batch_size": batch,
    "devices": 1,
    "device_kind": jax.devices()[0].device_kind,
    "train_examples_per_sec": steps * batch / seconds,
    "step_ms": 1e3 * seconds / steps,
    "steady_steps": steps,
    "step_flops": flops,
    "final_loss": float(loss),
    "peak_host_memory_mib": peak_rss_mib(),
    "matmul_flops_per_sec": _matmul_rate() if spec.get("matmul") else None,
  }


def worker_tutorial_full(spec: dict) -> dict:
  """The tutorial's whole run: 10 epochs at batch 32 with a test eval per epoch."""
  import jax
  import numpy as np

  spawn_t = float(os.environ[SPAWN_ENV])
  create_state, _, train_step, eval_step = _tutorial_parts()
  train_x, train_y, test_x, test_y = _load_arrays({"data_dir": spec.get("data_dir")})
  batch, epochs = spec["batch_size"], spec["epochs"]
  state = create_state()
  it = _batches(train_x, train_y, batch)
  steps_per_epoch = len(train_y) // batch
  accuracy = None
  for _ in range(epochs):
    for _ in range(steps_per_epoch):
      state, _, _ = train_step(state, *next(it))
    correct = 0
    for i in range(0, len(test_y), batch):
      correct += eval_step(
        state, test_x[i : i + batch].astype(np.float32) / 255.0, test_y[i : i + batch]
      )
    accuracy = float(correct) / len(test_y)
  jax.block_until_ready(state)
  return {
    "batch_size": batch,
    "epochs": epochs,
    "eval_accuracy": accuracy,
    "wall_s": time.time() - spawn_t,
    "peak_host_memory_mib": peak_rss_mib(),
  }


# ---------------------------------------------------------------- worker: torch


def worker_torch(spec: dict) -> dict:
  import numpy as np
  import torch
  import torch.nn.functional as F
  from torch import nn

  torch.set_num_threads(2)
  torch.manual_seed(0)

  class CNN(nn.Module):
    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
      self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
      self.fc1 = nn.Linear(64 * 7 * 7, 256)
      self.fc2 = nn.Linear(256, 10)

    def forward(self, x):
      x = F.avg_pool2d(F.relu(self.conv1(x)), 2)
      x = F.avg_pool2d(F.relu(self.conv2(x)), 2)
      x = F.relu(self.fc1(torch.flatten(x, 1)))
      return self.fc2(x)

  model = CNN()
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
  train_x, train_y, _, _ = _load_arrays(spec)
  batch, warmup, steps = spec["batch_size"], spec["warmup"], spec["steps"]
  it = _batches(train_x, train_y.astype(np.int64), batch)

  def step():
    images, labels = next(it)
    x = torch.from_numpy(images).reshape(batch, 1, 28, 28)  # NHWC with C=1 == NCHW.
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), torch.from_numpy(labels))
    loss.backward()
    opt.step()
    return loss

  for _ in range(warmup):
    step()
  t = time.perf_counter()
  for _ in range(steps):
    loss = step()
  seconds = time.perf_counter() - t
  return {
    "batch_size": batch,
    "threads": torch.get_num_threads(),
    "train_examples_per_sec": steps * batch / seconds,
    "step_ms": 1e3 * seconds / steps,
    "steady_steps": steps,
    "final_loss": float(loss),
    "peak_host_memory_mib": peak_rss_mib(),
  }


WORKERS = {
  "flaxtrain": worker_flaxtrain,
  "tutorial": worker_tutorial,
  "tutorial_full": worker_tutorial_full,
  "torch": worker_torch,
  "data": worker_data,
}


def run_worker_main(kind: str, spec_json: str):
  spec = json.loads(spec_json)
  if kind.startswith("input_"):  # --input's workers (scripts/input_benchmark.py).
    result = _input_benchmark().WORKERS[kind](spec)
  elif kind.startswith("full_"):
    result = _sibling("bench_full").WORKERS[kind](spec)
  elif kind.startswith("overhead_"):
    result = _sibling("bench_overhead").WORKERS[kind](spec)
  else:
    result = WORKERS[kind](spec)
  with open(spec["out"], "w") as f:
    json.dump(result, f)


def _input_benchmark():
  """scripts/input_benchmark.py: the --input mode (input pipeline only)."""
  return _sibling("input_benchmark")


def _sibling(name: str):
  """A module of scripts/ (bench_full, bench_overhead, input_benchmark)."""
  import importlib

  here = os.path.dirname(os.path.abspath(__file__))
  if here not in sys.path:
    sys.path.insert(0, here)
  return importlib.import_module(name)


# ---------------------------------------------------------------- orchestration


def clean_env(keep_xla_flags: bool) -> dict:
  env = dict(os.environ)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if not keep_xla_flags:
    env.pop("XLA_FLAGS", None)
  return env


def _cpu_snapshot():
  """(wall, busy CPU seconds of the whole machine, CPU seconds of our finished children)."""
  try:
    with open("/proc/stat") as f:
      fields = [int(v) for v in f.readline().split()[1:]]
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError):
    busy = None
  ru = resource.getrusage(resource.RUSAGE_CHILDREN)
  return time.time(), busy, ru.ru_utime + ru.ru_stime


def _others_share(before, after) -> float | None:
  """Share of the machine's CPU time used by other processes between two snapshots."""
  wall = after[0] - before[0]
  if before[1] is None or after[1] is None or wall <= 0:
    return None
  others = (after[1] - before[1]) - (after[2] - before[2])
  return max(0.0, others / (wall * (os.cpu_count() or 1)))


def wait_for_quiet(max_wait_s: float, threshold: float = 0.15):
  """Waits (up to max_wait_s) until other processes use < threshold of the CPUs."""
  deadline = time.time() + max_wait_s
  while True:
    a = _cpu_snapshot()
    time.sleep(1.0)
    share = _others_share(a, _cpu_snapshot())
    if share is None or share < threshold or time.time() >= deadline:
      return share
    time.sleep(2.0)


def run_measured(cmd, env, timeout=None, quiet_wait=0.0):
  """subprocess.run with the CPU share other processes took meanwhile."""
  if quiet_wait > 0:
    wait_for_quiet(quiet_wait)
  before = _cpu_snapshot()
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  return r, _others_share(before, _cpu_snapshot())


def spawn(
  kind: str,
  spec: dict,
  tmp: str,
  *,
  keep_xla_flags=False,
  timeout=None,
  quiet_wait=0.0,
  progress_notes=False,
) -> dict:
  """Runs a worker in a fresh interpreter; returns its result or {'error': ...}."""
  fd, out = tempfile.mkstemp(prefix=f"{kind}-", suffix=".json", dir=tmp)
  os.close(fd)
  spec = {**spec, "out": out}
  env = clean_env(keep_xla_flags)
  cmd = [sys.executable, os.path.abspath(__file__), "--_worker", kind, "--_spec", json.dumps(spec)]
  if quiet_wait > 0:
    wait_for_quiet(quiet_wait)
  env[SPAWN_ENV] = repr(time.time())
  r, others = run_measured(cmd, env, timeout=timeout)
  if r.returncode != 0 or not os.path.getsize(out):
    tail = (r.stderr or "")[-3000:]
    log(f"{kind} worker failed (exit {r.returncode}):\n{tail}")
    return {"error": f"exit {r.returncode}", "stderr_tail": tail}
  with open(out) as f:
    result = json.load(f)
  result["others_cpu_share"] = others
  if progress_notes:
    result["report_progress"] = parse_progress_notes(r.stderr)
  return result


def machine_info() -> dict:
  model = None
  try:
    with open("/proc/cpuinfo") as f:
      model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
  except OSError:
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return {
    "cpu": model or platform.processor() or platform.machine(),
    "cores": cores,
    "os": platform.platform(),
    "loadavg_start": os.getloadavg(),
  }


def versions(with_torch: bool) -> dict:
  from importlib import metadata

  out = {"python": platform.python_version()}
  for name in ("jax", "jaxlib", "flax", "optax", "numpy", "orbax-checkpoint"):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  out["torch"] = torch_version() if with_torch else None
  return out


def torch_version() -> str | None:
  try:
    import importlib.util
    from importlib import metadata

    if importlib.util.find_spec("torch") is None:
      return None
    return metadata.version("torch")
  except Exception:  # noqa: BLE001
    return None


def torch_importable() -> bool:
  r = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True)
  return r.returncode == 0


def passthrough_value(args: list[str], key: str) -> str | None:
  for a in args:
    if a.startswith(f"--config.{key}="):
      return a.split("=", 1)[1]
  return None


AGGREGATED = (
  "train_examples_per_sec",
  "summary_train_examples_per_sec",
  "step_ms",
  "input_wait_share",
  "input_ms_per_step",
  "dispatch_ms_per_step",
  "call_ms_per_step",
  "host_other_ms_per_step",
  "time_to_first_step_s",
  "time_to_first_step_in_train_s",
  "first_dispatch_s",
  "startup_s",
  "data_load_s",
  "compile_s",
  "trace_s",
  "eval_examples_per_sec",
  "eval_s",
  "eval_first_call_s",
  "checkpoint_first_save_s",
  "checkpoint_save_s",
  "checkpoint_wait_s",
  "checkpoint_share_est",
  "peak_host_memory_mib",
  "flop_utilization",
  "achieved_flops_per_sec",
  "others_cpu_share",
)


def aggregate(runs: list[dict]) -> dict:
  ok = [r for r in runs if "error" not in r]
  if not ok:
    return {
      "error": runs[0].get("error") if runs else "not run",
      "stderr_tail": runs[0].get("stderr_tail") if runs else None,
    }
  out = {k: v for k, v in ok[-1].items() if k not in AGGREGATED}
  for k in AGGREGATED:
    if any(k in r for r in ok):
      out[k] = median(r.get(k) for r in ok)
  out["peak_host_memory_mib"] = max(r["peak_host_memory_mib"] for r in ok)
  out["train_examples_per_sec_rounds"] = [r["train_examples_per_sec"] for r in ok]
  out["others_cpu_share_rounds"] = [r.get("others_cpu_share") for r in ok]
  out["rounds_ok"] = len(ok)
  if len(ok) < len(runs):
    out["rounds_failed"] = len(runs) - len(ok)
  return out


def add_utilization(run: dict, peak: float | None):
  if "error" in run or not run.get("step_flops") or not run.get("train_examples_per_sec"):
    return
  rate = run["step_flops"] * run["train_examples_per_sec"] / run["batch_size"]
  run["achieved_flops_per_sec"] = rate
  run["flop_utilization"] = rate / peak if peak else None


def peak_for(flax_run: dict, measured: float | None) -> tuple[float | None, str]:
  kind = flax_run.get("device_kind", "")
  if flax_run.get("platform") not in (None, "cpu"):
    for name, peak in KNOWN_PEAKS.items():
      if name.lower() in kind.lower():
        return peak, f"{name} bfloat16 dense peak (datasheet)"
  return (
    measured,
    "float32 jnp.dot 2048x2048, best of 6, 1 default JAX CPU device, measured in this invocation",
  )


def ratio(a, b):
  return a / b if a and b else None


def run_full(args, passthrough, tmp) -> dict:
  """The whole config through the CLI (in a worker that only observes), then the tutorial."""
  out = {"issue_tutorial_10_epochs_wall_s": ISSUE_TUTORIAL_10_EPOCHS_S}
  cli = [f"--config={args.config}", f"--workdir={os.path.join(tmp, 'full')}", *passthrough]
  log(f"full: flaxtrain {' '.join(cli)}")
  flax_full = spawn(
    "flaxtrain",
    {"cli_args": cli, "full": True},
    tmp,
    keep_xla_flags=True,
    quiet_wait=args.quiet_wait,
    progress_notes=True,
  )
  flax_full["command"] = " ".join(["flaxtrain", *cli])
  wall = flax_full.get("process_wall_s")
  out["flaxtrain"] = flax_full
  # As many epochs as flaxtrain ran (10 for configs/fashion_cnn.py).
  summary = flax_full.get("summary") or {}
  epochs = 10
  if summary.get("step") and summary.get("batch_size"):
    epochs = max(1, round(summary["step"] * summary["batch_size"] / FASHION_MNIST_TRAIN))
  out["epochs"] = epochs
  if args.full_tutorial:
    log(f"full: the tutorial loop, {epochs} epochs at batch 32")
    out["tutorial"] = spawn(
      "tutorial_full",
      {"batch_size": 32, "epochs": epochs, "data_dir": args.data_dir},
      tmp,
      quiet_wait=args.quiet_wait,
    )
  tut_wall = (out.get("tutorial") or {}).get("wall_s")
  out["wall_vs_tutorial_measured"] = ratio(wall, tut_wall)
  issue = ratio(wall, ISSUE_TUTORIAL_10_EPOCHS_S) if epochs == 10 else None
  out["wall_vs_tutorial_issue_figure"] = issue
  return out


def parse_progress_notes(stderr: str) -> dict:
  """Shares of checkpoint and eval time from ReportProgress's last work-unit notes line."""
  import re

  notes = [ln for ln in stderr.splitlines() if "Setting work unit notes:" in ln]
  if not notes:
    return {}
  last = notes[-1].split("Setting work unit notes:", 1)[1].strip()
  shares = {
    f"{name}_share": float(pct) / 100.0
    for pct, name in re.findall(r"([0-9.]+)% ([a-z_]+)", last.split("(", 1)[-1])
  }
  return {"progress_notes": last, **shares}


def targets_report(results: dict, full: dict | None) -> dict:
  def t(value, target, better):
    met = None if value is None else (value >= target if better == "higher" else value <= target)
    return {"value": value, "target": target, "met": met}

  out = {}
  r32 = results.get("32", {}).get("ratios", {})
  r128 = results.get("128", {}).get("ratios", {})
  out["throughput_vs_tutorial_b32"] = t(
    r32.get("flaxtrain_vs_tutorial"), TARGETS["throughput_vs_tutorial_b32"], "higher"
  )
  out["throughput_vs_fastest_reference_b128"] = t(
    r128.get("flaxtrain_vs_fastest_reference"),
    TARGETS["throughput_vs_fastest_reference_b128"],
    "higher",
  )
  ttfs = [
    b["flaxtrain"].get("time_to_first_step_s")
    for b in results.values()
    if "error" not in b["flaxtrain"]
  ]
  out["time_to_first_step_s"] = t(
    max(ttfs) if ttfs else None, TARGETS["time_to_first_step_s"], "lower"
  )
  ckpt, source = None, None
  if full and full["flaxtrain"].get("checkpoint_share") is not None:
    ckpt = full["flaxtrain"]["checkpoint_share"]
    source = "full run: blocking Checkpointer.save/wait time over process wall time"
  else:  # The config's own batch (128 for fashion_cnn) first.
    for b in sorted(results, key=lambda b: b != "128"):
      if results[b]["flaxtrain"].get("checkpoint_share_est") is not None:
        ckpt = results[b]["flaxtrain"]["checkpoint_share_est"]
        source = f"estimate from the batch-{b} runs: one save per epoch, first save slower"
        break
  out["checkpoint_share_of_wall"] = {
    **t(ckpt, TARGETS["checkpoint_share_of_wall"], "lower"),
    "source": source,
  }
  if full:
    ref = full.get("wall_vs_tutorial_measured")
    out["full_10_epochs_wall_vs_tutorial"] = {
      **t(
        ref if ref is not None else full.get("wall_vs_tutorial_issue_figure"),
        TARGETS["full_10_epochs_wall_vs_tutorial"],
        "lower",
      ),
      "vs_issue_figure": full.get("wall_vs_tutorial_issue_figure"),
      "epochs": full.get("epochs"),
    }
  else:
    out["full_10_epochs_wall_vs_tutorial"] = {
      "value": None,
      "met": None,
      "target": TARGETS["full_10_epochs_wall_vs_tutorial"],
      "note": "run with --full",
    }
  return out


def parse_args(argv):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--config", default=DEFAULT_CONFIG, help="flaxtrain config file")
  p.add_argument("--batch_sizes", default="32,128", help="comma-separated global batch sizes")
  p.add_argument(
    "--rounds",
    type=int,
    default=None,
    help="interleaved rounds per measurement (default 1; 3 with --window)",
  )
  p.add_argument(
    "--epochs", type=int, default=None, help="full runs: epochs (default 2, 10 with --full)"
  )
  p.add_argument(
    "--smoke",
    action="store_true",
    help="full runs: every epoch is --smoke_steps steps (a quick check of the script)",
  )
  p.add_argument("--smoke_steps", type=int, default=5, help=argparse.SUPPRESS)
  p.add_argument(
    "--window",
    action="store_true",
    help="diagnostic: the old 400-step window (--steps, --warmup), JSON on stdout",
  )
  p.add_argument(
    "--overhead",
    action="store_true",
    help="the loop's own cost: tiny models, flaxtrain vs the leanest jitted loop",
  )
  p.add_argument("--overhead_steps", type=int, default=20000, help="--overhead: steps per run")
  p.add_argument("--overhead_batch", type=int, default=32, help="--overhead: batch size")
  p.add_argument(
    "--overhead_models", default="mlp,logreg", help="--overhead: comma-separated, of mlp,logreg"
  )
  p.add_argument("--steps", type=int, default=400, help="--window: steady-state steps")
  p.add_argument(
    "--warmup",
    type=int,
    default=50,
    help="--window: steps run and discarded before timing (compilation included)",
  )
  p.add_argument("--skip_torch", action="store_true", help="do not run PyTorch eager")
  p.add_argument("--skip_tutorial", action="store_true", help="do not run the tutorial loop")
  p.add_argument(
    "--skip_jax", action="store_true", help="full runs: do not run the leanest jitted JAX loop"
  )
  p.add_argument(
    "--full",
    action="store_true",
    help="full runs of 10 epochs (--window --full: also the whole config through the CLI)",
  )
  p.add_argument(
    "--full_tutorial",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="with --full: measure the tutorial's 10 epochs (else only the issue's "
    f"{ISSUE_TUTORIAL_10_EPOCHS_S:.0f} s)",
  )
  p.add_argument("--json_out", default=None, help="also write the JSON here")
  p.add_argument(
    "--input",
    action="store_true",
    help="benchmark only the input pipeline: flaxtrain's streamed preprocessing vs the Flax "
    "ImageNet example's tf.data (scripts/input_benchmark.py; `--input --help` for its flags)",
  )
  p.add_argument(
    "--quiet_wait",
    type=float,
    default=30.0,
    help="before each measurement, wait up to this many seconds for other processes to "
    "leave the CPUs idle (0: don't); the share they took is reported as others_cpu_share",
  )
  p.add_argument(
    "--data_dir", default=None, help="TFDS data dir for the references (default: TFDS_DATA_DIR)"
  )
  args, rest = p.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    p.error(f"unknown arguments {bad} (only --config.* overrides pass through to flaxtrain)")
  args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
  args.overhead_models = [m for m in args.overhead_models.split(",") if m.strip()]
  if args.rounds is None:
    args.rounds = 3 if args.window else 1
  if args.window and args.overhead:
    p.error("choose one of --window and --overhead")
  if args.steps < 2 or args.warmup < 1 or args.rounds < 1 or not args.batch_sizes:
    p.error("need --steps >= 2, --warmup >= 1, --rounds >= 1 and at least one batch size")
  if args.epochs is not None and args.epochs < 1 or args.smoke_steps < 1:
    p.error("need --epochs >= 1 and --smoke_steps >= 1")
  if args.overhead_steps < 50 or set(args.overhead_models) - {"mlp", "logreg"}:
    p.error("need --overhead_steps >= 50 and --overhead_models among mlp,logreg")
  args.data_dir = args.data_dir or passthrough_value(rest, "dataset.data_dir")
  return args, rest


def print_report(report: dict, json_out: str | None) -> None:
  """Prints the JSON report, and writes it to `json_out` too when given."""
  text = json.dumps(report, indent=2, default=str)
  if json_out:
    with open(json_out, "w") as f:
      f.write(text + "\n")
  print(text, flush=True)


def main(argv):
  if "--input" in argv:  # Input pipeline only: its own flags (scripts/input_benchmark.py).
    return _input_benchmark().main([a for a in argv if a != "--input"])
  args, passthrough = parse_args(argv)
  if args.overhead:
    if passthrough:
      raise SystemExit("benchmark: --overhead takes no --config.* overrides")
    return _sibling("bench_overhead").main(args)
  if not args.window:
    return _sibling("bench_full").main(args, passthrough)
  return main_window(args, passthrough)


def main_window(args, passthrough):
  """--window: the 400-step diagnostic; the JSON report on stdout."""
  use_torch = not args.skip_torch and torch_importable()
  if not args.skip_torch and not use_torch:
    log("torch is not importable: skipping PyTorch eager")
  started = time.time()
  report = {
    "benchmark": "flaxtrain vs the Flax tutorial loop"
    + (" and PyTorch eager" if use_torch else ""),
    "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    "machine": machine_info(),
    "versions": versions(use_torch),
    "settings": {
      "config": args.config,
      "batch_sizes": args.batch_sizes,
      "steps": args.steps,
      "warmup": args.warmup,
      "rounds": args.rounds,
      "torch": use_torch,
      "full": args.full,
      "overrides": passthrough,
      "quiet_wait_s": args.quiet_wait,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
    },
  }
  runs = {b: {"flaxtrain": [], "tutorial": [], "torch": []} for b in args.batch_sizes}
  matmul = []
  with tempfile.TemporaryDirectory(prefix="flaxtrain-bench-") as tmp:
    npz = os.path.join(tmp, "fashion_mnist.npz")
    per_round = (0 if args.skip_tutorial else 1) + (1 if use_torch else 0)
    if per_round * args.rounds * len(args.batch_sizes) > 1:  # Decode TFDS once for them.
      data = spawn("data", {"npz": npz, "data_dir": args.data_dir}, tmp)
      if "error" in data:
        raise SystemExit("benchmark: could not load Fashion-MNIST for the references")
    total = 1 + args.warmup + args.steps + 1  # first dispatch, warm-up, timed, last.
    for rnd in range(args.rounds):
      for b in args.batch_sizes:
        log(f"round {rnd + 1}/{args.rounds}, batch {b}: flaxtrain")
        workdir = os.path.join(tmp, f"w{rnd}-{b}")
        cli = [
          f"--config={args.config}",
          f"--workdir={workdir}",
          f"--config.batch_size={b}",
          f"--config.num_train_steps={total}",
          f"--config.eval_every_steps={total}",
          f"--config.checkpoint_every_steps={total}",
          *passthrough,
        ]
        runs[b]["flaxtrain"].append(
          spawn(
            "flaxtrain",
            {"cli_args": cli, "warmup": args.warmup, "workdir": workdir},
            tmp,
            keep_xla_flags=True,
            quiet_wait=args.quiet_wait,
          )
        )
        ref = {
          "batch_size": b,
          "warmup": args.warmup,
          "steps": args.steps,
          "npz": npz if os.path.exists(npz) else None,
          "data_dir": args.data_dir,
        }
        if not args.skip_tutorial:
          log(f"round {rnd + 1}/{args.rounds}, batch {b}: tutorial loop")
          r = spawn(
            "tutorial", {**ref, "matmul": b == args.batch_sizes[0]}, tmp, quiet_wait=args.quiet_wait
          )
          if r.get("matmul_flops_per_sec"):
            matmul.append(r["matmul_flops_per_sec"])
          runs[b]["tutorial"].append(r)
        if use_torch:
          log(f"round {rnd + 1}/{args.rounds}, batch {b}: torch eager")
          runs[b]["torch"].append(spawn("torch", ref, tmp, quiet_wait=args.quiet_wait))
    full = run_full(args, passthrough, tmp) if args.full else None

  measured_peak = max(matmul) if matmul else None
  results = {}
  for b in args.batch_sizes:
    first_ok = next((r for r in runs[b]["flaxtrain"] if "error" not in r), {})
    peak, peak_source = peak_for(first_ok, measured_peak)
    for r in runs[b]["flaxtrain"]:
      add_utilization(r, peak)
    for r in runs[b]["tutorial"]:
      add_utilization(r, measured_peak)
    entry = {"flaxtrain": aggregate(runs[b]["flaxtrain"])}
    if runs[b]["tutorial"]:
      entry["tutorial"] = aggregate(runs[b]["tutorial"])
    if runs[b]["torch"]:
      entry["torch"] = aggregate(runs[b]["torch"])
    speed = {k: v.get("train_examples_per_sec") for k, v in entry.items()}
    refs = [speed.get("tutorial"), speed.get("torch")]
    fastest = max((v for v in refs if v), default=None)
    entry["ratios"] = {
      "flaxtrain_vs_tutorial": ratio(speed["flaxtrain"], speed.get("tutorial")),
      "flaxtrain_vs_torch": ratio(speed["flaxtrain"], speed.get("torch")),
      "flaxtrain_vs_fastest_reference": ratio(speed["flaxtrain"], fastest),
      "fastest_reference": None
      if fastest is None
      else ("tutorial" if fastest == speed.get("tutorial") else "torch"),
    }
    entry["peak_flops_per_sec"], entry["peak_source"] = peak, peak_source
    results[str(b)] = entry
  report["matmul_flops_per_sec"] = measured_peak
  report["results"] = results
  report["full"] = full
  report["targets"] = targets_report(results, full)
  report["machine"]["loadavg_end"] = os.getloadavg()
  report["benchmark_wall_s"] = time.time() - started
  print_report(report, args.json_out)
  failed = any("error" in e["flaxtrain"] for e in results.values())
  return 1 if failed else 0


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "--_worker":
    run_worker_main(sys.argv[2], sys.argv[4])
  else:
    sys.exit(main(sys.argv[1:]))
