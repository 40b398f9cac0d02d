"""config -> (DatasetSpec, source): the one place that picks a data source.

A source has `plan` (the index plan), `description`, `train_batches(start, n, chunk)`,
`eval_batches()` (chunks of masked eval batches), `eval_examples(n)` and `close()`.
"""

import ml_collections

from flaxtrain import parallel
from flaxtrain.data import augment, memory


def make(config: ml_collections.ConfigDict, par: parallel.DataParallel):
  ds = config.dataset
  spec, train, evald = memory.load(ds.name, data_dir=ds.data_dir, manual_dir=ds.manual_dir,
                                   train_split=ds.train_split, eval_split=ds.eval_split)
  augment.validate(config.augment, spec.image_shape)
  source = memory.MemorySource(
      train, evald, par=par, seed=config.seed, batch_size=config.batch_size,
      eval_batch_size=config.eval_batch_size, on_device=ds.on_device)
  return spec, source
