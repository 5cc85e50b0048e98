"""Loading with grain: per-host shards, per-host batches, checkpointable iterator state.

Every JAX process (host) builds its own iterator over a disjoint shard of the source and yields
batches of ``global_batch_size // process_count`` examples; ``to_global_arrays`` then stitches
the per-host batches into global ``jax.Array`` s laid out by a sharding. The iterator's
position is a small JSON-friendly dict, saved next to the model checkpoint, so a restarted run
continues with exactly the batches it would have seen.

Determinism: the sources here generate each example from ``(seed, split, index)`` and every
epoch is a seeded permutation of the host's shard (``_EpochOrder``), so the whole stream is a pure
function of the configuration and the iterator state: no hidden RNG state to checkpoint.
"""

import json
from typing import Any

import grain.python as grain
import jax
import numpy as np

from attn_jax.data.mqar import _check_int


def make_iterator(
  source: Any,
  *,
  global_batch_size: int,
  seed: int,
  shuffle: bool = True,
  num_epochs: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  drop_remainder: bool = True,
) -> "BatchIterator":
  """Builds this host's iterator of batches over ``source``.

  The source is split into ``process_count`` contiguous, equal shards (the remainder of
  ``len(source) % process_count`` examples is dropped so every host runs the same number of
  steps; uneven hosts would hang in the first collective). With ``shuffle`` each host shuffles
  its shard, differently every epoch.

  Args:
    source: random-access source (``__len__``, ``__getitem__`` returning a dict of numpy
      arrays, and a ``__repr__`` that identifies its configuration, which grain checks when
      restoring a state).
    global_batch_size: examples per step over all hosts; must be divisible by
      ``process_count``.
    seed: shuffle seed, an int in ``[0, 2**32)``.
    shuffle: shuffle within each host's shard (reshuffled every epoch).
    num_epochs: passes over the data; None repeats forever.
    process_index: this host's index; defaults to ``jax.process_index()``.
    process_count: number of hosts; defaults to ``jax.process_count()``.
    drop_remainder: drop the last incomplete batch of the stream (only reachable with a
      finite ``num_epochs``), keeping batch shapes static.

  Returns:
    A grain iterator yielding dicts of numpy arrays with leading dimension
    ``global_batch_size // process_count``. Save and restore its position with
    ``get_iterator_state`` / ``set_iterator_state``.
  """
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  process_count = _check_int("process_count", process_count, minimum=1)
  process_index = _check_int("process_index", process_index, minimum=0)
  if process_index >= process_count:
    raise ValueError(
      f"process_index must be < process_count ({process_count}); got {process_index}"
    )
  global_batch_size = _check_int("global_batch_size", global_batch_size, minimum=1)
  if global_batch_size % process_count:
    raise ValueError(
      f"global_batch_size must be divisible by process_count ({process_count}); "
      f"got {global_batch_size}"
    )
  seed = _check_int("seed", seed, minimum=0)
  if seed >= 2**32:
    raise ValueError(f"seed must be < 2**32 (grain's shuffle seed is 32-bit); got {seed}")
  if num_epochs is not None:
    num_epochs = _check_int("num_epochs", num_epochs, minimum=1)
  num_records = len(source)
  if num_records < process_count:
    raise ValueError(
      f"source has {num_records} examples, fewer than process_count ({process_count}): "
      "some host would get an empty shard"
    )

  per_host = num_records // process_count
  local_batch = global_batch_size // process_count
  order = _EpochOrder(per_host, process_index * per_host, seed, bool(shuffle))
  if drop_remainder:
    batches_per_epoch = per_host // local_batch
  else:
    batches_per_epoch = -(-per_host // local_batch)
  if batches_per_epoch < 1:
    raise ValueError(
      f"each host's shard has {per_host} examples, fewer than its batch of {local_batch}"
    )
  # One grain element per batch: the batch's example indices are computed in one slice of
  # the epoch's permutation (per-example grain elements cost ~50 us each on this path).
  total = batches_per_epoch * num_epochs if num_epochs else 2**62  # None: endless
  ds = grain.MapDataset.range(total)
  ds = ds.map(lambda b: _read_batch(source, order.batch(b, batches_per_epoch, local_batch)))
  fingerprint = (
    f"{source!r} seed={seed} shuffle={bool(shuffle)} epochs={num_epochs} "
    f"host={process_index}/{process_count} batch={global_batch_size}"
  )
  return BatchIterator(iter(ds.to_iter_dataset()), fingerprint)


class _EpochOrder:
  """Example order of one host: a fresh seeded permutation of its shard every epoch."""

  def __init__(self, size: int, offset: int, seed: int, shuffle: bool):
    self.size, self.offset, self.seed, self.shuffle = size, offset, seed, shuffle
    self._cache: tuple[int, np.ndarray] | None = None

  def permutation(self, epoch: int) -> np.ndarray:
    if self._cache is None or self._cache[0] != epoch:
      perm = np.arange(self.size)
      if self.shuffle:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.size)
      self._cache = (epoch, perm + self.offset)
    return self._cache[1]

  def batch(self, index: int, batches_per_epoch: int, batch_size: int) -> np.ndarray:
    epoch, position = divmod(int(index), batches_per_epoch)
    return self.permutation(epoch)[position * batch_size : (position + 1) * batch_size]


def _read_batch(source, indices) -> dict[str, np.ndarray]:
  """One batch: vectorised through ``source.generate`` when it has one, else per example."""
  indices = np.asarray(indices, np.int64)
  if hasattr(source, "generate"):
    return source.generate(indices)
  examples = [source[int(i)] for i in indices]
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


class BatchIterator:
  """A grain dataset iterator plus the fingerprint of the configuration it reads.

  The fingerprint travels with the saved state so a state is never restored into an
  iterator over different data (a silent mismatch would break exact resumption).
  """

  def __init__(self, iterator, fingerprint: str):
    self._iterator, self.fingerprint = iterator, fingerprint

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def get_state(self) -> dict[str, Any]:
    return {"position": self._iterator.get_state(), "fingerprint": self.fingerprint}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get("fingerprint") != self.fingerprint:
      raise ValueError(
        "iterator state comes from a different data configuration: saved "
        f"{state.get('fingerprint')!r}, this iterator {self.fingerprint!r}"
      )
    self._iterator.set_state(state["position"])


def get_iterator_state(it: Any) -> dict[str, Any]:
  """The iterator's position as a JSON-serialisable dict (save it with the checkpoint).

  The state is the grain dataset iterator's position plus the data-configuration
  fingerprint; bytes (from iterators that return them) are decoded so the state can sit
  inside a larger JSON / orbax metadata tree.

  Args:
    it: an iterator from ``make_iterator`` (or any iterator with ``get_state``).

  Returns:
    A dict of plain Python values.
  """
  state = it.get_state()
  if isinstance(state, (bytes, bytearray)):
    state = json.loads(state.decode("utf-8"))
  # Round trip through JSON so the caller gets plain types (and fails here, not at save time).
  return json.loads(json.dumps(state))


def set_iterator_state(it: Any, state: dict[str, Any]) -> None:
  """Moves ``it`` to the position in ``state``: it next yields what the saved one would have.

  The iterator must come from ``make_iterator`` with the same source, seed, shuffle,
  epochs, sharding and batch size; a different fingerprint raises ValueError.

  Args:
    it: an iterator from ``make_iterator`` (or any iterator with ``set_state``).
    state: a dict from ``get_iterator_state``.
  """
  it.set_state(state)


def to_global_arrays(
  batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding
) -> dict[str, jax.Array]:
  """Assembles every host's local batch into global arrays laid out by ``sharding``.

  Each host passes the rows it read; the global leading dimension is the sum over hosts
  (``jax.make_array_from_process_local_data`` infers it), so the same code runs on one host
  and on many.

  Args:
    batch: this host's batch, a dict of numpy arrays with the per-host leading dimension.
    sharding: the layout of the global arrays (typically ``NamedSharding(mesh, P("data"))``).

  Returns:
    A dict with the same keys holding global ``jax.Array`` s.
  """
  return {
    name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
    for name, value in batch.items()
  }
