"""`make bench ARGS=--overhead`: the loop's own cost on models whose step is tiny.

    make bench ARGS=--overhead
    make bench ARGS="--overhead --overhead_steps=20000 --rounds=3"

Models (batch 32 unless --overhead_batch): `mlp`, configs/fashion_mlp.py (flatten -> Dense
128 -> relu -> Dense 10, Adam 1e-3, cosine), and `logreg`, the same config with
`model.hidden=()` (one Dense layer: a logistic regression). For each, each
`steps_per_dispatch` (1, 25, and the default for the model on this platform where it
differs; on a CPU, 25 for these models without convolutions) and each round:

  flaxtrain  the CLI (`flaxtrain --config=configs/fashion_mlp.py --config.batch_size=32
             --config.num_train_steps=S --config.steps_per_dispatch=D`, eval and checkpoint
             only at step S). Its figure is summary.json's `train_examples_per_sec` / batch:
             the loop's steady state after the first (compiling) chunk with the final
             eval and checkpoint excluded, but with everything the loop does per step and
             per chunk included (the index gather, metrics, the non-finite guard and its
             check at each log, ReportProgress, logging every log_every_steps through the
             TensorBoard writer thread, the per-epoch permutation). The CLI rather than the
             Python API, because it is what users run; both call the same
             `loop.train_and_evaluate`.
  bare       the leanest correct jitted loop with the same model (flaxtrain's linen `MLP`),
             optimizer and schedule (`flaxtrain.optimizers.make`) and data order (the same
             per-epoch permutations): the uint8 split and every step's indices resident
             on the device, the state donated, D steps per call in a `lax.fori_loop`, no
             host sync until the end. Timed like flaxtrain: after the first chunk.

Printed: steps/s of each (medians over rounds) and flaxtrain / bare, the median of the
rounds' own ratios (this VM drifts by 10-30% between rounds; within a round the two run
back to back, the bare loop first in every other round), per model and steps_per_dispatch.
"""

import datetime
import json
import os
import shutil
import tempfile
import time

import benchmark as bench

MODELS = {
  "mlp": [],  # configs/fashion_mlp.py as it is.
  "logreg": ["--config.model.hidden=()"],
}
CONFIG = os.path.join("configs", "fashion_mlp.py")


def worker_bare(spec: dict) -> dict:
  """The bare loop: steps/s after the first chunk."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from flaxtrain import config_files, experiment, optimizers
  from flaxtrain.data import plan as plan_lib
  from flaxtrain.models import analysis, simple

  config = config_files.load(os.path.join(bench.ROOT, spec["config"]))
  if spec["model"] == "logreg":
    config.model.hidden = ()
  batch, total, dispatch = spec["batch_size"], spec["steps"], spec["steps_per_dispatch"]
  train_x, train_y, _, _ = bench._load_arrays(spec)
  plan = plan_lib.IndexPlan(
    num_train=len(train_y),
    num_eval=1,
    batch_size=batch,
    eval_batch_size=1,
    num_devices=1,
    seed=config.seed,
  )
  total = total // dispatch * dispatch
  idx = plan.train_indices(0, total, total)  # [steps, batch]: flaxtrain's data order.
  model = simple.MLP(10, hidden=tuple(config.model.hidden))  # The linen module itself.
  tx, _ = optimizers.make(
    config.optimizer, config.schedule, steps_per_epoch=plan.steps_per_epoch, total_steps=total
  )
  params = model.init(jax.random.key(config.seed), jnp.zeros((1, *train_x.shape[1:])))["params"]
  state = (params, tx.init(params))

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(state, table_x, table_y, ids):
    params, opt_state = state
    x = table_x[ids].astype(jnp.float32) / 255.0
    loss, grads = jax.value_and_grad(loss_fn)(params, x, table_y[ids])
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  def chunk(state, table_x, table_y, idx, start):
    if dispatch == 1:
      return step(state, table_x, table_y, idx[start])

    def body(i, carry):
      state, _ = carry
      ids = jax.lax.dynamic_index_in_dim(idx, start + i, keepdims=False)
      return step(state, table_x, table_y, ids)

    return jax.lax.fori_loop(0, dispatch, body, (state, jnp.float32(0)))

  run = jax.jit(chunk, donate_argnums=(0,))
  table_x, table_y = jax.device_put(train_x), jax.device_put(train_y.astype(np.int32))
  idx = jax.device_put(idx)
  state, loss = run(state, table_x, table_y, idx, 0)  # Compiles: not timed, like flaxtrain.
  jax.block_until_ready(state)
  t = time.perf_counter()
  for start in range(dispatch, total, dispatch):
    state, loss = run(state, table_x, table_y, idx, start)
  loss = float(loss)
  seconds = time.perf_counter() - t
  return {
    "steps_per_sec": (total - dispatch) / seconds,
    "timed_steps": total - dispatch,
    "final_loss": loss,
    "platform": jax.default_backend(),
    "default_steps_per_dispatch": experiment.default_steps_per_dispatch(
      jax.default_backend(), lambda: analysis.has_convolutions(model, train_x.shape[1:])
    ),
    "devices": 1,
  }


WORKERS = {"overhead_bare": worker_bare}


def run_flaxtrain(args, model, dispatch, tmp, tag) -> dict:
  from bench_full import flaxtrain_command

  workdir = os.path.join(tmp, f"overhead-{tag}")
  s = args.overhead_steps
  cli = [
    f"--config={CONFIG}",
    f"--workdir={workdir}",
    f"--config.batch_size={args.overhead_batch}",
    f"--config.num_train_steps={s}",
    f"--config.eval_every_steps={s}",
    f"--config.checkpoint_every_steps={s}",
    f"--config.steps_per_dispatch={dispatch}",
    *MODELS[model],
  ]
  env = bench.clean_env(keep_xla_flags=True)
  if args.quiet_wait > 0:
    bench.wait_for_quiet(args.quiet_wait)
  r, others = bench.run_measured(flaxtrain_command() + cli, env)
  if r.returncode != 0:
    tail = (r.stderr or "")[-3000:]
    bench.log(f"flaxtrain failed (exit {r.returncode}):\n{tail}")
    return {"error": f"exit {r.returncode}", "stderr_tail": tail}
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  shutil.rmtree(workdir, ignore_errors=True)
  rate = summary.get("train_examples_per_sec")
  return {
    "steps_per_sec": rate / args.overhead_batch if rate else None,
    "devices": summary.get("devices"),
    "command": " ".join(["flaxtrain", *cli]),
    "others_cpu_share": others,
  }


def round_ratios(entry: dict) -> list[float]:
  """flaxtrain / bare of each round: the two ran one after the other, so a ratio within a
  round is free of this VM's drift between rounds (which a ratio of medians is not)."""
  f = entry["flaxtrain"].get("steps_per_sec_rounds") or []
  b = entry["bare"].get("steps_per_sec_rounds") or []
  if len(f) != len(b):
    return []
  return [x / y for x, y in zip(f, b, strict=True) if x and y]


def ratio(entry: dict) -> float | None:
  """The median of the rounds' ratios; with no rounds recorded, the ratio of the medians."""
  if rs := round_ratios(entry):
    return bench.median(rs)
  f, b = entry["flaxtrain"].get("steps_per_sec"), entry["bare"].get("steps_per_sec")
  return f / b if f and b else None


def table(results: dict) -> str:
  head = (
    "| model | steps_per_dispatch | flaxtrain steps/s | bare steps/s | flaxtrain / bare | "
    "rounds |\n| --- | ---: | ---: | ---: | ---: | --- |\n"
  )
  rows = []
  for model, by_dispatch in results.items():
    for d, e in by_dispatch.items():
      f, b, r = e["flaxtrain"].get("steps_per_sec"), e["bare"].get("steps_per_sec"), ratio(e)
      label = f"{d} (default)" if e.get("default") else str(d)
      per_round = round_ratios(e)
      rounds = ", ".join(f"{x:.2f}" for x in per_round) if len(per_round) > 1 else ""
      rows.append(
        f"| {model} | {label} | {'-' if f is None else f'{f:,.0f}'} | "
        f"{'-' if b is None else f'{b:,.0f}'} | {'-' if r is None else f'{r:.2f}'} | {rounds} |"
      )
  return head + "\n".join(rows)


def main(args) -> int:
  started = time.time()
  runs = {m: {} for m in args.overhead_models}
  defaults = {}  # Per model: the default steps_per_dispatch on this platform.
  with tempfile.TemporaryDirectory(prefix="flaxtrain-bench-") as tmp:
    npz = os.path.join(tmp, "fashion_mnist.npz")
    data = bench.spawn("data", {"npz": npz, "data_dir": args.data_dir}, tmp)
    if "error" in data:
      raise SystemExit("benchmark: could not load Fashion-MNIST")
    for rnd in range(args.rounds):
      for model in args.overhead_models:
        todo = sorted({1, 25, defaults.get(model, 1)})
        i = 0
        while i < len(todo):
          d = todo[i]
          i += 1
          entry = runs[model].setdefault(d, {"flaxtrain": [], "bare": []})
          bench.log(f"round {rnd + 1}/{args.rounds}, {model}, steps_per_dispatch {d}")
          spec = {
            "config": CONFIG,
            "model": model,
            "batch_size": args.overhead_batch,
            "steps": args.overhead_steps,
            "steps_per_dispatch": d,
            "npz": npz,
          }
          # Every other round the bare loop goes first, so that neither side always runs
          # in the other's wake (page cache, clock, a neighbour's load).
          for who in ("flaxtrain", "bare") if rnd % 2 == 0 else ("bare", "flaxtrain"):
            if who == "flaxtrain":
              r = run_flaxtrain(args, model, d, tmp, f"{rnd}-{model}-{d}")
            else:
              r = bench.spawn("overhead_bare", spec, tmp, quiet_wait=args.quiet_wait)
            entry[who].append(r)
          bare = entry["bare"][-1]
          if model not in defaults and bare.get("default_steps_per_dispatch"):
            defaults[model] = bare["default_steps_per_dispatch"]
            if defaults[model] not in todo:  # The model's own default, measured too.
              todo.append(defaults[model])
  results = {}
  for model, by_d in runs.items():
    results[model] = {}
    for d, entry in by_d.items():
      agg = {}
      for who, rs in entry.items():
        ok = [r for r in rs if "error" not in r]
        agg[who] = dict(ok[-1]) if ok else {"error": rs[0].get("error") if rs else "not run"}
        agg[who]["steps_per_sec"] = bench.median(r.get("steps_per_sec") for r in ok)
        # Every round's, None where it failed: round i of both sides ran back to back.
        agg[who]["steps_per_sec_rounds"] = [r.get("steps_per_sec") for r in rs]
      agg["flaxtrain_vs_bare"] = ratio(agg)
      agg["flaxtrain_vs_bare_rounds"] = round_ratios(agg)
      agg["default"] = d == defaults.get(model)
      results[model][d] = agg
  report = {
    "benchmark": "loop overhead: the flaxtrain CLI vs the leanest jitted loop",
    "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    "machine": bench.machine_info(),
    "versions": bench.versions(False),
    "settings": {
      "config": CONFIG,
      "models": args.overhead_models,
      "batch_size": args.overhead_batch,
      "steps": args.overhead_steps,
      "rounds": args.rounds,
      "default_steps_per_dispatch": defaults,
    },
    "results": {m: {str(d): e for d, e in by.items()} for m, by in results.items()},
    "benchmark_wall_s": time.time() - started,
  }
  if args.json_out:
    with open(args.json_out, "w") as f:
      f.write(json.dumps(report, indent=2, default=str) + "\n")
  m = report["machine"]
  print(
    f"# flaxtrain loop overhead: batch {args.overhead_batch}, {args.overhead_steps} steps, "
    f"{args.rounds} round(s), medians over rounds\n\n{report['date']}; {m['cpu']}, "
    f"{m['cores']} cores; default steps_per_dispatch: "
    f"{', '.join(f'{k} {v}' for k, v in defaults.items())}\n"
  )
  print(table(results))
  print(
    "\nflaxtrain: summary.json's steady state (after the first chunk; final eval and "
    "checkpoint excluded). bare: device-resident data and indices, donated state, no host "
    "sync until the end, timed after the first chunk. flaxtrain / bare: the median of the "
    "rounds' ratios (each round runs the two one after the other); rounds: each round's."
  )
  failed = any(
    "error" in e["flaxtrain"] or "error" in e["bare"]
    for by in results.values()
    for e in by.values()
  )
  return 1 if failed else 0
