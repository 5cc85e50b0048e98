"""Wrapper-side helpers shared by the flash kernels: block maps, compacted lists, padding.

Kernels depend only on jax. A caller describes the mask to a kernel with three things:

  * ``block_kinds(block_q, block_kv)``: a callable returning int8 ``[nQ, nK]`` (shared by the
    batch) or ``[B, nQ, nK]`` with EMPTY=0 / PARTIAL=1 / FULL=2 per (q block, kv block), for
    the tile sizes the kernel chose, or ``[B, Hs, nQ, nK]`` with a list per head (Hs = K kv
    heads or N query heads; block-sparse attention). numpy (static) or jax (possibly traced)
    arrays. It may over-approximate (call a block PARTIAL that is EMPTY or FULL) but never
    under-approximate.
  * ``mask_fn(q_idx, kv_idx, q_vals, kv_vals)``: a static predicate evaluated inside the
    kernel on PARTIAL tiles. ``q_idx`` int32 ``[bq, 1]`` and ``kv_idx`` int32 ``[1, bk]`` are
    absolute token indices (query i, key j; no offset applied), ``q_vals`` a tuple of int32
    ``[bq, 1]`` columns of ``q_operands`` and ``kv_vals`` a tuple of int32 ``[1, bk]`` rows
    of ``kv_operands``. Returns bool ``[bq, bk]`` (True = visible). None = every key visible.
  * ``q_operands`` int32 ``[B, T, Cq]`` and ``kv_operands`` int32 ``[B, Ck, S]``: per-token
    data the predicate reads (segment ids, ...), or None. ``q_operands`` may also be per head,
    ``[B, Hq, T, Cq]`` with Hq = K (per kv head) or N (per query head): each query head's
    predicate reads its own row (per-token, per-head block selections such as MoBA's).

Dimension key: B batch, Hs list heads, nQ / nK q / kv block counts, M longest list.
"""

import jax.numpy as jnp
import numpy as np

EMPTY, PARTIAL, FULL = 0, 1, 2


def num_blocks(length: int, block: int) -> int:
  return -(-length // block)


def round_up(length: int, multiple: int) -> int:
  return num_blocks(length, multiple) * multiple


def pad_axis(x, axis: int, length: int, value=0):
  """Pads ``x`` along ``axis`` at the end to ``length`` (no copy when already there)."""
  if x.shape[axis] == length:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def finalize_kinds(kinds, batch: int, kv_len: int, block_kv: int, heads=None):
  """Kinds as ``[Bl, Hl, nQ, nK]``, the ragged last kv block demoted to PARTIAL.

  Accepts ``[nQ, nK]``, ``[B, nQ, nK]`` (shared by the heads) and ``[B, Hs, nQ, nK]`` (per
  head: ``heads = (N, K)`` and Hs one of 1, K (kv heads) or N (query heads)). Bl is 1 (shared
  by the batch) or B. A kv tail padded up to a whole block must be masked, so a FULL last
  block becomes PARTIAL.
  """
  if kinds is None:
    raise ValueError("block_kinds returned None; it must return an int8 [nQ, nK] array")
  xp = np if isinstance(kinds, np.ndarray) else jnp
  if kinds.ndim == 2:
    kinds = kinds[None]
  if kinds.ndim == 3:
    kinds = kinds[:, None]
  if kinds.ndim != 4:
    raise ValueError(
      f"block kinds must be [nQ, nK], [B, nQ, nK] or [B, Hs, nQ, nK]; got {kinds.shape}"
    )
  if kinds.shape[0] not in (1, batch):
    raise ValueError(f"block kinds must have a batch dim of 1 or B={batch}; got {kinds.shape}")
  allowed = (1,) if heads is None else (1, *heads)
  if kinds.shape[1] not in allowed:
    raise ValueError(
      f"block kinds must have a head dim of 1, K or N {tuple(sorted(set(allowed)))}; got "
      f"{kinds.shape}"
    )
  if kv_len % block_kv:
    if xp is np:
      kinds = kinds.copy()
      kinds[..., -1] = np.minimum(kinds[..., -1], PARTIAL)
    else:
      kinds = kinds.at[..., -1].min(PARTIAL)
  return kinds.astype(xp.int8)


def list_head(n, list_heads: int, num_heads: int, num_kv_heads: int):
  """The list row of query head ``n`` when the lists have ``list_heads`` heads (1, K or N)."""
  if list_heads == num_heads:
    return n
  if list_heads == 1:
    return 0 * n
  return n // (num_heads // num_kv_heads)


def compact(kinds):
  """Per row (last axis) the non-empty blocks: ``(count [..], index [.., M], full [.., M])``.

  Indices are increasing; padding repeats the last listed index (or 0 for an empty row), so
  a TPU pipeline fed by these indices issues no DMA for padded steps. numpy kinds give numpy
  lists with M = the longest row; jax kinds give jax lists with M = the row length.
  """
  if isinstance(kinds, np.ndarray):
    nonempty = kinds != EMPTY
    count = nonempty.sum(-1).astype(np.int32)
    width = max(int(count.max(initial=0)), 1)
    order = np.argsort(~nonempty, axis=-1, kind="stable")[..., :width].astype(np.int32)
    pos = np.minimum(np.arange(width), np.maximum(count[..., None] - 1, 0))
    index = np.take_along_axis(order, pos, axis=-1)
    full = (np.take_along_axis(kinds, index, axis=-1) == FULL).astype(np.int32)
    return count, index, full
  nonempty = kinds != EMPTY
  count = nonempty.sum(-1).astype(jnp.int32)
  order = jnp.argsort(~nonempty, axis=-1, stable=True).astype(jnp.int32)
  pos = jnp.minimum(jnp.arange(kinds.shape[-1]), jnp.maximum(count[..., None] - 1, 0))
  index = jnp.take_along_axis(order, pos, axis=-1)
  full = (jnp.take_along_axis(kinds, index, axis=-1) == FULL).astype(jnp.int32)
  return count, index, full


def forward_lists(kinds):
  """Per q block, its non-empty kv blocks (forward and dq): lists over ``kinds[..., q, :]``."""
  return compact(kinds)


def transposed_lists(kinds):
  """Per kv block, the q blocks that see it (dk/dv): lists over ``kinds[..., :, kv]``."""
  xp = np if isinstance(kinds, np.ndarray) else jnp
  return compact(xp.swapaxes(kinds, -1, -2))
