"""`make bench` (the default): whole runs of the flaxtrain CLI against peers, as users get them.

    make bench                      # 2 epochs, batch 32 and 128, 1 round
    make bench ARGS=--full          # 10 epochs
    make bench ARGS="--rounds=3 --batch_sizes=128"

Contenders, each a fresh process, interleaved per round (the order rotates every round):

  flaxtrain  `flaxtrain --config=<config> --config.batch_size=B --config.num_epochs=N` with
             its default cadence: eval and checkpoint every epoch, TensorBoard, the log file.
  torch      an independent PyTorch eager loop as a competent user writes it: the config's
             CNN (same layers, torch's default init), data resident as float tensors, one
             `torch.randperm` per epoch, the config's optimizer and schedule (AdamW with
             decay on kernels only, linear warmup then cosine, stepped every batch), torch's
             stock settings (default threads, no torch.compile), an eval of the test split
             every epoch under `torch.inference_mode()`.
  jax        the leanest correct jitted JAX loop of the same config: flaxtrain's own
             model module and optimizer (same recipe), the uint8 splits and each epoch's
             permutation resident on JAX's default single CPU device, the state donated,
             one jitted step per batch, an exact jitted eval of the test split every
             epoch. What a competent JAX user writes by hand, and what XLA:CPU's kernels
             allow with nothing of a training loop around them.
  tutorial   the Flax tutorial loop (SGD 0.1, momentum 0.9, host shuffling per epoch,
             /255 on the host, test eval every epoch at the train batch size): its own
             recipe, as in the tutorial.

Per contender: the wall time of every epoch (epoch 1 counts from process start, so it holds
start-up and compilation; each later one holds that epoch's training, eval and, for
flaxtrain, the blocking part of its checkpoint save), examples/s over epochs 2..N (eval and
checkpoint pauses included: what a user waits for), the train-only rate (peers: their train
loops alone; flaxtrain: summary.json's steady-state figure, which leaves the pauses out),
the wall time from process start to the end of the final eval, and the final test accuracy.

flaxtrain records no per-epoch wall times itself: they come from the timestamps of its
per-eval "Step N: eval ..." lines in <workdir>/flaxtrain.log (written by the main thread
after the eval and the blocking part of the save). A loop that wrote `epoch_wall_s` (a
list) into summary.json would be used instead.
"""

import datetime
import functools
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

import benchmark as bench

FASHION_MNIST_TRAIN = 60_000
CONTENDERS = ("flaxtrain", "torch", "jax", "tutorial")


# ---------------------------------------------------------------- flaxtrain's outputs

# absl's format: "I1202 11:32:13.947971 139813439163264 loop.py:226] Step 10: eval loss ...".
_EVAL_LINE = re.compile(
  r"^[IWE](\d{2})(\d{2}) (\d{2}):(\d{2}):(\d{2}\.\d+) +\d+ [^\]]*\] Step (\d+): eval "
)
_RUN_HEADER = re.compile(r"^---- flaxtrain (\d{4})-")


def parse_eval_times(log_text: str) -> list[tuple[int, float]]:
  """(step, unix time) of every per-eval line of the last run in a flaxtrain.log."""
  lines = log_text.splitlines()
  start = max((i for i, ln in enumerate(lines) if _RUN_HEADER.match(ln)), default=-1)
  year = int(_RUN_HEADER.match(lines[start]).group(1)) if start >= 0 else time.localtime().tm_year
  out = []
  for ln in lines[start + 1 :]:
    m = _EVAL_LINE.match(ln)
    if not m:
      continue
    month, day, hour, minute, sec, step = m.groups()
    whole = time.mktime((year, int(month), int(day), int(hour), int(minute), 0, 0, 0, -1))
    out.append((int(step), whole + float(sec)))
  return out


def epoch_walls(start_t: float, ends: list[float]) -> list[float]:
  """Per-epoch wall times from the process start and each epoch's end time."""
  return [b - a for a, b in zip([start_t, *ends[:-1]], ends, strict=True)]


def rate_after_first(walls: list[float] | None, examples_per_epoch: int) -> float | None:
  """Examples/s over epochs 2..N (None with fewer than 2 epochs)."""
  if not walls or len(walls) < 2:
    return None
  return (len(walls) - 1) * examples_per_epoch / sum(walls[1:])


def flaxtrain_result(workdir: str, start_t: float, end_t: float, epoch_steps: int, batch: int):
  """A finished CLI run's figures from its workdir (summary.json, flaxtrain.log)."""
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  log_path = os.path.join(workdir, "flaxtrain.log")
  with open(log_path, encoding="utf-8", errors="replace") as f:
    log_text = f.read()
  evals = [(s, t) for s, t in parse_eval_times(log_text) if s % epoch_steps == 0]
  walls = summary.get("epoch_wall_s")
  source = "summary.json epoch_wall_s"
  if not walls and evals:
    walls = epoch_walls(start_t, [t for _, t in evals])
    source = "flaxtrain.log eval-line timestamps"
  out = {
    "epochs_seen": len(walls or []),
    "epoch_wall_s": walls,
    "epoch_times_source": source if walls else "not recorded",
    "examples_per_sec": rate_after_first(walls, epoch_steps * batch),
    "train_examples_per_sec": summary.get("train_examples_per_sec"),
    "wall_to_final_eval_s": (evals[-1][1] - start_t) if evals else None,
    "process_wall_s": end_t - start_t,
    "eval_accuracy": summary.get("eval_accuracy"),
    "devices": summary.get("devices"),
    "time_to_first_step_s": summary.get("time_to_first_step_s"),
    "in_process_wall_s": summary.get("wall_s"),
    "step": summary.get("step"),
  }
  out.update(bench.parse_progress_notes(log_text))  # Shares of eval and checkpoint time.
  return out


def flaxtrain_command() -> list[str]:
  exe = os.path.join(os.path.dirname(sys.executable), "flaxtrain")
  return [exe] if os.path.exists(exe) else [sys.executable, "-m", "flaxtrain"]


def run_flaxtrain(args, batch, epochs, epoch_steps, passthrough, tmp, tag) -> dict:
  workdir = os.path.join(tmp, f"flaxtrain-{tag}")
  cli = [
    f"--config={args.config}",
    f"--workdir={workdir}",
    f"--config.batch_size={batch}",
    f"--config.num_epochs={epochs}",
  ]
  if args.smoke:  # Tiny "epochs": the cadence follows them, as it follows real ones.
    cli += [
      f"--config.num_train_steps={epochs * epoch_steps}",
      f"--config.eval_every_steps={epoch_steps}",
    ]
  cli += passthrough
  cmd = flaxtrain_command() + cli
  env = bench.clean_env(keep_xla_flags=True)
  if args.quiet_wait > 0:
    bench.wait_for_quiet(args.quiet_wait)
  start_t = time.time()
  r, others = bench.run_measured(cmd, env)
  end_t = time.time()
  if r.returncode != 0:
    tail = (r.stderr or "")[-3000:]
    bench.log(f"flaxtrain failed (exit {r.returncode}):\n{tail}")
    return {"error": f"exit {r.returncode}", "stderr_tail": tail}
  try:
    out = flaxtrain_result(workdir, start_t, end_t, epoch_steps, batch)
  except (OSError, ValueError) as e:
    return {"error": f"could not read the workdir: {e}"}
  out["command"] = " ".join(["flaxtrain", *cli])
  out["others_cpu_share"] = others
  shutil.rmtree(workdir, ignore_errors=True)  # Checkpoints: tens of MiB per run.
  return out


# ---------------------------------------------------------------- peers (workers)


def _torch_schedule(recipe: dict, steps_per_epoch: int, total_steps: int):
  """The config's schedule as a multiplier of the peak rate, per optimizer step (optax's)."""
  import math

  name = recipe["schedule"]
  warmup = int(round(recipe["warmup_epochs"] * steps_per_epoch))
  end = recipe["end_factor"]

  def factor(step: int) -> float:
    if name == "constant":
      return 1.0
    if name == "cosine":
      t = min(step, total_steps) / max(total_steps, 1)
      return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * t))
    if step < warmup:  # warmup_cosine: 0 -> peak linearly, then cosine down to end.
      return step / warmup
    span = max(total_steps, warmup + 1) - warmup
    t = min(step - warmup, span) / span
    return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * t))

  return factor


def worker_torch(spec: dict) -> dict:
  """A PyTorch eager run of the config's CNN and recipe; per-epoch times and accuracy."""
  spawn_t = float(os.environ[bench.SPAWN_ENV])
  import numpy as np
  import torch
  import torch.nn.functional as F
  from torch import nn

  torch.manual_seed(spec.get("seed", 0))
  recipe, batch, epochs = spec["recipe"], spec["batch_size"], spec["epochs"]
  train_x, train_y, test_x, test_y = bench._load_arrays(spec)

  def tensors(x, y):  # Resident once: NCHW float32 in [0, 1], int64 labels.
    x = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255.0)
    return x.contiguous(), torch.from_numpy(y.astype(np.int64))

  (xtr, ytr), (xte, yte) = tensors(train_x, train_y), tensors(test_x, test_y)
  layers, channels, side = [], xtr.shape[1], xtr.shape[2]
  for f in recipe["features"]:
    layers += [nn.Conv2d(channels, f, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2)]
    channels, side = f, side // 2
  layers.append(nn.Flatten())
  width = channels * side * side
  for d in recipe["dense"]:
    layers += [nn.Linear(width, d), nn.ReLU()]
    width = d
  layers.append(nn.Linear(width, recipe["num_classes"]))
  model = nn.Sequential(*layers)

  # Decay on kernels only (the config's weight_decay_mask='kernels'), or on everything.
  decay = [p for p in model.parameters() if p.ndim > 1 or recipe["decay_all"]]
  no_decay = [p for p in model.parameters() if p.ndim <= 1 and not recipe["decay_all"]]
  wd = recipe["weight_decay"]
  groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
  lr = recipe["learning_rate"]
  if recipe["optimizer"] == "adamw":
    opt = torch.optim.AdamW(groups, lr=lr, betas=(recipe["b1"], recipe["b2"]), eps=recipe["eps"])
  elif recipe["optimizer"] == "adam":  # Coupled decay, as optax.add_decayed_weights.
    opt = torch.optim.Adam(groups, lr=lr, betas=(recipe["b1"], recipe["b2"]), eps=recipe["eps"])
  else:
    opt = torch.optim.SGD(
      groups, lr=lr, momentum=recipe["momentum"] or 0.0, nesterov=recipe["nesterov"]
    )
  n = len(ytr)
  steps_per_epoch = spec.get("epoch_steps") or n // batch
  full_epoch = n // batch
  sched = torch.optim.lr_scheduler.LambdaLR(
    opt, _torch_schedule(recipe, full_epoch, epochs * steps_per_epoch)
  )
  ends, train_s, accuracy = [], [], None
  for _ in range(epochs):
    t = time.perf_counter()
    model.train()
    perm = torch.randperm(n)
    for i in range(steps_per_epoch):
      idx = perm[i * batch : (i + 1) * batch]
      loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      sched.step()
    train_s.append(time.perf_counter() - t)
    model.eval()
    correct = 0
    with torch.inference_mode():
      for i in range(0, len(yte), spec["eval_batch_size"]):
        logits = model(xte[i : i + spec["eval_batch_size"]])
        correct += int((logits.argmax(1) == yte[i : i + spec["eval_batch_size"]]).sum())
    accuracy = correct / len(yte)
    ends.append(time.time())
  return _peer_result(spawn_t, ends, train_s, steps_per_epoch * batch, accuracy) | {
    "threads": torch.get_num_threads(),
    "torch": torch.__version__,
    "final_loss": float(loss.detach()),
  }


def worker_tutorial(spec: dict) -> dict:
  """The Flax tutorial's loop and recipe; per-epoch times and accuracy."""
  spawn_t = float(os.environ[bench.SPAWN_ENV])
  import jax
  import numpy as np

  create_state, _, train_step, eval_step = bench._tutorial_parts()
  train_x, train_y, test_x, test_y = bench._load_arrays(spec)
  batch, epochs = spec["batch_size"], spec["epochs"]
  state = create_state()
  it = bench._batches(train_x, train_y, batch)
  steps_per_epoch = spec.get("epoch_steps") or len(train_y) // batch
  ends, train_s, accuracy = [], [], None
  for _ in range(epochs):
    t = time.perf_counter()
    for _ in range(steps_per_epoch):
      state, loss, _ = train_step(state, *next(it))
    jax.block_until_ready(state)  # Only to split train from eval time; eval waits anyway.
    train_s.append(time.perf_counter() - t)
    correct = 0
    for i in range(0, len(test_y), batch):
      x = test_x[i : i + batch].astype(np.float32) / 255.0
      correct += eval_step(state, x, test_y[i : i + batch])
    accuracy = float(correct) / len(test_y)
    ends.append(time.time())
  return _peer_result(spawn_t, ends, train_s, steps_per_epoch * batch, accuracy) | {
    "final_loss": float(loss),
  }


def worker_jax(spec: dict) -> dict:
  """The leanest jitted JAX loop of the config's model and recipe; per-epoch times, accuracy."""
  spawn_t = float(os.environ[bench.SPAWN_ENV])
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from flaxtrain import config_files, models, optimizers

  config = config_files.load(os.path.join(bench.ROOT, spec["config"]))
  train_x, train_y, test_x, test_y = bench._load_arrays(spec)
  batch, epochs, eval_batch = spec["batch_size"], spec["epochs"], spec["eval_batch_size"]
  n = len(train_y)
  steps_per_epoch = spec.get("epoch_steps") or n // batch
  model = models.get(config.model, 10, jnp.float32, train_x.shape[1:])
  params = model.init(jax.random.key(config.seed), jnp.zeros((1, *train_x.shape[1:])))["params"]
  tx, _ = optimizers.make(
    config.optimizer,
    config.schedule,
    steps_per_epoch=n // batch,
    total_steps=epochs * steps_per_epoch,
    params=params,
  )
  state = (params, tx.init(params))

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @functools.partial(jax.jit, donate_argnums=(0,))
  def train_step(state, table_x, table_y, ids, i):
    params, opt_state = state
    rows = ids[i]
    x = table_x[rows].astype(jnp.float32) / 255.0
    loss, grads = jax.value_and_grad(loss_fn)(params, x, table_y[rows])
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  @jax.jit
  def eval_step(params, x, y, mask):
    logits = model.apply({"params": params}, x.astype(jnp.float32) / 255.0, train=False)
    return jnp.sum((jnp.argmax(logits, -1) == y) * mask)

  pad = -len(test_y) % eval_batch  # Padded to whole batches, the padding masked out.
  ex = jax.device_put(np.concatenate([test_x, np.zeros((pad, *test_x.shape[1:]), test_x.dtype)]))
  ey = jax.device_put(np.concatenate([test_y, np.zeros(pad, test_y.dtype)]).astype(np.int32))
  emask = jax.device_put(np.arange(len(test_y) + pad) < len(test_y))
  table_x, table_y = jax.device_put(train_x), jax.device_put(train_y.astype(np.int32))
  rng = np.random.default_rng(config.seed)
  ends, train_s, accuracy = [], [], None
  for _ in range(epochs):
    t = time.perf_counter()
    ids = rng.permutation(n)[: steps_per_epoch * batch].reshape(steps_per_epoch, batch)
    ids = jax.device_put(ids.astype(np.int32))
    for i in range(steps_per_epoch):
      state, loss = train_step(state, table_x, table_y, ids, i)
    jax.block_until_ready(state)  # Only to split train from eval time; eval waits anyway.
    train_s.append(time.perf_counter() - t)
    correct = sum(
      eval_step(state[0], ex[i : i + eval_batch], ey[i : i + eval_batch], emask[i : i + eval_batch])
      for i in range(0, len(ey), eval_batch)
    )
    accuracy = float(correct) / len(test_y)
    ends.append(time.time())
  return _peer_result(spawn_t, ends, train_s, steps_per_epoch * batch, accuracy) | {
    "final_loss": float(loss),
    "devices": jax.device_count(),
  }


def _peer_result(spawn_t, ends, train_s, examples_per_epoch, accuracy) -> dict:
  walls = epoch_walls(spawn_t, ends)
  later = train_s[1:]
  return {
    "epochs_seen": len(walls),
    "epoch_wall_s": walls,
    "epoch_train_s": train_s,
    "epoch_times_source": "measured in the loop",
    "examples_per_sec": rate_after_first(walls, examples_per_epoch),
    "train_examples_per_sec": len(later) * examples_per_epoch / sum(later) if later else None,
    "wall_to_final_eval_s": ends[-1] - spawn_t,
    "process_wall_s": time.time() - spawn_t,
    "eval_accuracy": accuracy,
    "peak_host_memory_mib": bench.peak_rss_mib(),
  }


WORKERS = {"full_torch": worker_torch, "full_jax": worker_jax, "full_tutorial": worker_tutorial}


# ---------------------------------------------------------------- orchestration


def recipe_of(config_path: str) -> dict:
  """What the torch peer copies from the config: its CNN, optimizer and schedule."""
  import importlib.util

  spec = importlib.util.spec_from_file_location(
    "bench_config", os.path.join(bench.ROOT, config_path)
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  if c.model.name != "cnn" or c.dataset.name != "fashion_mnist":
    raise SystemExit(
      f"benchmark: the full-run peers need a fashion_mnist CNN config, got {config_path}"
    )
  o, s = c.optimizer, c.schedule
  if o.name not in ("adamw", "adam", "sgd") or s.name not in (
    "constant",
    "cosine",
    "warmup_cosine",
  ):
    raise SystemExit(f"benchmark: the torch peer has no {o.name}/{s.name} recipe")
  return {
    "features": list(c.model.features),
    "dense": list(c.model.dense),
    "num_classes": 10,
    "optimizer": o.name,
    "learning_rate": o.learning_rate,
    "weight_decay": o.weight_decay,
    "decay_all": o.weight_decay_mask == "all",
    "nesterov": bool(o.nesterov),
    "b1": o.b1,
    "b2": o.b2,
    "eps": o.eps,
    "momentum": o.momentum,
    "schedule": s.name,
    "warmup_epochs": s.warmup_epochs,
    "end_factor": s.end_factor,
    "eval_batch_size": c.eval_batch_size,
  }


def summarize(runs: list[dict]) -> dict:
  """Medians over rounds (per epoch, too); the failed rounds are counted, not averaged."""
  ok = [r for r in runs if "error" not in r]
  if not ok:
    return {"error": runs[0].get("error") if runs else "not run", "rounds_failed": len(runs)}
  out = dict(ok[-1])
  for key in (
    "examples_per_sec",
    "train_examples_per_sec",
    "wall_to_final_eval_s",
    "eval_accuracy",
  ):
    out[key] = bench.median(r.get(key) for r in ok)
  lists = [r["epoch_wall_s"] for r in ok if r.get("epoch_wall_s")]
  if lists:
    n = min(len(v) for v in lists)
    out["epoch_wall_s"] = [statistics.median(v[i] for v in lists) for i in range(n)]
  out["rounds_ok"] = len(ok)
  out["examples_per_sec_rounds"] = [r.get("examples_per_sec") for r in ok]
  if len(ok) < len(runs):
    out["rounds_failed"] = len(runs) - len(ok)
  return out


def ratios(entry: dict) -> dict:
  """flaxtrain / the fastest peer: throughput (higher is better) and wall (lower is better)."""
  f = entry.get("flaxtrain", {})
  peers = {k: v for k, v in entry.items() if k != "flaxtrain" and "error" not in v}
  out = {}
  speed = {k: v.get("examples_per_sec") for k, v in peers.items() if v.get("examples_per_sec")}
  if speed and f.get("examples_per_sec"):
    best = max(speed, key=speed.get)
    out["throughput_peer"] = best
    out["throughput"] = f["examples_per_sec"] / speed[best]
  train = {k: v.get("train_examples_per_sec") for k, v in peers.items()}
  train = {k: v for k, v in train.items() if v}
  if train and f.get("train_examples_per_sec"):
    best = max(train, key=train.get)
    out["train_only_peer"] = best
    out["train_only"] = f["train_examples_per_sec"] / train[best]
  walls = {k: v.get("wall_to_final_eval_s") for k, v in peers.items()}
  walls = {k: v for k, v in walls.items() if v}
  if walls and f.get("wall_to_final_eval_s"):
    best = min(walls, key=walls.get)
    out["wall_peer"] = best
    out["wall"] = f["wall_to_final_eval_s"] / walls[best]
  return out


def _num(v, fmt="{:,.0f}"):
  return "-" if v is None else fmt.format(v)


def table(results: dict) -> str:
  """The markdown table: one row per batch size and contender."""
  head = (
    "| batch | contender | epoch walls (s) | ex/s, epochs 2..N | train-only ex/s | "
    "start to final eval (s) | test acc | flaxtrain / fastest peer |\n"
    "| ---: | --- | --- | ---: | ---: | ---: | ---: | --- |\n"
  )
  rows = []
  for b, entry in results.items():
    r = entry.get("ratios", {})
    for name in CONTENDERS:
      c = entry.get(name)
      if c is None:
        continue
      if "error" in c:
        rows.append(f"| {b} | {name} | failed: {c['error']} | | | | | |")
        continue
      walls = ", ".join(f"{w:.1f}" for w in c.get("epoch_wall_s") or []) or "not recorded"
      note = ""
      if name == "flaxtrain":
        parts = []
        if "throughput" in r:
          parts.append(f"ex/s {r['throughput']:.2f}x ({r['throughput_peer']})")
        if "train_only" in r:
          parts.append(f"train-only {r['train_only']:.2f}x ({r['train_only_peer']})")
        if "wall" in r:
          parts.append(f"wall {r['wall']:.2f}x ({r['wall_peer']})")
        note = "; ".join(parts)
      acc = c.get("eval_accuracy")
      wall = _num(c.get("wall_to_final_eval_s"), "{:.1f}")
      rows.append(
        f"| {b} | {name} | {walls} | {_num(c.get('examples_per_sec'))} | "
        f"{_num(c.get('train_examples_per_sec'))} | {wall} | "
        f"{_num(None if acc is None else 100 * acc, '{:.2f}%')} | {note} |"
      )
  return head + "\n".join(rows)


def main(args, passthrough) -> int:
  use_torch = not args.skip_torch and bench.torch_importable()
  if not args.skip_torch and not use_torch:
    bench.log("torch is not importable: no PyTorch peer")
  epochs = args.epochs or (10 if args.full else 2)
  epoch_steps_of = {
    b: (args.smoke_steps if args.smoke else FASHION_MNIST_TRAIN // b) for b in args.batch_sizes
  }
  recipe = recipe_of(args.config)
  started = time.time()
  contenders = [
    "flaxtrain",
    *(["torch"] if use_torch else []),
    *([] if args.skip_jax else ["jax"]),
    *([] if args.skip_tutorial else ["tutorial"]),
  ]
  runs = {b: {c: [] for c in contenders} for b in args.batch_sizes}
  with tempfile.TemporaryDirectory(prefix="flaxtrain-bench-") as tmp:
    npz = os.path.join(tmp, "fashion_mnist.npz")
    if len(contenders) > 1:
      data = bench.spawn("data", {"npz": npz, "data_dir": args.data_dir}, tmp)
      if "error" in data:
        raise SystemExit("benchmark: could not load Fashion-MNIST for the peers")
    for rnd in range(args.rounds):
      order = contenders[rnd % len(contenders) :] + contenders[: rnd % len(contenders)]
      for b in args.batch_sizes:
        steps = epoch_steps_of[b]
        for name in order:
          bench.log(f"round {rnd + 1}/{args.rounds}, batch {b}, {epochs} epochs: {name}")
          if name == "flaxtrain":
            r = run_flaxtrain(args, b, epochs, steps, passthrough, tmp, f"{rnd}-{b}")
          else:
            spec = {
              "batch_size": b,
              "epochs": epochs,
              "epoch_steps": steps if args.smoke else None,
              "recipe": recipe,
              "config": args.config,
              "eval_batch_size": recipe["eval_batch_size"],
              "npz": npz,
            }
            r = bench.spawn(f"full_{name}", spec, tmp, quiet_wait=args.quiet_wait)
          runs[b][name].append(r)
  results = {}
  for b in args.batch_sizes:
    entry = {name: summarize(rs) for name, rs in runs[b].items()}
    entry["ratios"] = ratios(entry)
    results[str(b)] = entry
  report = {
    "benchmark": "full runs: the flaxtrain CLI vs peers for the same epochs",
    "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    "machine": bench.machine_info(),
    "versions": bench.versions(use_torch),
    "settings": {
      "config": args.config,
      "epochs": epochs,
      "batch_sizes": args.batch_sizes,
      "rounds": args.rounds,
      "smoke_steps_per_epoch": args.smoke_steps if args.smoke else None,
      "contenders": contenders,
      "overrides": passthrough,
      "quiet_wait_s": args.quiet_wait,
      "torch_recipe": recipe,
    },
    "results": results,
  }
  report["machine"]["loadavg_end"] = os.getloadavg()
  report["benchmark_wall_s"] = time.time() - started
  if args.json_out:
    with open(args.json_out, "w") as f:
      f.write(json.dumps(report, indent=2, default=str) + "\n")
  m, v = report["machine"], report["versions"]
  print(
    f"# flaxtrain full runs: {args.config}, {epochs} epochs"
    + (f" of {args.smoke_steps} steps (--smoke)" if args.smoke else "")
    + f", {args.rounds} round(s), medians over rounds\n\n"
    f"{report['date']}; {m['cpu']}, {m['cores']} cores; jax {v.get('jax')}, flax {v.get('flax')}"
    + (f", torch {v.get('torch')}" if use_torch else "")
    + "\n"
  )
  print(table(results))
  print(
    "\nepoch walls: epoch 1 from process start (start-up, data, compilation), each later one "
    "its training, eval and (flaxtrain) the blocking part of the checkpoint save. "
    "ex/s, epochs 2..N: pauses included. train-only: peers' train loops alone; flaxtrain: "
    "summary.json's steady state (eval and checkpoint pauses excluded). "
    + (
      "One round: single figures on a shared machine are noisy (--rounds=3 for medians). "
      if args.rounds == 1
      else ""
    )
    + "The tutorial runs its own recipe (SGD 0.1, momentum 0.9); torch the config's."
  )
  failed = any("error" in e["flaxtrain"] for e in results.values())
  return 1 if failed else 0
