"""Attention masks as objects: a predicate for the oracle, a block map for fast paths.

Dimension key: B batch, T query length, S key/value length, nQ / nK number of query /
key-value blocks, M padded length of a per-q-block list.

Positions: query ``i`` sits at position ``i + q_offset`` and key ``j`` at ``j``. The default
``q_offset = S - T`` aligns queries bottom-right, so a causal mask lets the last query see
every key whether this is prefill (T == S), chunked prefill or decode (T < S).

Every mask gives:
  * ``dense(T, S)``: bool ``[T, S]`` (static masks) or ``[B, T, S]`` (masks holding arrays);
  * ``block_kinds(T, S, block_q, block_kv)``: per (q-block, kv-block) EMPTY / PARTIAL / FULL;
  * ``block_lists(...)``: the compacted list of non-empty kv blocks of each q block.

Static masks (no arrays inside) compute their block maps on the host with numpy, analytically
from the block bounds (never from a dense T x S array), and cache them. Masks holding arrays
(segment ids, per-example prefix lengths, block indices) compute them with jax.numpy, so they
work under ``jit`` with traced arrays. Combining with ``&`` / ``|`` is exact for the dense
predicate and conservative for block maps (a block may be called PARTIAL when it is in fact
EMPTY or FULL; never the other way round).
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _blocks

EMPTY, PARTIAL, FULL = 0, 1, 2


def _check_int(name: str, value: Any, *, minimum: int, allow_none: bool = False) -> None:
  if value is None and allow_none:
    return
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}; got {value}")


def _num_blocks(length: int, block: int) -> int:
  return -(-length // block)


def _block_bounds(length: int, block: int):
  """First and last valid index of every block (the last block is clipped to length)."""
  lo = np.arange(_num_blocks(length, block)) * block
  hi = np.minimum(lo + block, length) - 1
  return lo, hi


class Mask:
  """Base class. Subclasses implement ``_visible`` and ``_any_all``."""

  #: True when the mask holds arrays with a leading batch axis.
  batched: bool = False

  # -- to implement -------------------------------------------------------------------
  def _visible(self, q_idx, kv_idx, q_offset: int, b):
    """Bool visibility for broadcastable index arrays; ``b`` is a batch index or None."""
    raise NotImplementedError

  def _any_all(self, q_lo, q_hi, kv_lo, kv_hi, q_offset: int, xp):
    """(any visible, all visible) for the blocks [q_lo, q_hi] x [kv_lo, kv_hi] (inclusive).

    ``q_*`` have shape [nQ, 1] and ``kv_*`` shape [1, nK]; batched masks return [B, nQ, nK].
    ``any`` may over-approximate and ``all`` may under-approximate, never the reverse.
    """
    raise NotImplementedError

  def check_shapes(self, batch: int, q_len: int, kv_len: int) -> None:
    """Raises ValueError when the arrays inside the mask do not fit the call."""

  def within_tiles(self, block_q: int, block_kv: int, *, q_offset: int | None = None) -> "Mask":
    """The mask left to evaluate inside the non-empty tiles of a ``block_q x block_kv``
    tiling: a part whose visibility is constant on every such tile is all-visible there
    (the block map already skipped the tiles where it is not). ``q_offset`` is the call's
    (S − T); masks of positions reduce only when it is given. Default: the mask itself."""
    return self

  # -- public -------------------------------------------------------------------------
  def __and__(self, other: "Mask") -> "Mask":
    return AndMask(_as_mask(self, "left"), _as_mask(other, "right"))

  def __or__(self, other: "Mask") -> "Mask":
    return OrMask(_as_mask(self, "left"), _as_mask(other, "right"))

  def visible(self, q_idx, kv_idx, *, q_offset: int, batch_index=None):
    """Visibility of query indices ``q_idx`` against key indices ``kv_idx`` (broadcast).

    With ``batch_index`` (a scalar, possibly traced) a batched mask reads that example's
    arrays; without it, a batched mask returns a leading batch axis.
    """
    return self._visible(q_idx, kv_idx, q_offset, batch_index)

  def dense(self, q_len: int, kv_len: int, *, q_offset: int | None = None):
    """Bool visibility ``[T, S]``, or ``[B, T, S]`` for batched masks."""
    _check_int("q_len", q_len, minimum=1)
    _check_int("kv_len", kv_len, minimum=1)
    if q_offset is None:
      q_offset = kv_len - q_len
    q_idx = jnp.arange(q_len)[:, None]
    kv_idx = jnp.arange(kv_len)[None, :]
    return jnp.broadcast_to(
      self._visible(q_idx, kv_idx, q_offset, None),
      ((self._batch_size(),) if self.batched else ()) + (q_len, kv_len),
    )

  def block_kinds(
    self, q_len: int, kv_len: int, block_q: int, block_kv: int, *, q_offset: int | None = None
  ):
    """EMPTY / PARTIAL / FULL per (q-block, kv-block): int8 ``[nQ, nK]`` or ``[B, nQ, nK]``.

    Masks without arrays return a cached host numpy array; masks holding arrays a jax array.
    """
    for name, value in (
      ("q_len", q_len),
      ("kv_len", kv_len),
      ("block_q", block_q),
      ("block_kv", block_kv),
    ):
      _check_int(name, value, minimum=1)
    if q_offset is None:
      q_offset = kv_len - q_len
    if self.holds_arrays:
      return self._block_kinds_impl(q_len, kv_len, block_q, block_kv, q_offset, jnp)
    return _cached_static_block_kinds(self, q_len, kv_len, block_q, block_kv, q_offset)

  @property
  def holds_arrays(self) -> bool:
    """True when the mask carries arrays (possibly traced): block maps use jax.numpy."""
    return bool(jax.tree_util.tree_leaves(self))

  def block_lists(
    self, q_len: int, kv_len: int, block_q: int, block_kv: int, *, q_offset: int | None = None
  ):
    """Compacted non-empty kv blocks per q block.

    Returns ``(kv_count [.., nQ], kv_index [.., nQ, M], kv_full [.., nQ, M])``: the number
    of non-empty kv blocks, their indices in increasing order (padded by repeating the last
    one, or 0), and whether each listed block is FULL. M is the largest count for masks
    without arrays (numpy) and nK for masks holding arrays (jax arrays, static shapes).
    """
    kinds = self.block_kinds(q_len, kv_len, block_q, block_kv, q_offset=q_offset)
    return compact_block_kinds(kinds)

  def _block_kinds_impl(self, q_len, kv_len, block_q, block_kv, q_offset, xp):
    # Bounds are static (numpy) either way; xp is the library for the mask's own data.
    q_lo, q_hi = _block_bounds(q_len, block_q)
    kv_lo, kv_hi = _block_bounds(kv_len, block_kv)
    any_, all_ = self._any_all(
      q_lo[:, None], q_hi[:, None], kv_lo[None, :], kv_hi[None, :], q_offset, xp
    )
    shape = ((self._batch_size(),) if self.batched else ()) + (len(q_lo), len(kv_lo))
    kinds = xp.where(all_, FULL, xp.where(any_, PARTIAL, EMPTY)).astype(xp.int8)
    return xp.broadcast_to(kinds, shape)

  def _batch_size(self) -> int:
    raise NotImplementedError


def _as_mask(value, side: str) -> Mask:
  if not isinstance(value, Mask):
    raise ValueError(
      f"can only combine a Mask with a Mask; the {side} operand is {type(value).__name__}"
    )
  return value


@functools.lru_cache(maxsize=256)
def _cached_static_block_kinds(mask, q_len, kv_len, block_q, block_kv, q_offset):
  kinds = mask._block_kinds_impl(q_len, kv_len, block_q, block_kv, q_offset, np)
  kinds = np.ascontiguousarray(kinds)
  kinds.setflags(write=False)
  return kinds


def compact_block_kinds(kinds):
  """(count, index, full) lists of the non-empty blocks along the last axis of ``kinds``.

  The compaction the Pallas kernels use (``pallas_kernels._blocks.compact``), with ``full``
  as a bool array.
  """
  count, index, full = _blocks.compact(kinds)
  return count, index, full.astype(bool)


# ---------------------------------------------------------------------------------------
# Static masks: frozen dataclasses (hashable, cached), pytrees without leaves.
# ---------------------------------------------------------------------------------------


class _StaticMask(Mask):
  batched = False

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    jax.tree_util.register_static(cls)


@dataclasses.dataclass(frozen=True)
class FullMask(_StaticMask):
  """Every key visible to every query (non-causal attention)."""

  def _visible(self, q_idx, kv_idx, q_offset, b):
    return jnp.ones(jnp.broadcast_shapes(jnp.shape(q_idx), jnp.shape(kv_idx)), bool)

  def _any_all(self, q_lo, q_hi, kv_lo, kv_hi, q_offset, xp):
    true = xp.ones(xp.broadcast_shapes(q_lo.shape, kv_lo.shape), bool)
    return true, true


@dataclasses.dataclass(frozen=True)
class CausalMask(_StaticMask):
  """Key j is visible to query i iff ``j <= i + q_offset`` (bottom-right aligned)."""

  def _visible(self, q_idx, kv_idx, q_offset, b):
    return kv_idx <= q_idx + q_offset

  def _any_all(self, q_lo, q_hi, kv_lo, kv_hi, q_offset, xp):
    return kv_lo <= q_hi + q_offset, kv_hi <= q_lo + q_offset


@dataclasses.dataclass(frozen=True)
class LocalMask(_StaticMask):
  """Visible iff ``p - left <= j <= p + right`` with ``p = i + q_offset``.

  ``None`` leaves a side unbounded: ``LocalMask(None, 0)`` is causal, and
  ``LocalMask(w - 1, 0)`` is the causal sliding window of ``w`` keys including the query.
  """

  left: int | None
  right: int | None

  def __post_init__(self):
    _check_int("LocalMask left", self.left, minimum=0, allow_none=True)
    _check_int("LocalMask right", self.right, minimum=0, allow_none=True)

  def _visible(self, q_idx, kv_idx, q_offset, b):
    pos = q_idx + q_offset
    ok = jnp.ones(jnp.broadcast_shapes(jnp.shape(q_idx), jnp.shape(kv_idx)), bool)
    if self.left is not None:
      ok &= kv_idx >= pos - self.left
    if self.right is not None:
      ok &= kv_idx <= pos + self.right
    return ok

  def _any_all(self, q_lo, q_hi, kv_lo, kv_hi, q_offset, xp):
    shape = xp.broadcast_shapes(q_lo.shape, kv_lo.shape)
    any_, all_ = xp.ones(shape, bool), xp.ones(shape, bool)
    if self.left is not None:
      any_ = any_ & (kv_hi >= q_lo + q_offset - self.left)
      all_ = all_ & (kv_lo >= q_hi + q_offset - self.left)
    if self.right is not None:
      any_ = any_ & (kv_lo <= q_hi + q_offset + self.right)
      all_ = all_ & (kv_hi <= q_lo + q_offset + self.right)
    # Exact: the union over a q block of its bands is one interval, since bands are >= 1 wide.
    return any_, all_


@dataclasses.dataclass(frozen=True)
class SinkKeysMask(_StaticMask):
  """The first ``num_keys`` keys (attention-sink tokens), visible to every query: visible iff
  ``j < num_keys``. ``sliding_window(w) | (SinkKeysMask(n) & CausalMask())`` is the
  sinks-plus-recent-window pattern of streaming decoders."""

  num_keys: int

  def __post_init__(self):
    _check_int("SinkKeysMask num_keys", self.num_keys, minimum=0)

  def _visible(self, q_idx, kv_idx, q_offset, b):
    shape = jnp.broadcast_shapes(jnp.shape(q_idx), jnp.shape(kv_idx))
    return jnp.broadcast_to(kv_idx < self.num_keys, shape)

  def _any_all(self, q_lo, q_hi, kv_lo, kv_hi, q_offset, xp):
    shape = xp.broadcast_shapes(q_lo.shape, kv_lo.shape)
    return (
      xp.broadcast_to(kv_lo < self.num_keys, shape),
      xp.broadcast_to(kv_hi < self.num_keys, shape),
    )


@dataclasses.dataclass(frozen=True)
class AlignmentMask(_StaticMask):
  """Monotonic alignment of a slow sequence to a ``stride`` times faster one: query i sees
  keys ``stride·i <= j < stride·(i + 1)`` (FaceFormer's motion-to-audio mask, "FaceFormer:
  Speech-Driven 3D Facial Animation with Transformers"). Query indices count from the start
  of the query block (top-left aligned: ``q_offset`` is ignored)."""

  stride: int

  def __post_init__(self):
    _check_int("AlignmentMask stride", self.stride, minimum=1)

  def _visible(self, q_idx, kv_idx, q_offset, b):
    return kv_idx // self.stride == q_idx

  def _any_all(self, q_lo, q_hi, kv_lo, kv_hi, q_offset, xp):
    k = self.stride
    any_ = (kv_hi >= k * q_lo) & (kv_lo <= k * q_hi + k - 1)
    all_ = (q_lo == q_hi) & (kv_lo >= k * q_lo) & (kv_hi <= k * q_lo + k - 1)
    return any_, all_


def sliding_window(window: int) -> LocalMask:
  """Causal window of ``window`` keys including the query: visible iff i - w < j <= i."""
  _check_int("window", window, minimum=1)
  return LocalMask(window - 1, 0)


def sink_window(window: int, num_sinks: int) -> Mask:
  """Attention sinks plus a recent window ("Efficient Streaming Language Models with
  Attention Sinks"): key j is visible to query i iff ``j < num_sinks`` (and j <= i) or
  ``i − window < j <= i``. Its tile map is the first kv-block column plus the diagonal band.
  ``num_sinks = 0`` is ``sliding_window(window)``."""
  _check_int("window", window, minimum=1)
  _check_int("num_sinks", num_sinks, minimum=0)
  if num_sinks == 0:
    return sliding_window(window)
  return sliding_window(window) | (SinkKeysMask(num_sinks) & CausalMask())


def streaming_cache_indices(length: int, window: int, num_sinks: int) -> np.ndarray:
  """The key positions a streaming decoder keeps after ``length`` tokens so that the next
  query (at position ``length``) sees exactly its ``sink_window`` keys: the first
  ``num_sinks`` and the last ``window − 1`` (the query itself is the window's newest key).
  At most ``num_sinks + window − 1`` entries, whatever ``length`` is."""
  _check_int("length", length, minimum=0)
  _check_int("window", window, minimum=1)
  _check_int("num_sinks", num_sinks, minimum=0)
  sinks = np.arange(min(num_sinks, length))
  recent = np.arange(max(num_sinks, length - (window - 1)), length)
  return np.concatenate([sinks, recent]).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class _SameChunkMask(_StaticMask):
  chunk: int

  def _visible(self, q_idx, kv_idx, q_offset, b):
    return (q_idx + q_offset) // self.chunk == kv_idx // self.chunk

  def within_tiles(self, block_q, block_kv, *, q_offset=None):
    if _tiles_inside_chunks(self.chunk, block_q, block_kv, q_offset):
      return FullMask()
    return self

  def _any_all(self, q_lo, q_hi, kv_lo, kv_hi, q_offset, xp):
    c = self.chunk
    q_first, q_last = (q_lo + q_offset) // c, (q_hi + q_offset) // c
    kv_first, kv_last = kv_lo // c, kv_hi // c
    any_ = (kv_last >= q_first) & (kv_first <= q_last)
    all_ = (q_first == q_last) & (kv_first == kv_last) & (q_first == kv_first)
    return any_, all_


def _tiles_inside_chunks(chunk, block_q, block_kv, q_offset):
  """Whether every q tile (positions i·block_q + q_offset onward) and every kv tile lies
  inside one chunk: the tiles divide the chunk and the q tiles start on tile boundaries."""
  return (
    q_offset is not None
    and chunk % block_q == 0
    and chunk % block_kv == 0
    and q_offset % block_q == 0
  )


def window_blocks(window: int) -> Mask:
  """Non-overlapping windows: visible iff query and key fall in the same block of
  ``window`` positions (block-diagonal, non-causal; ``& CausalMask()`` for causal)."""
  _check_int("window", window, minimum=1)
  return _SameChunkMask(window)


@dataclasses.dataclass(frozen=True)
class ChunkedCausalMask(_StaticMask):
  """Block-diagonal causal: visible iff ``p // chunk == j // chunk`` and ``j <= p``."""

  chunk: int

  def __post_init__(self):
    _check_int("ChunkedCausalMask chunk", self.chunk, minimum=1)

  def _parts(self):
    return CausalMask(), _SameChunkMask(self.chunk)

  def within_tiles(self, block_q, block_kv, *, q_offset=None):
    # Where the same-chunk part is all-visible on the listed tiles, only the causal compare
    # is left (T = 4096, chunk = tile = 128, one pinned core, 4 heads: 11.7-12.0 vs
    # 12.2-12.9 ms forward).
    causal, same = self._parts()
    if isinstance(same.within_tiles(block_q, block_kv, q_offset=q_offset), FullMask):
      return causal
    return self

  def _visible(self, q_idx, kv_idx, q_offset, b):
    causal, same = self._parts()
    return causal._visible(q_idx, kv_idx, q_offset, b) & same._visible(q_idx, kv_idx, q_offset, b)

  def _any_all(self, q_lo, q_hi, kv_lo, kv_hi, q_offset, xp):
    (a1, f1), (a2, f2) = (m._any_all(q_lo, q_hi, kv_lo, kv_hi, q_offset, xp) for m in self._parts())
    return a1 & a2, f1 & f2


# ---------------------------------------------------------------------------------------
# Masks holding arrays (pytrees whose leaves are the arrays; block maps via jax.numpy).
# ---------------------------------------------------------------------------------------


def _take_batch(x, b):
  """Row ``b`` of ``x`` ([B, ...]), or x with its batch axis kept when b is None."""
  if b is None:
    return x
  return jax.lax.dynamic_index_in_dim(x, b, axis=0, keepdims=False)


def _take_rows(x, b, idx):
  """``x[b, idx]`` (idx clipped into the last axis of ``x [B, L]``) as one gather, or
  ``x[:, idx]`` when b is None. Under a vmap over b this gathers only the indexed entries
  (taking row b first would copy a whole row per example per tile)."""
  x = jnp.asarray(x)
  idx = jnp.clip(idx, 0, x.shape[-1] - 1)
  return x[:, idx] if b is None else x[b, idx]


def _lead(x, b):
  """Adds broadcast axes so a per-example scalar/row lines up with [B, tq, tk]."""
  return x if b is not None else x[:, None, None]


@jax.tree_util.register_pytree_node_class
class PrefixLMMask(Mask):
  """Bidirectional inside a prefix of length P, causal after it: visible iff j < P or j <= p.

  ``prefix_len`` is an int (static) or an int array ``[B]`` (per example, may be traced).
  """

  def __init__(self, prefix_len):
    if isinstance(prefix_len, (int, np.integer)) and not isinstance(prefix_len, bool):
      _check_int("PrefixLMMask prefix_len", prefix_len, minimum=0)
    else:
      shape = jnp.shape(prefix_len)
      dtype = getattr(prefix_len, "dtype", None)
      if len(shape) != 1 or dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(
          "PrefixLMMask prefix_len must be an int or an int array of shape [B]; "
          f"got {type(prefix_len).__name__} shape={shape} dtype={dtype}"
        )
    self.prefix_len = prefix_len

  @property
  def batched(self):
    return not isinstance(self.prefix_len, (int, np.integer))

  def _batch_size(self):
    return jnp.shape(self.prefix_len)[0]

  def check_shapes(self, batch, q_len, kv_len):
    if self.batched and self._batch_size() != batch:
      raise ValueError(
        f"PrefixLMMask prefix_len has shape {jnp.shape(self.prefix_len)}; needs [B] with B={batch}"
      )

  def _prefix(self, b):
    return _lead(_take_batch(self.prefix_len, b), b) if self.batched else self.prefix_len

  def _visible(self, q_idx, kv_idx, q_offset, b):
    return (kv_idx < self._prefix(b)) | (kv_idx <= q_idx + q_offset)

  def _any_all(self, q_lo, q_hi, kv_lo, kv_hi, q_offset, xp):
    p = self._prefix(None) if xp is jnp else self.prefix_len
    any_ = (kv_lo < p) | (kv_lo <= q_hi + q_offset)
    all_ = (kv_hi < p) | (kv_hi <= q_lo + q_offset)
    return any_, all_

  def tree_flatten(self):
    if self.batched:
      return (self.prefix_len,), True
    return (), self.prefix_len

  @classmethod
  def tree_unflatten(cls, aux, children):
    obj = object.__new__(cls)
    obj.prefix_len = children[0] if aux is True else aux
    return obj

  def __hash__(self):  # static form is cacheable; the batched form hashes by identity
    return hash(("PrefixLMMask", self.prefix_len)) if not self.batched else id(self)

  def __eq__(self, other):
    if not isinstance(other, PrefixLMMask) or self.batched or other.batched:
      return self is other
    return self.prefix_len == other.prefix_len

  def __repr__(self):
    return f"PrefixLMMask(prefix_len={self.prefix_len!r})"


def _int_array(name: str, x, rank: int, what: str):
  dtype = getattr(x, "dtype", None)
  if dtype is None or jnp.ndim(x) != rank or not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(
      f"{name} must be an int array of shape {what}; got "
      f"{type(x).__name__} shape={jnp.shape(x)} dtype={dtype}"
    )


@jax.tree_util.register_pytree_node_class
class SegmentMask(Mask):
  """Packed sequences: visible iff the query and key carry the same segment id.

  ``q_segment_ids [B, T]``, ``kv_segment_ids [B, S]``. Tokens whose id equals
  ``padding_id`` (default 0, the packing convention of grain) see nothing and are seen by
  nothing, so padding rows return zeros; ``padding_id=None`` treats every id as a document.
  Combine with ``CausalMask()`` for causal packing.
  """

  batched = True

  def __init__(self, q_segment_ids, kv_segment_ids=None, *, padding_id: int | None = 0):
    if kv_segment_ids is None:
      kv_segment_ids = q_segment_ids
    _int_array("q_segment_ids", q_segment_ids, 2, "[B, T]")
    _int_array("kv_segment_ids", kv_segment_ids, 2, "[B, S]")
    if jnp.shape(q_segment_ids)[0] != jnp.shape(kv_segment_ids)[0]:
      raise ValueError(
        f"q_segment_ids {jnp.shape(q_segment_ids)} and kv_segment_ids "
        f"{jnp.shape(kv_segment_ids)} must have the same batch size"
      )
    _check_int("padding_id", padding_id, minimum=-(2**31), allow_none=True)
    self.q_segment_ids = q_segment_ids
    self.kv_segment_ids = kv_segment_ids
    self.padding_id = padding_id

  def _batch_size(self):
    return jnp.shape(self.q_segment_ids)[0]

  def check_shapes(self, batch, q_len, kv_len):
    want_q, want_kv = (batch, q_len), (batch, kv_len)
    if tuple(jnp.shape(self.q_segment_ids)) != want_q:
      raise ValueError(
        f"q_segment_ids has shape {jnp.shape(self.q_segment_ids)}; needs [B, T] = {want_q}"
      )
    if tuple(jnp.shape(self.kv_segment_ids)) != want_kv:
      raise ValueError(
        f"kv_segment_ids has shape {jnp.shape(self.kv_segment_ids)}; needs [B, S] = {want_kv}"
      )

  def _visible(self, q_idx, kv_idx, q_offset, b):
    qs = _take_rows(self.q_segment_ids, b, q_idx)
    ks = _take_rows(self.kv_segment_ids, b, kv_idx)
    ok = qs == ks  # [(B,) tq, tk]
    if self.padding_id is not None:
      ok &= qs != self.padding_id
    return ok

  def _any_all(self, q_lo, q_hi, kv_lo, kv_hi, q_offset, xp):
    # Classified from per-block id ranges: overlapping ranges may share an id (PARTIAL);
    # a single shared id across both blocks (and not padding) is FULL.
    q_min, q_max = _block_range(self.q_segment_ids, q_lo[:, 0], q_hi[:, 0])
    kv_min, kv_max = _block_range(self.kv_segment_ids, kv_lo[0], kv_hi[0])
    q_min, q_max = q_min[:, :, None], q_max[:, :, None]
    kv_min, kv_max = kv_min[:, None, :], kv_max[:, None, :]
    any_ = (q_min <= kv_max) & (kv_min <= q_max)
    all_ = (q_min == q_max) & (kv_min == kv_max) & (q_min == kv_min)
    if self.padding_id is not None:
      all_ &= q_min != self.padding_id
      only_pad = (q_min == q_max) & (q_min == self.padding_id)
      any_ &= ~only_pad & ~((kv_min == kv_max) & (kv_min == self.padding_id))
    return any_, all_

  def tree_flatten(self):
    return (self.q_segment_ids, self.kv_segment_ids), self.padding_id

  @classmethod
  def tree_unflatten(cls, aux, children):
    obj = object.__new__(cls)
    obj.q_segment_ids, obj.kv_segment_ids = children
    obj.padding_id = aux
    return obj

  def __repr__(self):
    return (
      f"SegmentMask(q_segment_ids{jnp.shape(self.q_segment_ids)}, "
      f"kv_segment_ids{jnp.shape(self.kv_segment_ids)}, padding_id={self.padding_id})"
    )


def _block_range(ids_BL, lo, hi):
  """Per-block min and max of ids ``[B, L]`` over the index ranges [lo, hi]."""
  num_blocks = lo.shape[0]
  length = ids_BL.shape[1]
  block = int(hi[0]) - int(lo[0]) + 1 if num_blocks > 1 else length
  block = max(block, 1)
  pad = num_blocks * block - length
  ids = jnp.asarray(ids_BL)
  padded = jnp.pad(ids, ((0, 0), (0, pad)), mode="edge")  # edge padding keeps min/max
  blocks = padded.reshape(ids.shape[0], num_blocks, block)
  return blocks.min(-1), blocks.max(-1)


@jax.tree_util.register_pytree_node_class
class BlockSparseMask(Mask):
  """Block-level sparsity from per-q-block lists of kv blocks.

  ``block_indices``: int ``[nQ, M]`` (shared by the batch) or ``[B, nQ, M]`` listing, for
  every q block of ``block_size = (block_q, block_kv)`` tokens, the kv blocks it may see;
  entries < 0 are padding. Indices may be traced (e.g. from a top-k selection).
  """

  def __init__(self, block_indices, block_size):
    if isinstance(block_size, (int, np.integer)):
      block_size = (block_size, block_size)
    if not (isinstance(block_size, tuple) and len(block_size) == 2):
      raise ValueError(
        f"BlockSparseMask block_size must be an int or a pair of ints; got {block_size!r}"
      )
    _check_int("BlockSparseMask block_size[0]", block_size[0], minimum=1)
    _check_int("BlockSparseMask block_size[1]", block_size[1], minimum=1)
    dtype = getattr(block_indices, "dtype", None)
    if (
      dtype is None
      or jnp.ndim(block_indices) not in (2, 3)
      or not jnp.issubdtype(dtype, jnp.integer)
    ):
      raise ValueError(
        "BlockSparseMask block_indices must be an int array of shape [nQ, M] or "
        f"[B, nQ, M]; got {type(block_indices).__name__} "
        f"shape={jnp.shape(block_indices)} dtype={dtype}"
      )
    self.block_indices = block_indices
    self.block_size = (int(block_size[0]), int(block_size[1]))

  @property
  def batched(self):
    return jnp.ndim(self.block_indices) == 3

  def _batch_size(self):
    return jnp.shape(self.block_indices)[0]

  def check_shapes(self, batch, q_len, kv_len):
    n_q = _num_blocks(q_len, self.block_size[0])
    shape = jnp.shape(self.block_indices)
    if shape[-2] != n_q or (self.batched and shape[0] != batch):
      want = f"[{batch}, {n_q}, M] or [{n_q}, M]"
      raise ValueError(
        f"BlockSparseMask block_indices has shape {shape}; needs {want} "
        f"(T={q_len} in q blocks of {self.block_size[0]})"
      )

  def within_tiles(self, block_q, block_kv, *, q_offset=None):
    # A tile inside one listed block is all-visible: nothing to evaluate there.
    bq, bk = self.block_size
    if bq % block_q == 0 and bk % block_kv == 0:
      return FullMask()
    return self

  def _grid(self, kv_len):
    """Bool [.., nQm, nKm] of listed blocks."""
    n_kv = _num_blocks(kv_len, self.block_size[1])
    idx = jnp.asarray(self.block_indices)
    hits = (idx[..., None] == jnp.arange(n_kv)) & (idx[..., None] >= 0)
    return hits.any(-2)

  def _visible(self, q_idx, kv_idx, q_offset, b):
    bq, bk = self.block_size
    idx = _take_batch(self.block_indices, b) if self.batched else jnp.asarray(self.block_indices)
    rows = jnp.take(idx, q_idx // bq, axis=-2, mode="clip")  # [(B,) tq, 1, M]
    kb = (kv_idx // bk)[..., None]  # [1, tk, 1]
    return ((rows == kb) & (rows >= 0)).any(-1)

  def _any_all(self, q_lo, q_hi, kv_lo, kv_hi, q_offset, xp):
    # Summed-area table over the block grid: count of listed mask blocks a tile covers.
    bq, bk = self.block_size
    grid = self._grid(int(kv_hi[0, -1]) + 1).astype(jnp.int32)
    sat = jnp.pad(grid.cumsum(-1).cumsum(-2), [(0, 0)] * (grid.ndim - 2) + [(1, 0), (1, 0)])
    r0, r1 = q_lo // bq, q_hi // bq + 1
    c0, c1 = kv_lo // bk, kv_hi // bk + 1

    def at(r, c):
      return sat[..., r, c] if grid.ndim == 2 else sat[:, r, c]

    count = at(r1, c1) - at(r0, c1) - at(r1, c0) + at(r0, c0)
    return count > 0, count == (r1 - r0) * (c1 - c0)

  def tree_flatten(self):
    return (self.block_indices,), self.block_size

  @classmethod
  def tree_unflatten(cls, aux, children):
    obj = object.__new__(cls)
    obj.block_indices, obj.block_size = children[0], aux
    return obj

  def __repr__(self):
    return f"BlockSparseMask(block_indices{jnp.shape(self.block_indices)}, {self.block_size})"


@jax.tree_util.register_pytree_node_class
class ChunkSelectionMask(Mask):
  """Per-query selection of key chunks: query t sees key s when ``selected[b, t, s // chunk]``.

  ``selected``: bool ``[B, T, nC]`` with nC = ceil(S / chunk) (may be traced, e.g. from a
  per-query top-k over chunk scores). A (q block, kv block) tile is non-empty when any of
  its queries selected a chunk the kv block overlaps, so tiles are skipped only where the
  queries of a tile agree on what to leave out. Combine with ``CausalMask()`` for causality.
  """

  batched = True

  def __init__(self, selected, chunk: int):
    _check_int("ChunkSelectionMask chunk", chunk, minimum=1)
    dtype = getattr(selected, "dtype", None)
    if dtype is None or jnp.ndim(selected) != 3 or dtype != jnp.bool_:
      raise ValueError(
        "ChunkSelectionMask selected must be a bool array of shape [B, T, nC]; got "
        f"{type(selected).__name__} shape={jnp.shape(selected)} dtype={dtype}"
      )
    self.selected, self.chunk = selected, int(chunk)

  def _batch_size(self):
    return jnp.shape(self.selected)[0]

  def check_shapes(self, batch, q_len, kv_len):
    want = (batch, q_len, _num_blocks(kv_len, self.chunk))
    if tuple(jnp.shape(self.selected)) != want:
      raise ValueError(
        f"ChunkSelectionMask selected has shape {tuple(jnp.shape(self.selected))}; needs "
        f"{list(want)} (T={q_len}, S={kv_len} in chunks of {self.chunk})"
      )

  def _visible(self, q_idx, kv_idx, q_offset, b):
    sel = jnp.asarray(self.selected)  # [B, T, nC]
    q = jnp.broadcast_to(q_idx, jnp.broadcast_shapes(jnp.shape(q_idx), jnp.shape(kv_idx)))
    q = jnp.clip(q, 0, sel.shape[1] - 1)
    c = jnp.clip(jnp.broadcast_to(kv_idx // self.chunk, q.shape), 0, sel.shape[2] - 1)
    if b is not None:  # one gather of the tile's entries (not row b, then the tile)
      return sel[b, q, c]
    return sel[:, q, c]

  def within_tiles(self, block_q, block_kv, *, q_offset=None):
    # A kv tile aligned to the chunks reads one selection entry per (query, chunk of the
    # tile) rather than one per (query, key) pair: a per-pair gather cost ~70 µs per
    # 128² tile on this CPU, about a quarter of the tile's matmuls and exponentials.
    if self.chunk % block_kv == 0:
      return _ChunkSelectionInTile(self.selected, self.chunk, 1)
    if block_kv % self.chunk == 0 and block_kv // self.chunk <= _MAX_CHUNKS_PER_TILE:
      return _ChunkSelectionInTile(self.selected, self.chunk, block_kv // self.chunk)
    return self

  def _any_all(self, q_lo, q_hi, kv_lo, kv_hi, q_offset, xp):
    sel = jnp.asarray(self.selected)
    B, T, nC = sel.shape
    n_q = q_lo.shape[0]
    bq = int(q_hi[0, 0]) - int(q_lo[0, 0]) + 1 if n_q > 1 else T
    pad = ((0, 0), (0, n_q * bq - T), (0, 0))  # padded queries do not exist: neutral rows
    any_qc = jnp.pad(sel, pad, constant_values=False).reshape(B, n_q, bq, nC).any(2)
    all_qc = jnp.pad(sel, pad, constant_values=True).reshape(B, n_q, bq, nC).all(2)
    # Chunks each kv block overlaps (static): [nC, nK].
    lo, hi = np.asarray(kv_lo)[0], np.asarray(kv_hi)[0]
    c = np.arange(nC)[:, None]
    overlap = (c * self.chunk <= hi[None, :]) & ((c + 1) * self.chunk - 1 >= lo[None, :])
    overlap = jnp.asarray(overlap, jnp.int32)
    any_ = jnp.einsum("bqc,ck->bqk", any_qc.astype(jnp.int32), overlap) > 0
    missing = jnp.einsum("bqc,ck->bqk", (~all_qc).astype(jnp.int32), overlap) > 0
    return any_, ~missing

  def tree_flatten(self):
    return (self.selected,), self.chunk

  @classmethod
  def tree_unflatten(cls, aux, children):
    obj = object.__new__(cls)
    obj.selected, obj.chunk = children[0], aux
    return obj

  def __repr__(self):
    return f"ChunkSelectionMask(selected{jnp.shape(self.selected)}, chunk={self.chunk})"


# Above this many chunks per kv tile a per-pair gather is cheaper than per-chunk selects.
_MAX_CHUNKS_PER_TILE = 8


@jax.tree_util.register_pytree_node_class
class _ChunkSelectionInTile(ChunkSelectionMask):
  """A ChunkSelectionMask inside kv tiles that start on a chunk boundary and span
  ``per_tile`` whole chunks (or lie inside one: ``per_tile`` = 1), from ``within_tiles``.
  The tile's first chunk is read off its smallest key index, so visibility is ``per_tile``
  selection entries per query broadcast over their chunk's keys. Valid only on such tiles."""

  def __init__(self, selected, chunk: int, per_tile: int):
    super().__init__(selected, chunk)
    self.per_tile = int(per_tile)

  def _visible(self, q_idx, kv_idx, q_offset, b):
    sel = jnp.asarray(self.selected)  # [B, T, nC]
    q = jnp.clip(q_idx, 0, sel.shape[1] - 1)
    first = jnp.min(kv_idx) // self.chunk

    def entry(c):  # selection of chunk c by each query: shape of q (plus [B] without b)
      c = jnp.clip(c, 0, sel.shape[2] - 1)
      return sel[b, q, c] if b is not None else sel[:, q, c]

    if self.per_tile == 1:
      return entry(first)
    chunk_of_key = kv_idx // self.chunk
    visible = None
    for t in range(self.per_tile):
      part = entry(first + t) & (chunk_of_key == first + t)
      visible = part if visible is None else visible | part
    return visible

  def within_tiles(self, block_q, block_kv, *, q_offset=None):
    return self

  def tree_flatten(self):
    return (self.selected,), (self.chunk, self.per_tile)

  @classmethod
  def tree_unflatten(cls, aux, children):
    obj = object.__new__(cls)
    obj.selected, (obj.chunk, obj.per_tile) = children[0], aux
    return obj


@jax.tree_util.register_pytree_node_class
class GroupMask(Mask):
  """Token groups with a group-to-group visibility table: visible iff
  ``table[q_groups[b, i], kv_groups[b, j]]``.

  ``q_groups [B, T]``, ``kv_groups [B, S]`` (default: q_groups) are int ids in [0, G) and
  ``table`` a bool ``[G, G]`` (row: the query's group). Combine with the other masks:
  ``CausalMask() & GroupMask(...)`` isolates groups causally (condition branches, subjects,
  response candidates); ``CausalMask() | GroupMask(...)`` grants extra visibility, e.g. image
  tokens seeing the later text prompt (modality-mutual attention). Tile kinds are exact:
  a tile is non-empty when some group present in its rows may see some group present in its
  columns, full when every such pair may.
  """

  batched = True

  def __init__(self, q_groups, kv_groups=None, *, table):
    if kv_groups is None:
      kv_groups = q_groups
    _int_array("q_groups", q_groups, 2, "[B, T]")
    _int_array("kv_groups", kv_groups, 2, "[B, S]")
    if jnp.shape(q_groups)[0] != jnp.shape(kv_groups)[0]:
      raise ValueError(
        f"q_groups {jnp.shape(q_groups)} and kv_groups {jnp.shape(kv_groups)} must have the "
        "same batch size"
      )
    shape = jnp.shape(table)
    if len(shape) != 2 or shape[0] != shape[1] or getattr(table, "dtype", None) != jnp.bool_:
      raise ValueError(
        f"GroupMask table must be a bool array of shape [G, G]; got shape {shape}, dtype "
        f"{getattr(table, 'dtype', type(table).__name__)}"
      )
    for name, ids in (("q_groups", q_groups), ("kv_groups", kv_groups)):
      if not isinstance(ids, jax.core.Tracer):
        ids_np = np.asarray(ids)
        if ids_np.size and (ids_np.min() < 0 or ids_np.max() >= shape[0]):
          raise ValueError(
            f"GroupMask {name} must lie in [0, {shape[0]}) (the table's groups); got ids in "
            f"[{ids_np.min()}, {ids_np.max()}]"
          )
    self.q_groups, self.kv_groups, self.table = q_groups, kv_groups, table

  def _batch_size(self):
    return jnp.shape(self.q_groups)[0]

  def check_shapes(self, batch, q_len, kv_len):
    want_q, want_k = (batch, q_len), (batch, kv_len)
    got_q, got_k = tuple(jnp.shape(self.q_groups)), tuple(jnp.shape(self.kv_groups))
    if got_q != want_q or got_k != want_k:
      raise ValueError(
        f"GroupMask groups have shapes q {got_q}, kv {got_k}; need {list(want_q)} and "
        f"{list(want_k)}"
      )

  def _visible(self, q_idx, kv_idx, q_offset, b):
    qg = _take_rows(self.q_groups, b, q_idx)
    kg = _take_rows(self.kv_groups, b, kv_idx)
    return jnp.asarray(self.table)[qg, kg]  # [(B,) tq, tk]

  def _presence(self, ids, lo, hi):
    """Bool [B, nBlocks, G]: the groups present in each block of ``ids [B, L]``."""
    B, L = jnp.shape(ids)
    G = jnp.shape(self.table)[0]
    n = lo.shape[0]
    block = int(hi[0]) - int(lo[0]) + 1 if n > 1 else L
    onehot = jax.nn.one_hot(jnp.asarray(ids), G, dtype=jnp.int32)
    onehot = jnp.pad(onehot, ((0, 0), (0, n * block - L), (0, 0)))
    return onehot.reshape(B, n, block, G).max(2) > 0

  def _any_all(self, q_lo, q_hi, kv_lo, kv_hi, q_offset, xp):
    pres_q = self._presence(self.q_groups, np.asarray(q_lo)[:, 0], np.asarray(q_hi)[:, 0])
    pres_k = self._presence(self.kv_groups, np.asarray(kv_lo)[0], np.asarray(kv_hi)[0])
    table = jnp.asarray(self.table).astype(jnp.int32)
    pq, pk = pres_q.astype(jnp.int32), pres_k.astype(jnp.int32)
    any_ = jnp.einsum("bqg,gh,bkh->bqk", pq, table, pk) > 0
    missing = jnp.einsum("bqg,gh,bkh->bqk", pq, 1 - table, pk) > 0
    return any_, ~missing

  def tree_flatten(self):
    return (self.q_groups, self.kv_groups, self.table), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    obj = object.__new__(cls)
    obj.q_groups, obj.kv_groups, obj.table = children
    return obj

  def __repr__(self):
    return (
      f"GroupMask(q_groups{jnp.shape(self.q_groups)}, kv_groups{jnp.shape(self.kv_groups)}, "
      f"table{jnp.shape(self.table)})"
    )


# ---------------------------------------------------------------------------------------
# Combinations.
# ---------------------------------------------------------------------------------------


class _Combined(Mask):
  def __init__(self, left: Mask, right: Mask):
    self.left, self.right = left, right

  @property
  def batched(self):
    return self.left.batched or self.right.batched

  def _batch_size(self):
    return (self.left if self.left.batched else self.right)._batch_size()

  def check_shapes(self, batch, q_len, kv_len):
    self.left.check_shapes(batch, q_len, kv_len)
    self.right.check_shapes(batch, q_len, kv_len)

  def _parts_any_all(self, q_lo, q_hi, kv_lo, kv_hi, q_offset, xp):
    parts = []
    for m in (self.left, self.right):
      any_, all_ = m._any_all(q_lo, q_hi, kv_lo, kv_hi, q_offset, xp)
      if xp is jnp:
        any_, all_ = jnp.asarray(any_), jnp.asarray(all_)
      parts.append((any_, all_))
    return parts

  def tree_flatten(self):
    return (self.left, self.right), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children)

  def __eq__(self, other):
    return type(self) is type(other) and self.left == other.left and self.right == other.right

  def __hash__(self):
    return hash((type(self).__name__, self.left, self.right))


@jax.tree_util.register_pytree_node_class
class AndMask(_Combined):
  """Visible where both masks are visible."""

  def _visible(self, q_idx, kv_idx, q_offset, b):
    return self.left._visible(q_idx, kv_idx, q_offset, b) & self.right._visible(
      q_idx, kv_idx, q_offset, b
    )

  def _any_all(self, q_lo, q_hi, kv_lo, kv_hi, q_offset, xp):
    (a1, f1), (a2, f2) = self._parts_any_all(q_lo, q_hi, kv_lo, kv_hi, q_offset, xp)
    return a1 & a2, f1 & f2

  def within_tiles(self, block_q, block_kv, *, q_offset=None):
    # A non-empty tile of a & b is non-empty for both: each part reduces on its own.
    left = self.left.within_tiles(block_q, block_kv, q_offset=q_offset)
    right = self.right.within_tiles(block_q, block_kv, q_offset=q_offset)
    if isinstance(left, FullMask):
      return right
    if isinstance(right, FullMask):
      return left
    if left is self.left and right is self.right:
      return self
    return AndMask(left, right)

  def __repr__(self):
    return f"({self.left!r} & {self.right!r})"


@jax.tree_util.register_pytree_node_class
class OrMask(_Combined):
  """Visible where either mask is visible."""

  def _visible(self, q_idx, kv_idx, q_offset, b):
    return self.left._visible(q_idx, kv_idx, q_offset, b) | self.right._visible(
      q_idx, kv_idx, q_offset, b
    )

  def _any_all(self, q_lo, q_hi, kv_lo, kv_hi, q_offset, xp):
    (a1, f1), (a2, f2) = self._parts_any_all(q_lo, q_hi, kv_lo, kv_hi, q_offset, xp)
    return a1 | a2, f1 | f2

  def __repr__(self):
    return f"({self.left!r} | {self.right!r})"
