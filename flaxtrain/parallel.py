"""The one module that knows about devices, meshes and the data-parallel axis.

flaxtrain runs pmap-style data parallelism: the train state is replicated on every
device, each device runs the same per-device code on its slice of the global batch,
and gradients are averaged over the axis `AXIS`. It is written as `jax.jit` over
`jax.shard_map` on a 1-D mesh of all devices of all processes, which is what the new
`jax.pmap` compiles to, minus its host-local round trips: replicated values are
global arrays with `P()` sharding (no stacked copies, no gathers to unreplicate), so
multi-process checkpoints and metrics need no conversion.
"""

import itertools
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from orbax.checkpoint import multihost

AXIS = "batch"
REPLICATED = P()
BATCH = P(AXIS)  # Leading axis split over devices.
STEPS_BATCH = P(None, AXIS)  # [steps, global_batch, ...]: the batch axis split.


class DataParallel:
  """A mesh over `devices` (default: all devices of all processes) with axis `AXIS`."""

  def __init__(self, devices: Sequence[jax.Device] | None = None):
    self.devices = list(devices if devices is not None else jax.devices())
    self.mesh = Mesh(np.array(self.devices), (AXIS,))
    self.num_devices = len(self.devices)
    self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
    self.num_processes = jax.process_count()
    self.process_index = jax.process_index()

  def sharding(self, spec: P) -> NamedSharding:
    return NamedSharding(self.mesh, spec)

  def replicate(self, tree):
    """Host values (identical on every process) -> replicated global arrays."""
    return jax.tree.map(lambda x: self.put(np.asarray(x), REPLICATED), tree)

  def put(self, x: np.ndarray, spec: P) -> jax.Array:
    """A host array holding the *global* value -> a global array with `spec`.

    Each process only copies the slices its own devices hold, so with `BATCH` specs a
    process transfers its share of the batch and nothing else.
    """
    return self.put_from_callback(x.shape, spec, lambda idx: x[idx])

  def put_from_callback(self, shape, spec: P, fetch: Callable) -> jax.Array:
    """Global array whose per-device blocks come from `fetch(index_tuple)` on the host."""
    return jax.make_array_from_callback(shape, self.sharding(spec), fetch)

  def to_host(self, tree):
    """Replicated global arrays -> numpy, from this process's first copy (no gather)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)

  def compile(self, fn: Callable, in_specs, out_specs, donate_argnums=()) -> Callable:
    """`fn` is per-device code; returns it jitted over the mesh."""
    # check_vma=False keeps pmap's semantics: values made equal by a collective (pmean,
    # all_gather) may be returned replicated, and loop carries need no varying casts.
    mapped = jax.shard_map(
      fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
    )
    jitted = jax.jit(mapped, donate_argnums=donate_argnums)
    return jitted if self.num_processes == 1 else _CompiledThenSynced(jitted)

  def describe(self) -> str:
    kinds = sorted({d.device_kind for d in self.devices})
    return (
      f"{self.num_processes} process(es) x {len(self.local_devices)} local device(s) "
      f"= {self.num_devices} {'/'.join(kinds)} device(s)"
    )


# How long a process waits for the others to compile a program (a slow host compiling a
# large model without the cache).
_COMPILE_SKEW_S = 3600
# Barrier keys must be unique; every process compiles its programs in one order.
_BARRIER_IDS = itertools.count(1)


class _CompiledThenSynced:
  """A multi-process program whose first run starts on every process together.

  On the CPU, a program's first collective sets up its Gloo context and gives up after
  30 s (a fixed limit in XLA) if another process has not arrived: one process still
  compiling (a busy host, a compilation-cache miss) fails the run. So the first call
  compiles ahead of time, waits at a barrier of the coordination service (no collective,
  no 30 s limit), and runs the compiled program from then on.
  """

  def __init__(self, jitted):
    self._jitted = jitted
    self._compiled = None
    self.lower = jitted.lower

  def __call__(self, *args):
    if self._compiled is None:
      compiled = self._jitted.lower(*args).compile()
      multihost.get_barrier_sync_fn()(
        key=f"flaxtrain_compiled_{next(_BARRIER_IDS)}", timeout_ms=_COMPILE_SKEW_S * 1000
      )
      self._compiled = compiled
    return self._compiled(*args)


# Per-device helpers, valid inside functions passed to `DataParallel.compile`.


def mean(tree):
  # One device: nothing to average (x / 1), and XLA:CPU would still run a collective.
  return tree if jax.lax.axis_size(AXIS) == 1 else jax.lax.pmean(tree, AXIS)


def device_index():
  return jax.lax.axis_index(AXIS)


def gather_metrics(collection):
  """A per-device CLU collection -> the collection over all devices (replicated)."""
  if jax.lax.axis_size(AXIS) == 1:
    return collection  # Its own reduction; no all-gather per metric.
  return jax.lax.all_gather(collection, AXIS).reduce()


def tree_sum(tree, num_devices: int):
  """The sum over devices as one fixed balanced binary tree (pairs of neighbours first).

  Recursive doubling: at level l each device adds its partner's value (index XOR 2^l);
  IEEE addition is commutative, so both partners hold the same bits after every level and
  every device ends with the same sum, whose rounding depends only on the leaf order. A
  device's value that is itself a balanced tree over its consecutive slice of leaves
  makes the result bitwise the one-device balanced sum (`num_devices` a power of two).
  """
  level = 1
  while level < num_devices:
    perm = [(i, i ^ level) for i in range(num_devices)]
    tree = jax.tree.map(lambda x, pm=perm: x + jax.lax.ppermute(x, AXIS, pm), tree)
    level *= 2
  return tree
