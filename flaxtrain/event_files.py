"""TensorBoard event files written without TensorFlow.

A run writes scalars and its config (the hparams plugin's summary) to
`<workdir>/events.out.tfevents.*`, as TensorFlow's summary writer does: the same records
(TFRecord framing of `Event` protos), the same summaries (`tf.summary.scalar`'s float32
tensor with the scalars plugin's metadata; the hparams plugin's protos at step 0), so that
TensorBoard, `tf.data.TFRecordDataset` and TensorBoard's EventAccumulator read them as
theirs. Importing TensorFlow costs several seconds of CPU at every start (about 9 s on a
2-core VM), for a few hundred bytes per log step; TensorBoard's own package has the protos.

A workdir on a remote file system (gs://, ...) is written through CLU's SummaryWriter
(TensorFlow's file systems), which imports TensorFlow only then.
"""

import os
import socket
import time
from collections.abc import Mapping
from typing import Any

from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, types_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.summary.writer.record_writer import RecordWriter

from flaxtrain import console

_FILE_VERSION = "brain.Event:2"
_SCALAR_METADATA = scalar_metadata.create_summary_metadata(display_name=None, description=None)
_count = 0  # Event files this process opened: a run that opens two gets two names.


def create(logdir: str):
  """The TensorBoard writer for `logdir`: an `EventFileWriter` where it is a local path."""
  if "://" in os.fspath(logdir):
    console.import_tensorflow_quietly()
    from clu import metric_writers

    return metric_writers.SummaryWriter(os.fspath(logdir))
  return EventFileWriter(logdir)


class EventFileWriter:
  """Scalars and hparams into one new event file in a local `logdir` (made if missing).

  Each write reaches the file before it returns (one small write per call: TensorBoard
  shows a live run's steps as they come, and a killed run keeps what it logged).
  """

  def __init__(self, logdir: str):
    global _count
    os.makedirs(logdir, exist_ok=True)
    _count += 1
    name = (
      f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.{_count}.v2"
    )
    self.path = os.path.join(logdir, name)
    self._records = RecordWriter(open(self.path, "xb"))  # noqa: SIM115 - closed by close().
    self._write(event_pb2.Event(wall_time=time.time(), file_version=_FILE_VERSION))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    values = [
      summary_pb2.Summary.Value(tag=tag, tensor=_float32(value), metadata=_SCALAR_METADATA)
      for tag, value in scalars.items()
    ]
    self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary={"value": values}))

  def write_hparams(self, hparams: Mapping[str, Any]):
    summary = hparams_summary.hparams_pb(dict(hparams))
    self._write(event_pb2.Event(wall_time=time.time(), step=0, summary=summary))

  def flush(self):
    self._records.flush()

  def close(self):
    if not self._records.closed:
      self._records.close()

  def _write(self, event: event_pb2.Event):
    self._records.write(event.SerializeToString())
    self._records.flush()


def _float32(value) -> tensor_pb2.TensorProto:
  """A scalar float32 tensor, as `tf.summary.scalar` writes it."""
  return tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[float(value)], tensor_shape={})
