"""flaxtrain's command line: flags -> config -> one call to the requested mode."""

import os
import pathlib
import shutil
import sys
import textwrap

# TensorFlow is only used for tf.data/TFDS: keep its C++ logging and oneDNN notes quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from flaxtrain import config_check, config_files  # noqa: E402
from flaxtrain.errors import UserError  # noqa: E402


def _default_config() -> str:
  """configs/fashion_cnn.py in the working directory (a checkout), else the packaged one."""
  here = pathlib.Path("configs") / f"{config_files.DEFAULT}.py"
  if here.exists():
    return str(here)
  return str(config_files.resolve(config_files.DEFAULT))


_CONFIG_HELP = (
  "A packaged config's name (see --list_configs) or a path to a .py file with get_config(); "
  "override any field with --config.a.b=value."
)


def _define_config_flag():
  # config_flags reads sys.argv's overrides when the flag is defined, so this runs only
  # after `config_check` has vetted them (its errors are sentences, not tracebacks).
  config_flags.DEFINE_config_file("config", _default_config(), _CONFIG_HELP, lock_config=True)


MODES = {
  "train": "train (or resume) in --workdir",
  "describe": "print what the config would train and how fast, writing nothing",
  "eval": "evaluate a checkpoint (--step) into <workdir>/eval_<step>.json",
  "report": "pictures and report.md of a run under <workdir>/report/",
  "export": "a checkpoint (--step) as a model for serving in <workdir>/export/",
}

flags.DEFINE_bool(
  "list_configs", False, "Print the packaged configs (names for --config) and exit."
)
flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config file stem>).")
flags.DEFINE_enum(
  "mode", "train", list(MODES), "; ".join(f"{m}: {what}" for m, what in MODES.items()) + "."
)
flags.DEFINE_string(
  "step",
  "latest",
  "The checkpoint that eval, report and export use: "
  "'latest', 'best' (by the task's eval metric) or a step number.",
)
flags.DEFINE_string(
  "topology",
  None,
  "With --mode=describe: a TPU slice to compile the train step for without the hardware "
  "or the data, e.g. v5e-8, v4-32, v5p-128, v6e-16 (Cloud TPU accelerator types); prints "
  "memory per chip against its HBM, FLOPs and a step-time estimate, and fails when the "
  "step does not fit. Needs libtpu: pip install 'jax[tpu]'.",
)
flags.DEFINE_bool(
  "verbose", False, "Every log line on the terminal (not only the bar and events) and tracebacks."
)
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


def _config_values(argv):
  """(index, prefix) of each --config value in argv: `--config=X` or `--config X`."""
  i = 1
  while i < len(argv) and argv[i] != "--":
    name, eq, _ = argv[i].partition("=")
    if name in ("--config", "-config"):
      if eq:
        yield i, f"{name}="
      elif i + 1 < len(argv):
        yield i + 1, ""
        i += 1
    i += 1


def _config_arg(argv) -> str:
  values = [argv[i][len(prefix) :] for i, prefix in _config_values(argv)]
  return values[-1] if values else _default_config()  # The last one wins, as in absl.


def _resolve_config_names(argv) -> list[str]:
  """argv with a bare `--config=fashion_cnn` replaced by the packaged file's path.

  Both config_check and ml_collections' flag then read a file, and the default workdir
  stays runs/<name>. Paths pass unchanged.
  """
  argv = list(argv)
  for i, prefix in _config_values(argv):
    value = argv[i][len(prefix) :]
    if config_files.is_name(value):
      argv[i] = prefix + str(config_files.resolve(value))
  return argv


def _flag_given(argv, names) -> bool:
  """Whether argv (before any `--`) turns on one of the boolean flags `names`."""
  for arg in argv[1:]:
    if arg == "--":
      break
    name, _, value = arg.lstrip("-").partition("=")
    if arg.startswith("-") and name in names and value.lower() in ("", "true", "t", "1"):
      return True
  return False


def _flag_error_sentence(err: Exception) -> str:
  text = " ".join(str(err).split())
  cause = err.__cause__ or err.__context__
  if cause is not None and not isinstance(cause, flags.Error):
    text = f"{text} ({type(cause).__name__}: {' '.join(str(cause).split())})"
  return text


def main(argv):
  if len(argv) > 1:
    _fail(f"Unexpected arguments {argv[1:]}: flags look like --name=value.")
  if FLAGS.list_configs:  # Given some way run() does not see, e.g. in a --flagfile.
    _list_configs()
    return
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
  if FLAGS.topology is not None and FLAGS.mode != "describe":
    raise UserError(
      f"--topology is for --mode=describe, not --mode={FLAGS.mode}: add --mode=describe or drop it."
    )
  workdir = FLAGS.workdir or os.path.join("runs", pathlib.Path(_config_path()).stem)
  if FLAGS.mode in _READ_RUN:  # Fail before JAX starts or any data is loaded.
    from flaxtrain import evaluate, report

    evaluate.check_run(workdir, step)
    if FLAGS.mode == "report":
      report.event_files(workdir)
  if isinstance(FLAGS.config.batch_size, int) and FLAGS.config.batch_size > 0:
    _cpu_devices_default(FLAGS.config.batch_size)
  from flaxtrain import console, distributed  # Imports jax: after flags, so errors stay short.

  if FLAGS.topology is not None:
    from flaxtrain import topology

    topology.parse(FLAGS.topology)  # An unknown name fails before JAX starts.

  distributed.initialize(
    FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.initialization_timeout
  )
  if FLAGS.topology is not None:  # Before the backends start: libtpu reads its settings then.
    topology.prepare_libtpu()
  with console.startup_notes_to_log():  # XLA's C++ notes as the backends start.
    import jax

    jax.devices()
  if FLAGS.topology is None:  # What the config can get wrong fails before TensorFlow loads.
    from flaxtrain import experiment, parallel

    experiment.validate(FLAGS.config, parallel.DataParallel())
  # TensorFlow is imported only where it is used (first decodes, preparation, export,
  # report, remote TensorBoard), each time through console.import_tensorflow_quietly.
  if FLAGS.mode == "train":
    _train(FLAGS.config, workdir)
    return
  if FLAGS.topology is not None:  # Compiled for a TPU slice that is not here: no data loaded.
    from flaxtrain import describe

    defaults = config_check.load_config_file(_config_path())
    print(
      describe.describe_topology(FLAGS.config, defaults, _config_path(), FLAGS.topology),
      flush=True,
    )
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
  from flaxtrain import console, evaluate, resources

  speed = s.get("train_examples_per_sec")
  speed = f"{speed:,.0f} train examples/s" if speed else "no steps trained"
  if s.get("input_wait_share") is not None:  # Streamed input: did the hosts keep up?
    speed += f" ({s['input_wait_share']:.1%} of it waiting for input)"
  # Peak memory, short: 'peak memory 3.1 GiB device, 2.4 GiB host' (no device on CPU).
  memory = [
    f"{resources.human_bytes(s[key])} {where}"
    for key, where in (("peak_device_memory_bytes", "device"), ("peak_host_rss_bytes", "host"))
    if s.get(key)
  ]
  if memory:
    speed += f"; peak memory {', '.join(memory)}"
  import jax

  log = console.log_path(workdir, jax.process_index())
  return (
    f"flaxtrain: step {s['step']}: {evaluate.metrics_text(s)} on {s['eval_examples']} "
    f"examples; {speed}; "
    f"{s['wall_s']:.1f} s wall; summary in {os.path.join(workdir, 'summary.json')}"
    + ("" if "://" in workdir else f", log in {log}")
  )


def _list_configs():
  configs = config_files.packaged()
  if not configs:
    _fail(f"No packaged configs in {config_files.directory()}: reinstall flaxtrain.", code=1)
  width = shutil.get_terminal_size().columns if sys.stdout.isatty() else None
  _print(_table(configs, width=width))


def _print(text: str):
  """Prints `text`; a reader that stops early (`flaxtrain --help | head`) is no error."""
  try:
    print(text, flush=True)
  except BrokenPipeError:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own advice.


def _table(rows: dict[str, str], width: int | None, indent: str = "") -> str:
  """`name  text` lines with the texts aligned (and wrapped beneath themselves to `width`)."""
  pad = len(indent) + max(map(len, rows), default=0) + 2
  lines = []
  for name, text in rows.items():
    head = f"{indent}{name}".ljust(pad)
    if width is None or not text:
      lines.append(f"{head}{text}".rstrip())
    else:
      lines += _wrap(text, max(width, pad + 30), head, " " * pad)
  return "\n".join(lines)


def _wrap(text: str, width: int, first: str, rest: str) -> list[str]:
  # Flag names and Fashion-MNIST stay whole.
  return textwrap.wrap(
    text, width, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False
  )


_HELP_FLAGS = ("help", "h", "?", "helpshort")  # --helpfull stays absl's.


def _metavar(f: flags.Flag) -> str:
  named = {"workdir": "DIR", "coordinator_address": "HOST:PORT", "topology": "NAME"}
  return named.get(f.name) or {"int": "N"}.get(f.flag_type(), f.name.upper())


def _help() -> str:
  """What `flaxtrain --help` prints: usage, modes, flags, overrides, configs, reference."""
  width = max(60, min(100, shutil.get_terminal_size((100, 24)).columns))

  def para(text: str, indent: str = "  ") -> str:
    return "\n".join(_wrap(text, width, indent, indent))

  own = [("--config=NAME_OR_PATH", config_files.DEFAULT, _CONFIG_HELP)]
  for f in FLAGS.get_flags_for_module(FLAGS.find_module_defining_flag("workdir")):
    if f.name == "config":
      continue
    text = "What to run: one of the modes above." if f.name == "mode" else f.help
    if isinstance(f.default, bool):
      own.append((f"--{f.name}", str(f.default).lower(), text))
    else:
      own.append((f"--{f.name}={_metavar(f)}", f.default, text))
  flag_lines = []
  for name, default, text in own:
    flag_lines.append(f"  {name}" + ("" if default is None else f"  (default: {default})"))
    flag_lines.append(para(text, " " * 6))
  config_lib = pathlib.Path(__file__).resolve().with_name("config_lib.py")
  configs = config_files.packaged()
  return "\n".join(
    [
      "Usage: flaxtrain [--config=NAME_OR_PATH] [--mode=MODE] [--workdir=DIR] "
      "[--config.KEY=VALUE ...]",
      "",
      para(
        "Trains (or evaluates, reports on, exports) a JAX/Flax model described by a config: "
        "one of the packaged recipes by name (--config=fashion_cnn, the default) or any "
        "Python file with get_config() by path (--config=my_config.py), with any key "
        "changed by --config.KEY=VALUE. A run lives in --workdir (default "
        "runs/<config name>): training resumes there from its latest checkpoint, and the "
        "other modes read the checkpoints it holds.",
        "",
      ),
      "",
      "Modes (--mode=MODE):",
      _table(MODES, width, indent="  "),
      "",
      "Flags:",
      *flag_lines,
      "",
      "Config overrides (--config.KEY=VALUE):",
      para(
        "Every key of the config can be set on the command line: KEY is its dotted path "
        "and VALUE is read as the key's type (numbers, strings, True/False, tuples such "
        "as '(16, 32)'). For example:"
      ),
      "    flaxtrain --config=fashion_cnn --config.batch_size=256 "
      "--config.optimizer.learning_rate=1e-3",
      "    flaxtrain --config.num_train_steps=500 --config.model.features='(16, 32)' "
      "--workdir=/tmp/quick",
      para(
        "A key must already exist in the config: an unknown one fails at start-up, before "
        "anything is written, and suggests the closest key (--config.optimizer.nmae=sgd: "
        "did you mean --config.optimizer.name?). --mode=describe shows the resolved config "
        "and what your overrides changed, without training."
      ),
      "",
      f"Packaged configs (--config=NAME; the files are in {config_files.directory()}):",
      _table(configs, width, indent="  ") if configs else "  none found: reinstall flaxtrain.",
      para(
        "For your own config, copy one of these files, change it and pass its path "
        "(--config=path/to/my_config.py)."
      ),
      "",
      "Config reference:",
      para(
        f"flaxtrain/config_lib.py ({config_lib}) declares every key with its default and "
        "a comment; each config's docstring gives its launch command and the result it "
        "reached. README.md: 'Using it', 'Config reference' and 'Configs'. --helpfull "
        "lists every flag, the libraries' included."
      ),
    ]
  )


def run():
  """Console-script entry point (also `python -m flaxtrain`)."""
  if _flag_given(sys.argv, _HELP_FLAGS):
    _print(_help())
    sys.exit(0)
  if _flag_given(sys.argv, ("list_configs",)):
    _list_configs()
    sys.exit(0)
  logging.set_verbosity(logging.INFO)
  from flaxtrain import console

  # A terminal shows the bar and the run's events; the workdir's log file gets everything.
  console.setup(verbose=_flag_given(sys.argv, ("verbose",)))
  try:
    sys.argv = _resolve_config_names(sys.argv)
    config_check.check_overrides(config_check.load_config_file(_config_arg(sys.argv)), sys.argv)
  except UserError as e:
    _fail(str(e))
  _define_config_flag()
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
