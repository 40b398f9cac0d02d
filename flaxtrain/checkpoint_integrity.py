"""What a checkpoint is checked against when it is read.

* Its checksums: one per array, recorded with each save (`checksums`) and compared after
  reading, so flipped bits, which Orbax itself reads back silently, make a checkpoint
  unreadable rather than a silent change of the weights.
* Its structure: every entry and shape against what the config builds (`describe`,
  `check`), so a checkpoint of another model or optimizer is a one-sentence UserError
  that names the first entry that differs, never a fallback.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from flaxtrain.errors import UserError
from flaxtrain.optimizers import path_str


def _leaf_bits(x):
  """The bits of `x` as a flat uint32 vector (each element widened, not packed)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = x.dtype.itemsize
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32).ravel()
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).ravel()


@jax.jit
def _checksum_leaves(leaves):
  # A position-weighted sum modulo 2**32 with odd weights: any single flipped bit changes
  # it, and it is exact (integer), so it is the same for any device count or layout.
  out = []
  for x in leaves:
    bits = _leaf_bits(x)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
    out.append(jnp.sum(bits * weights, dtype=jnp.uint32))
  return jnp.stack(out) if out else jnp.zeros((0,), jnp.uint32)


def checksums(tree) -> dict[str, int]:
  """{entry: checksum} of every array in `tree` (computed on its devices)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  keys, leaves = [], []
  for path, leaf in flat:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not hasattr(leaf, "shape"):
      continue
    if (
      jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
      or dtype == jnp.bfloat16
      or getattr(dtype, "kind", "") in "biuf"
      and dtype.itemsize in (1, 2, 4, 8)
    ):
      keys.append(path_str(path))
      leaves.append(leaf)
  if not leaves:
    return {}
  values = np.asarray(jax.device_get(_checksum_leaves(leaves)))
  return {k: int(v) for k, v in zip(keys, values, strict=True)}


def describe(tree) -> dict[str, tuple]:
  """{entry: shape} of every leaf of `tree` (arrays, shape structs or Orbax metadata)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  out = {}
  for path, leaf in flat:
    shape = getattr(leaf, "shape", None)
    out[path_str(path)] = tuple(np.shape(leaf) if shape is None else shape)
  return out


# Where a difference is reported first, and what it most likely means.
_GROUPS = (
  ("params", "the model"),
  ("model_state", "the model"),
  ("opt_state", "the optimizer"),
  ("step", "the train state"),
)


def _group(key: str) -> int:
  top = key.split("/")[0]
  return next((i for i, (g, _) in enumerate(_GROUPS) if g == top), len(_GROUPS))


def check(saved_d: dict, target_d: dict, *, where: str, advice: str | None):
  """Raises a UserError naming the first entry where two `describe`d trees differ.

  Params are compared before the optimizer state, so that another model is reported
  as such; an optimizer whose state has other entries or shapes is caught too.
  """
  keys = sorted(set(saved_d) | set(target_d), key=lambda k: (_group(k), k))
  differ = [k for k in keys if saved_d.get(k) != target_d.get(k)]
  if not differ:
    return
  logging.info("Checkpoint entries: %s", sorted(saved_d))
  key = differ[0]
  group = _GROUPS[_group(key)][1] if _group(key) < len(_GROUPS) else "the train state"

  def shape(d, k):
    return "missing" if d.get(k) is None else str(d[k])

  more = ""
  if len(differ) > 1:
    nxt = differ[1]
    more = (
      f" ({len(differ) - 1} more differ, e.g. {nxt}: {shape(saved_d, nxt)} vs "
      f"{shape(target_d, nxt)})"
    )
  advice = advice or "use a new --workdir or the config that wrote it"
  raise UserError(
    f"The checkpoint in {where} does not match what this config builds ({group} differs): "
    f"entry {key} is {shape(saved_d, key)} in the checkpoint but {shape(target_d, key)} "
    f"in the config{more}; {advice}."
  )
