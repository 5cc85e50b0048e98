"""Generalized neighborhood attention (catalog family (f), ``gna``) as a static block-sparse
mask.

"Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed of
Light".

Dimension key: B batch, T = S = ∏ extents tokens on a 1-D or 2-D grid (row-major), N heads,
H head dim.

Per grid dimension (extent L) four settings:

* window w: every non-causal query sees exactly w keys along the dimension; near a border
  the window shifts inward instead of shrinking;
* dilation d (d·w <= L): neighbours are d apart. Position x belongs to the sub-grid
  x mod d; along it (index x // d, sub-grid length L_r) the window is w consecutive entries,
  so dilation d is neighbourhood attention on d interleaved sub-grids;
* stride s <= w: the queries of a sub-grid are grouped in tiles of s consecutive entries that
  share one neighbourhood, the one of the tile's centre entry (clamped to the sub-grid):
  s = 1 is a sliding window, s = w non-overlapping window attention;
* causal: the window ends at the tile's last entry, [c − w + 1, c], cut at 0 (it cannot shift
  into the future) and to keys <= the query itself.

A query sees the product of its per-dimension windows. ``NeighborhoodMask`` evaluates that
rule per (query, key) in-tile from O(L) per-dimension tables, and classifies every (q block,
kv block) tile exactly (empty / partial / full) on the host by enumerating each query's
keys; the blocked ``xla`` path then skips every empty tile, so the work is proportional to
the neighbourhood size. The (q block -> kv block) lists are built at trace time. The Pallas
kernels do not take this mask (its in-tile rule reads host tables): "reference" and "xla".
"""

import dataclasses
import functools
import typing

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from attn_jax.attention import _checks, registry
from attn_jax.attention import api as api_lib
from attn_jax.attention import masks as masks_lib

PAPER = (
  "Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed of Light"
)
IMPLEMENTATIONS = ("reference", "xla")


def _tuple(name, value, ndim, minimum=1):
  vals = (value,) * ndim if isinstance(value, (int, np.integer, bool)) else tuple(value)
  if len(vals) != ndim:
    raise ValueError(f"{name} needs one value per grid dimension ({ndim}); got {value!r}")
  for v in vals:
    if isinstance(v, (bool, np.bool_)) and name != "causal":
      raise ValueError(f"{name} values must be ints; got {value!r}")
    if name != "causal" and (not isinstance(v, (int, np.integer)) or v < minimum):
      raise ValueError(f"{name} values must be ints >= {minimum}; got {value!r}")
  return tuple(bool(v) if name == "causal" else int(v) for v in vals)


def window_ranges(extent: int, window: int, stride: int, dilation: int, causal: bool):
  """Per position x of one dimension: ``(lo, hi)`` int arrays ``[L]``, the inclusive range
  of sub-grid indices (along x's sub-grid x mod d) that x sees."""
  x = np.arange(extent)
  r, i = x % dilation, x // dilation
  sub_len = (extent - r + dilation - 1) // dilation  # length of x's sub-grid
  tile = i // stride
  if causal:
    centre = np.minimum(tile * stride + stride - 1, sub_len - 1)  # the tile's last entry
    lo = np.maximum(centre - window + 1, 0)
    hi = i  # never a key after the query
  else:
    centre = np.minimum(tile * stride + stride // 2, sub_len - 1)
    lo = np.clip(centre - window // 2, 0, np.maximum(sub_len - window, 0))
    hi = np.minimum(lo + window - 1, sub_len - 1)
  return lo.astype(np.int64), hi.astype(np.int64)


@dataclasses.dataclass(frozen=True)
class NeighborhoodMask(masks_lib._StaticMask):
  """Generalized neighbourhood visibility on a row-major 1-D or 2-D grid (see the module
  docstring). Self-attention only: T = S = ∏ ``shape``."""

  KERNEL_REFUSAL: typing.ClassVar[str] = "the NeighborhoodMask's in-tile rule reads host tables"

  shape: tuple
  window: tuple
  stride: tuple = None
  dilation: tuple = None
  causal: tuple = None

  def __post_init__(self):
    shape = _tuple("shape", self.shape, len(self.shape) if isinstance(self.shape, tuple) else 1)
    nd = len(shape)
    if nd not in (1, 2):
      raise ValueError(f"NeighborhoodMask takes a 1-D or 2-D grid; got shape {shape}")
    window = _tuple("window", self.window, nd)
    stride = _tuple("stride", 1 if self.stride is None else self.stride, nd)
    dilation = _tuple("dilation", 1 if self.dilation is None else self.dilation, nd)
    causal = _tuple("causal", False if self.causal is None else self.causal, nd)
    for L, w, s, d in zip(shape, window, stride, dilation, strict=True):
      if d * w > L:
        raise ValueError(f"dilation·window must be <= the extent; got {d}·{w} > {L}")
      if s > w:
        raise ValueError(f"stride must be <= window; got stride {s} > window {w}")
    for name, value in (
      ("shape", shape),
      ("window", window),
      ("stride", stride),
      ("dilation", dilation),
      ("causal", causal),
    ):
      object.__setattr__(self, name, value)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))

  def check_shapes(self, batch, q_len, kv_len):
    if q_len != self.size or kv_len != self.size:
      raise ValueError(
        f"NeighborhoodMask over grid {self.shape} needs T = S = {self.size}; got T={q_len}, "
        f"S={kv_len}"
      )

  @functools.cached_property
  def _tables(self):
    return [
      window_ranges(L, w, s, d, c)
      for L, w, s, d, c in zip(
        self.shape, self.window, self.stride, self.dilation, self.causal, strict=True
      )
    ]

  def _coords(self, idx):
    if len(self.shape) == 1:
      return (idx,)
    return (idx // self.shape[1], idx % self.shape[1])

  def _visible(self, q_idx, kv_idx, q_offset, b):
    q_idx, kv_idx = jnp.asarray(q_idx), jnp.asarray(kv_idx)
    ok = jnp.ones(jnp.broadcast_shapes(q_idx.shape, kv_idx.shape), bool)
    for xq, xk, d, (lo, hi) in zip(
      self._coords(q_idx), self._coords(kv_idx), self.dilation, self._tables, strict=True
    ):
      xq_c = jnp.clip(xq, 0, len(lo) - 1)
      ik = xk // d
      ok &= (xk % d == xq_c % d) & (ik >= jnp.asarray(lo)[xq_c]) & (ik <= jnp.asarray(hi)[xq_c])
    return ok

  def keys_of(self, t: int) -> np.ndarray:
    """The sorted key indices query ``t`` sees (host numpy)."""
    per_dim = []
    for x, d, (lo, hi) in zip(self._coords(t), self.dilation, self._tables, strict=True):
      per_dim.append(np.arange(lo[x], hi[x] + 1) * d + x % d)
    if len(per_dim) == 1:
      return per_dim[0]
    return (per_dim[0][:, None] * self.shape[1] + per_dim[1][None, :]).ravel()

  def _any_all(self, q_lo, q_hi, kv_lo, kv_hi, q_offset, xp):
    counts = _pair_counts(self, tuple(np.ravel(q_lo)), tuple(np.ravel(kv_lo)))
    q_size = (np.asarray(q_hi) - np.asarray(q_lo) + 1).reshape(-1, 1)
    kv_size = (np.asarray(kv_hi) - np.asarray(kv_lo) + 1).reshape(1, -1)
    return counts > 0, counts == q_size * kv_size


@functools.lru_cache(maxsize=64)
def _pair_counts(mask: NeighborhoodMask, q_starts: tuple, kv_starts: tuple) -> np.ndarray:
  """Visible (query, key) pairs per (q block, kv block), by enumerating every query's keys."""
  q_starts, kv_starts = np.asarray(q_starts), np.asarray(kv_starts)
  counts = np.zeros((len(q_starts), len(kv_starts)), np.int64)
  T = mask.size
  q_block = np.searchsorted(q_starts, np.arange(T), side="right") - 1
  for t in range(T):
    keys = mask.keys_of(t)
    kv_block = np.searchsorted(kv_starts, keys, side="right") - 1
    np.add.at(counts[q_block[t]], kv_block, 1)
  return counts


@typing.no_type_check
def gna(
  q_BTNH: Float[Array, "B T N H"],
  k_BSKH: Float[Array, "B S K H"],
  v_BSKV: Float[Array, "B S K Hv"],
  *,
  grid: tuple,
  window,
  stride=1,
  dilation=1,
  causal=False,
  implementation: str | None = None,
):
  """Generalized neighbourhood attention (Generalized Neighborhood Attention:
  Multi-dimensional Sparse Attention at the Speed of Light) over a row-major grid ``grid``
  (T = ∏ grid); ``window``, ``stride``, ``dilation``, ``causal``: one value or one per
  dimension (see the module docstring). Implementations "reference" and "xla" (default)."""
  _checks.check_qkv(q_BTNH, k_BSKH, v_BSKV)
  impl = implementation or "xla"
  if impl not in IMPLEMENTATIONS:
    if impl in api_lib.IMPLEMENTATIONS:
      raise NotImplementedError(
        f"gna implementation {impl!r} is not built: the flash kernels do not take the "
        "neighbourhood mask's host tables; use 'xla' or 'reference'"
      )
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; got {impl!r}")
  grid = tuple(grid) if not isinstance(grid, int) else (grid,)
  mask = NeighborhoodMask(grid, window, stride, dilation, causal)
  return api_lib.dot_product_attention(q_BTNH, k_BSKH, v_BSKV, mask=mask, implementation=impl)


def _build(key, dims, causal):
  del key
  return {"grid": (dims.T,), "window": min(5, dims.T), "stride": 1, "causal": causal}


registry.register(
  registry.Mechanism(
    id="gna",
    family="f",
    paper=PAPER,
    entry_point="attn_jax.attention.neighborhood:gna",
    implementations=IMPLEMENTATIONS,
    patterns=frozenset((registry.SELF, registry.SELF_CAUSAL)),
    decode=False,
    tier=1,
    check="w = extent equals full attention, and s = w equals non-overlapping window "
    "attention. Every non-causal query sees exactly the product of the per-dimension windows. "
    "Dilation d equals neighbourhood attention on d interleaved sub-grids.",
    build=_build,
    module=registry.NN_ATTENTION,
  )
)
