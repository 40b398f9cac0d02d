"""flaxtrain's command line: flags -> config -> one call to the requested mode."""

import logging as logging_std
import os
import pathlib
import sys

# TensorFlow is only used for tf.data/TFDS: keep its C++ logging and oneDNN notes quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from flaxtrain import config_check  # noqa: E402
from flaxtrain.errors import UserError  # noqa: E402


def _default_config() -> str:
  """configs/fashion_cnn.py in the working directory, else the one beside the package."""
  here = pathlib.Path("configs/fashion_cnn.py")
  if here.exists():
    return str(here)
  return str(pathlib.Path(__file__).resolve().parent.parent / "configs" / "fashion_cnn.py")


def _define_config_flag():
  # config_flags reads sys.argv's overrides when the flag is defined, so this runs only
  # after `config_check` has vetted them (its errors are sentences, not tracebacks).
  config_flags.DEFINE_config_file(
    "config",
    _default_config(),
    "Config file (a .py with get_config()); override any field with --config.a.b=value.",
    lock_config=True,
  )


flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config file stem>).")
flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "describe", "eval", "report", "export"],
  "train: train (or resume) in --workdir; describe: print what the config "
  "would train and how fast, writing nothing; eval: evaluate a checkpoint "
  "into <workdir>/eval_<step>.json; report: pictures and report.md under "
  "<workdir>/report/; export: <workdir>/export/ for serving.",
)
flags.DEFINE_string(
  "step",
  "latest",
  "The checkpoint that eval, report and export use: "
  "'latest', 'best' (by the task's eval metric) or a step number.",
)
flags.DEFINE_bool("verbose", False, "Show tracebacks for errors.")
flags.DEFINE_string(
  "coordinator_address",
  os.environ.get("FLAXTRAIN_COORDINATOR_ADDRESS"),
  "HOST:PORT of process 0, for multi-process runs (env FLAXTRAIN_COORDINATOR_ADDRESS).",
)
flags.DEFINE_integer(
  "num_processes",
  int(os.environ.get("FLAXTRAIN_NUM_PROCESSES", 0)) or None,
  "Number of processes (env FLAXTRAIN_NUM_PROCESSES).",
)
flags.DEFINE_integer(
  "process_id",
  int(os.environ.get("FLAXTRAIN_PROCESS_ID", -1)),
  "This process's id, 0..num_processes-1 (env FLAXTRAIN_PROCESS_ID).",
)
flags.DEFINE_integer(
  "initialization_timeout", 300, "Seconds to wait for all processes to join before failing."
)

FLAGS = flags.FLAGS


def _fail(message: str, code: int = 2):
  print(f"flaxtrain: error: {message}", file=sys.stderr)
  sys.exit(code)


def _parse_flags(argv):
  """absl's parser, but bad flags and config overrides end in one sentence."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(_flag_error_sentence(e))
  except UserError as e:
    _fail(str(e))


def _config_arg(argv) -> str:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return _default_config()


def _flag_error_sentence(err: Exception) -> str:
  text = " ".join(str(err).split())
  cause = err.__cause__ or err.__context__
  if cause is not None and not isinstance(cause, flags.Error):
    text = f"{text} ({type(cause).__name__}: {' '.join(str(cause).split())})"
  return text


def main(argv):
  if len(argv) > 1:
    _fail(f"Unexpected arguments {argv[1:]}: flags look like --name=value.")
  try:
    _run()
  except UserError as e:
    if FLAGS.verbose:
      raise
    _fail(str(e), code=1)


def _cpu_devices_default(batch_size: int):
  """One JAX CPU device per core when each gets at least 64 examples, else one device.

  Measured on 2 cores (scripts/benchmark.py): at batch 128 two devices are ~1.5x faster
  than one; at batch 32 one device is faster (per-device steps of 16 examples cost more
  than they save). Only the CPU backend reads this, before JAX starts; the count divides
  the batch. XLA_FLAGS set by the user wins.
  """
  flags_env = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" in flags_env:
    return
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  fits = [
    d
    for d in range(1, max(cores or 1, 1) + 1)
    if batch_size % d == 0 and (d == 1 or batch_size // d >= 64)
  ]
  os.environ["XLA_FLAGS"] = (
    f"{flags_env} --xla_force_host_platform_device_count={max(fits)}".strip()
  )


def _checkpoint_step(text: str) -> int | str:
  if text in ("latest", "best"):
    return text
  if text.isdigit():
    return int(text)
  raise UserError(
    f"--step={text} is not a checkpoint: pass --step=latest, --step=best or a step number."
  )


def _run():
  step = _checkpoint_step(FLAGS.step)
  if FLAGS["step"].present and FLAGS.mode not in _READ_RUN:
    raise UserError(
      f"--step is for --mode=eval, report and export, not --mode={FLAGS.mode}: drop it."
    )
  workdir = FLAGS.workdir or os.path.join("runs", pathlib.Path(_config_path()).stem)
  if FLAGS.mode in _READ_RUN:  # Fail before JAX starts or any data is loaded.
    from flaxtrain import evaluate, report

    evaluate.check_run(workdir, step)
    if FLAGS.mode == "report":
      report.event_files(workdir)
  if isinstance(FLAGS.config.batch_size, int) and FLAGS.config.batch_size > 0:
    _cpu_devices_default(FLAGS.config.batch_size)
  from flaxtrain import distributed  # Imports jax: after flags, so errors stay short.

  distributed.initialize(
    FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.initialization_timeout
  )
  if FLAGS.mode == "train":
    _train(FLAGS.config, workdir)
    return
  from flaxtrain import experiment

  exp = experiment.Experiment(FLAGS.config)
  text = _mode(exp, workdir, step)
  if exp.par.process_index == 0:
    print(text, flush=True)


def _mode(exp, workdir: str, step: int | str) -> str:
  """Runs --mode (other than train) on `exp`; returns what to print."""
  from flaxtrain import describe, evaluate, export, report

  if FLAGS.mode == "describe":
    defaults = config_check.load_config_file(_config_path())
    return describe.describe(exp, defaults, _config_path())
  if FLAGS.mode == "eval":
    return evaluate.summary_line(*evaluate.run(exp, workdir, step), workdir)
  if FLAGS.mode == "report":
    return f"flaxtrain: report in {report.run(exp, workdir, step) / 'report.md'}"
  return f"flaxtrain: exported to {export.run(exp, workdir, step)}"


_READ_RUN = ("eval", "report", "export")


def _train(config, workdir: str):
  import jax

  from flaxtrain import loop, progress

  bar = progress.Progress(process_index=jax.process_index())
  try:
    summary = loop.train_and_evaluate(config, workdir, progress=bar)
  finally:
    bar.close()
  if "eval_examples" in summary:  # Not after a stop signal.
    print(_summary_line(summary, workdir), flush=True)


def _config_path() -> str:
  return config_flags.get_config_filename(FLAGS["config"])


def _summary_line(s: dict, workdir: str) -> str:
  from flaxtrain import evaluate

  speed = s.get("train_examples_per_sec")
  speed = f"{speed:,.0f} train examples/s" if speed else "no steps trained"
  if s.get("input_wait_share") is not None:  # Streamed input: did the hosts keep up?
    speed += f" ({s['input_wait_share']:.1%} of it waiting for input)"
  return (
    f"flaxtrain: step {s['step']}: {evaluate.metrics_text(s)} on {s['eval_examples']} "
    f"examples; {speed}; "
    f"{s['wall_s']:.1f} s wall; summary in {os.path.join(workdir, 'summary.json')}"
  )


class _QuietLibraries(logging_std.Filter):
  """Drops the INFO chatter of Orbax, TFDS and TF (kept with --verbose)."""

  def filter(self, record):
    noisy = ("/orbax/", "/tensorflow_datasets/", "/tensorflow/")
    return record.levelno >= logging_std.WARNING or not any(n in record.pathname for n in noisy)


def run():
  """Console-script entry point."""
  logging.set_verbosity(logging.INFO)
  if "--verbose" not in sys.argv and "--verbose=true" not in sys.argv:
    logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    config_check.check_overrides(config_check.load_config_file(_config_arg(sys.argv)), sys.argv)
  except UserError as e:
    _fail(str(e))
  _define_config_flag()
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
