"""Masks lowered for the Pallas kernels: a block map, an in-tile predicate, per-token operands.

The kernels in ``pallas_kernels/`` know nothing about ``masks.Mask`` objects. They take
(see ``pallas_kernels/_blocks.py``): ``block_kinds(block_q, block_kv)`` giving EMPTY /
PARTIAL / FULL per tile, a static predicate ``mask_fn(q_idx, kv_idx, q_vals, kv_vals)``
evaluated on PARTIAL tiles only, and int32 per-token operands the predicate reads:
``q_operands [B, T, Cq]`` and ``kv_operands [B, Ck, S]``.

Lowering, leaf by leaf (combinations with ``&`` / ``|`` combine the predicates):
  * static masks (full, causal, local, static prefix-LM): the predicate is the mask's own
    position arithmetic, with the bottom-right query offset baked in; chunked-causal uses
    truncating division on non-negative positions (floor division of signed ints lowers
    through ``sign``, which Mosaic resolves only on a TPU host);
  * ``SegmentMask``: one q operand (query segment ids) and one kv operand (key ids);
  * ``PrefixLMMask`` with per-example lengths: one kv operand, 1 where ``j < prefix[b]``;
  * ``BlockSparseMask`` (only under ``&``, with kernel tiles dividing its blocks, as
    ``pallas.pallas_attention`` arranges): its exact block map skips unlisted tiles and
    every tile the kernel visits lies inside a listed block, so its predicate is "visible".
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from attn_jax.attention import masks as masks_lib


class KernelMask(NamedTuple):
  block_kinds: Callable  # (block_q, block_kv) -> int8 [nQ, nK] or [B, nQ, nK]
  mask_fn: Callable | None  # (q_idx [bq,1], kv_idx [1,bk], q_vals, kv_vals) -> bool [bq, bk]
  q_operands: jnp.ndarray | None  # int32 [B, T, Cq]
  kv_operands: jnp.ndarray | None  # int32 [B, Ck, S]


class _Builder:
  """Collects per-token operands while building the predicate tree."""

  def __init__(self, batch: int, q_len: int, kv_len: int):
    self.B, self.T, self.S = batch, q_len, kv_len
    self.q_cols: list = []
    self.kv_rows: list = []

  def add_q(self, x_BT) -> int:
    self.q_cols.append(jnp.broadcast_to(jnp.asarray(x_BT, jnp.int32), (self.B, self.T)))
    return len(self.q_cols) - 1

  def add_kv(self, x_BS) -> int:
    self.kv_rows.append(jnp.broadcast_to(jnp.asarray(x_BS, jnp.int32), (self.B, self.S)))
    return len(self.kv_rows) - 1

  def build(self, mask, q_offset: int):
    """Returns a predicate ``fn(q_idx, kv_idx, q_vals, kv_vals)`` for ``mask``."""
    if hasattr(mask, "lower_for_kernel"):  # masks defined elsewhere lower themselves
      return mask.lower_for_kernel(self, q_offset)
    if isinstance(mask, masks_lib.FullMask):
      return lambda qi, ki, qv, kv: jnp.broadcast_to(
        jnp.ones_like(qi, bool), (qi.shape[0], ki.shape[1])
      )
    if isinstance(mask, masks_lib.AndMask | masks_lib.OrMask):
      left, right = self.build(mask.left, q_offset), self.build(mask.right, q_offset)
      if isinstance(mask, masks_lib.AndMask):
        return lambda qi, ki, qv, kv: left(qi, ki, qv, kv) & right(qi, ki, qv, kv)
      return lambda qi, ki, qv, kv: left(qi, ki, qv, kv) | right(qi, ki, qv, kv)
    if isinstance(mask, masks_lib.SegmentMask):
      iq = self.add_q(mask.q_segment_ids)
      ik = self.add_kv(mask.kv_segment_ids)
      pad = mask.padding_id

      def segment(qi, ki, qv, kv):
        ok = qv[iq] == kv[ik]
        if pad is not None:
          ok = ok & (qv[iq] != pad)
        return ok

      return segment
    if isinstance(mask, masks_lib.PrefixLMMask) and mask.batched:
      prefix_B = jnp.asarray(mask.prefix_len, jnp.int32)
      ik = self.add_kv(jnp.arange(self.S, dtype=jnp.int32)[None, :] < prefix_B[:, None])
      return lambda qi, ki, qv, kv: (kv[ik] != 0) | (ki <= qi + q_offset)
    if isinstance(mask, masks_lib.BlockSparseMask):
      return lambda qi, ki, qv, kv: jnp.broadcast_to(
        jnp.ones_like(qi, bool), (qi.shape[0], ki.shape[1])
      )
    if isinstance(mask, masks_lib.ChunkedCausalMask):
      chunk = mask.chunk

      def chunked(qi, ki, qv, kv):
        # Truncating division on non-negative operands (the causal term hides p < 0):
        # integer floor division lowers through `sign`, which Mosaic resolves per chip.
        pos = qi + q_offset
        c_q, c_k = jnp.asarray(chunk, pos.dtype), jnp.asarray(chunk, ki.dtype)
        same = jax.lax.div(jnp.maximum(pos, 0), c_q) == jax.lax.div(ki, c_k)
        return same & (ki <= pos)

      return chunked
    if mask.holds_arrays:
      raise NotImplementedError(
        f"mask {mask!r} holds arrays the Pallas flash kernels cannot read; use "
        "implementation='xla' or 'reference'"
      )
    # Static masks: the mask's own arithmetic on absolute indices with the offset baked in.
    return lambda qi, ki, qv, kv: mask.visible(qi, ki, q_offset=q_offset)


def lower(mask, batch: int, q_len: int, kv_len: int) -> KernelMask:
  """Lowers ``mask`` (or None) for a call with B = batch, T = q_len, S = kv_len."""
  q_offset = kv_len - q_len
  if mask is None or isinstance(mask, masks_lib.FullMask):
    full = masks_lib.FullMask()
    return KernelMask(lambda bq, bk: full.block_kinds(q_len, kv_len, bq, bk), None, None, None)
  builder = _Builder(batch, q_len, kv_len)
  predicate = builder.build(mask, q_offset)
  q_ops = jnp.stack(builder.q_cols, axis=-1) if builder.q_cols else None
  kv_ops = jnp.stack(builder.kv_rows, axis=1) if builder.kv_rows else None
  return KernelMask(
    lambda bq, bk: mask.block_kinds(q_len, kv_len, bq, bk), predicate, q_ops, kv_ops
  )
