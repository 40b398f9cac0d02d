"""What a run shows on the terminal, and the full log every run keeps in its workdir.

On a terminal (stderr is a TTY) a run shows the progress bar and one line per eval,
checkpoint, resume and stop (`event`), plus warnings and errors; `--verbose` shows every
log line. Piped output (batch jobs, CI) gets the plain absl log lines, less the INFO
chatter of Orbax, TFDS and TensorFlow. Either way every record, library chatter
included, goes to `<workdir>/flaxtrain.log` (`flaxtrain.process<N>.log` for process N > 0),
appended across resumes. TensorFlow's C++ start-up notes (oneDNN, absl::InitializeLog)
go only to that file.
"""

import contextlib
import datetime
import logging as logging_std
import os
import re
import sys
import threading

from absl import logging

_EVENT = "flaxtrain_event"  # A record attribute: a line for the terminal.
_FILE_ONLY = "flaxtrain_file_only"  # A record attribute: the log file, never the terminal.
# Libraries whose INFO records are chatter on a terminal or in a job's output.
_NOISY = ("/orbax/", "/tensorflow_datasets/", "/tensorflow/", "/jax/_src/xla_bridge")


def event(msg: str, *args):
  """Logs a line the terminal shows even when quiet: eval, checkpoint, resume, stop."""
  logging.info(msg, *args, extra={_EVENT: True})


def file_only(msg: str, *args, exc_info=False):
  """Logs a line (with the traceback being handled, if exc_info) that only the log file gets."""
  logging.info(msg, *args, exc_info=exc_info, extra={_FILE_ONLY: True})


# The file and line of a record are its caller's, not these helpers'.
logging.ABSLLogger.register_frame_to_skip(__file__, "event")
logging.ABSLLogger.register_frame_to_skip(__file__, "file_only")
logging.ABSLLogger.register_frame_to_skip(__file__, "_forward_native_lines")


def setup(*, verbose: bool = False, stream=None):
  """The terminal's filters on absl's stderr handler, and a log file that buffers until
  `log_to_file` knows the workdir. Call once, before anything logs (the CLI does)."""
  stream = stream or sys.stderr
  handler = logging.get_absl_handler()
  if not verbose:
    quiet = _interactive(stream)
    handler.addFilter(_TerminalFilter(quiet))
    if quiet:  # The events as plain lines, not absl's "I1202 08:15:42.005 ... file.py:29]".
      handler.setFormatter(_TerminalFormatter())
  root = logging_std.getLogger()
  if not any(isinstance(h, _LogFile) for h in root.handlers):
    root.addHandler(_LogFile())


def log_to_file(workdir: str, process_index: int) -> "_LogFile | None":
  """From now on (and for what was buffered) the full log goes to a file in `workdir`.

  Returns the handler; `close_log_file(handler)` at the end of the run. Without `setup`
  (e.g. the Python API) this adds the handler itself. A workdir in an object store
  (`gs://...`, which cannot append) keeps no log file: the job's own output is the log.
  """
  root = logging_std.getLogger()
  if "://" in workdir:
    for h in [h for h in root.handlers if isinstance(h, _LogFile)]:
      close_log_file(h)
    return None
  handler = next((h for h in root.handlers if isinstance(h, _LogFile)), None)
  if handler is None:
    handler = _LogFile()
    root.addHandler(handler)
  handler.open(log_path(workdir, process_index))
  return handler


def close_log_file(handler: "_LogFile | None"):
  if handler is None:
    return
  root = logging_std.getLogger()
  if handler in root.handlers:
    root.removeHandler(handler)
  handler.close()


def log_path(workdir: str, process_index: int = 0) -> str:
  name = "flaxtrain.log" if process_index == 0 else f"flaxtrain.process{process_index}.log"
  return os.path.join(workdir, name)


# Native start-up notes: glog/absl-style INFO and WARNING lines ("I0000 00:00:17.. port.cc:153]
# oneDNN ...") and absl's note that it logs to stderr before InitializeLog. Everything else
# printed on fd 2 (errors, fatal checks, unknown text) still reaches the terminal.
_NOTE = re.compile(
  r"^(?:[IW]\d{4} |WARNING: All log messages before absl::InitializeLog\(\) is called)"
)


@contextlib.contextmanager
def startup_notes_to_log():
  """Runs the block with file descriptor 2 read through a pipe, line by line as it comes:
  native start-up notes (TensorFlow's oneDNN note, XLA's INFO/WARNING lines) go to the log
  file only; any other line (an error, a fatal check, unknown text) is also written to the
  real stderr at once, so that a crash inside the block still shows its reason. Python's
  own writes to sys.stderr (log records, warnings) bypass the pipe."""
  try:
    sys.stderr.flush()
    saved = os.dup(2)
  except (OSError, ValueError):  # No real stderr (e.g. some notebooks): nothing to do.
    yield
    return
  python_stderr, swapped, real, reader = sys.stderr, [], None, None
  try:
    real = os.fdopen(os.dup(saved), "w", buffering=1, encoding="utf-8", errors="replace")
    read_end, write_end = os.pipe()
    reader = threading.Thread(
      target=_forward_native_lines, args=(read_end, real), name="fd2-notes", daemon=True
    )
    reader.start()
    # Every handler that writes to fd 2 writes to the real stderr meanwhile: one left on the
    # pipe (e.g. the root handler absl's logging installs in a script without app.run) would
    # send the reader's own log records back to it, without end.
    for handler in _stream_handlers():
      if _writes_to_fd2(handler.stream):
        swapped.append((handler, handler.setStream(real)))
    sys.stderr = real
    os.dup2(write_end, 2)
    os.close(write_end)
    yield
  finally:
    os.dup2(saved, 2)  # Closes the pipe's last write end: the reader sees its end.
    os.close(saved)
    sys.stderr = python_stderr
    for handler, previous in reversed(swapped):
      handler.setStream(previous)
    if reader is not None:
      reader.join(timeout=5)
    if real is not None:
      real.close()


def _stream_handlers() -> list[logging_std.StreamHandler]:
  """absl's stderr handler and the stream handlers on the root and absl loggers."""
  handlers = [logging.get_absl_handler().python_handler]
  for logger in (logging_std.getLogger(), logging_std.getLogger("absl")):
    handlers += [h for h in logger.handlers if h not in handlers]
  return [h for h in handlers if isinstance(h, logging_std.StreamHandler)]


def _writes_to_fd2(stream) -> bool:
  try:
    return stream.fileno() == 2
  except (AttributeError, OSError, ValueError):  # No file behind it (a StringIO, closed).
    return False


def _forward_native_lines(fd: int, real):
  with os.fdopen(fd, "rb") as pipe:
    for raw in pipe:
      line = raw.decode(errors="replace").rstrip("\n")
      if not line.strip():
        continue
      if _NOTE.match(line):
        file_only("%s", line)
      else:
        try:
          real.write(line + "\n")
        except (OSError, ValueError):  # The block ended and closed it: the file still has it.
          pass
        file_only("%s", line)


def import_tensorflow_quietly():
  """Imports TensorFlow, only where it is used (TFDS's preparation and tf.data reads, a
  remote TensorBoard logdir, export, report): its start-up notes go to the log file, and
  the accelerators are hidden from it (it only reads and converts; left alone it would
  reserve GPU memory that JAX needs). Returns the module; later calls return it at once."""
  if _tensorflow:
    return _tensorflow[0]
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  with startup_notes_to_log():
    import tensorflow as tf

  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError) as e:  # Devices already initialized, or no such kind.
      logging.warning("Could not hide %s devices from TensorFlow: %s", kind, e)
  _tensorflow.append(tf)
  return tf


_tensorflow = []  # The module, once imported by import_tensorflow_quietly.


@contextlib.contextmanager
def api_logging():
  """For `flaxtrain.train` outside the command line (a script, a notebook): absl's INFO
  records are made, so that the log file gets them (from the start: buffered until the
  workdir exists); stderr shows only the events, warnings and errors. Yields the stderr
  handler (the progress bar clears its line before it writes). Everything is put back
  afterwards."""
  absl_logger = logging_std.getLogger("absl")
  root = logging_std.getLogger()
  verbosity, propagate = logging.get_verbosity(), absl_logger.propagate
  terminal = logging_std.StreamHandler(sys.stderr)
  terminal.setFormatter(_TerminalFormatter())
  terminal.addFilter(_TerminalFilter(quiet=True))
  log_file = next((h for h in root.handlers if isinstance(h, _LogFile)), None)
  own_file = log_file is None
  if own_file:
    log_file = _LogFile()
    root.addHandler(log_file)  # Other libraries' records.
  # absl's records go to these two only: a handler the caller's program (or a library's
  # logging.basicConfig) put on the root logger would print every INFO line.
  absl_logger.addHandler(terminal)
  absl_logger.addHandler(log_file)
  absl_logger.propagate = False
  logging.set_verbosity(logging.INFO)
  try:
    yield terminal
  finally:
    logging.set_verbosity(verbosity)
    absl_logger.propagate = propagate
    absl_logger.removeHandler(terminal)
    absl_logger.removeHandler(log_file)
    if own_file:
      close_log_file(log_file)


class _TerminalFilter(logging_std.Filter):
  """Quiet (a terminal): events, warnings and errors. Otherwise: all but library chatter."""

  def __init__(self, quiet: bool):
    super().__init__()
    self.quiet = quiet

  def filter(self, record):
    if getattr(record, _FILE_ONLY, False):
      return False
    if record.levelno >= logging_std.WARNING:
      return True
    if self.quiet:
      return getattr(record, _EVENT, False)
    return not any(n in record.pathname for n in _NOISY)


class _TerminalFormatter(logging_std.Formatter):
  def format(self, record):
    text = record.getMessage()
    if record.levelno >= logging_std.WARNING:
      text = f"{record.levelname.capitalize()}: {text}"
    if record.exc_info:
      text += "\n" + self.formatException(record.exc_info)
    return text


class _LogFile(logging_std.Handler):
  """Every record at INFO and above, in absl's format: buffered until `open(path)`."""

  def __init__(self):
    super().__init__(logging_std.INFO)
    self.setFormatter(logging.PythonFormatter())
    self._buffer = []
    self._file = None

  def open(self, path: str):
    self.acquire()
    try:
      if self._file is not None:
        self._file.close()
      self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close().
      started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
      self._file.write(f"---- flaxtrain {started}: {' '.join(sys.argv)}\n")
      for record in self._buffer:
        self._write(record)
      self._buffer = []
      self._file.flush()
    finally:
      self.release()

  def emit(self, record):
    try:
      if self._file is None:
        if len(self._buffer) < 10_000:  # Before the workdir exists.
          self._buffer.append(record)
        return
      self._write(record)
      self._file.flush()
    except Exception:  # noqa: BLE001 - logging's own rule: report, never raise.
      self.handleError(record)

  def _write(self, record):
    self._file.write(self.format(record) + "\n")

  def close(self):
    self.acquire()
    try:
      if self._file is not None:
        self._file.close()
        self._file = None
      self._buffer = []
    finally:
      self.release()
    super().close()


def _interactive(stream) -> bool:
  isatty = getattr(stream, "isatty", None)
  return bool(isatty and isatty())
