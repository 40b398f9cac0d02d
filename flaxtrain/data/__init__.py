"""The data side: one interface for the loop, whatever the source.

  plan.py      the index plan every source shares (batches as functions of seed and step)
  prepare.py   what TFDS datasets exist and how they are prepared (offline, checksums)
  memory.py    decoded fixed-size splits in host memory, on device or gathered on host
  augment.py   on-device augmentation, per example, keyed by (seed, step, example)
  sources.py   config -> (spec, source): the one entry point the experiment calls

Kept free of imports: input worker processes import modules of this package and must
never import JAX.
"""
