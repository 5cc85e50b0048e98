"""Blocked, memory-efficient softmax attention in pure JAX (the default on CPU).

Dimension key: B batch, T query length, S key/value length, N query heads, K kv heads,
G = N // K query heads per kv head, H q/k head dim, Hv value head dim; Tp / Sp lengths
padded to whole blocks, nQ / nK block counts, M longest kv-block list; bq / bk tile sizes.

How it works:
  * Online softmax over kv blocks (running max ``m``, sum ``l`` and output accumulator),
    one query block at a time; memory is O(T·N·H), never O(T·S).
  * The mask's block map decides the work: each q block loops only over its compacted list
    of non-empty kv blocks (causal does about half the work, a window O(T·w)); empty
    blocks are neither loaded nor computed. FULL blocks are flagged but still evaluate the
    (fused, cheap) mask compare: branching around it with lax.cond measured slower on the
    XLA CPU backend, which copies the tile into the branch. T and S need not be multiples
    of the block sizes: the padded tail of the last kv block is masked, padded query rows
    are dropped. Inside a listed tile only the parts of the mask that vary within it are
    evaluated (``Mask.within_tiles``: a BlockSparseMask whose blocks the tiles divide is
    all-visible there, a ChunkedCausalMask whose chunks hold whole tiles only causal).
    Masks holding concrete arrays get their block map on the host.
  * Per-example lists (batched masks): each q block's kv loop runs the batch's longest
    list, masking the tiles past an example's own (a vmapped loop with per-example trip
    counts would select between old and new dk/dv, whole arrays, at every step).
  * Every head of a q block at once: a tile's logits are [K, G, bq, bk], kv head k
    serving its G query heads (GQA/MQA without repeating K/V).
  * Layout by the length of the tile lists (measured on one core, 4 heads, H = 64).
    The gradient path re-lays q / k / v / dout by heads once per call, so each kv tile of
    a head is contiguous, and keeps dk / dv head-major: each tile's products and updates
    touch contiguous rows per head. The forward without gradient does the same when its
    q blocks list more than ``NATURAL_LAYOUT_MEAN_TILES`` (4) kv tiles on average (the
    batch's longest lists; lists built at run time count as wide as the kv block count).
    With shorter lists it keeps the natural [B, T, heads, H] layout: a q block and a kv
    block of all heads are contiguous slabs, the per-tile transposes cost less than the
    per-call relayouts of q / k / v / out, which run from memory once the arrays outgrow
    the cache. Paired calls in one process, 128-token tiles, natural / by heads: forward
    block-sparse 1/32 0.85-0.89 (T = 4096, 8192), 0.94 (16384), sliding window 1/32
    0.93-0.94, 4-5 tiles per q block 0.98-1.04, 9 (sliding window 1/8, T = 8192) 1.03;
    gradients by heads are 1-3% faster at every density measured. q / out / dq stay
    [B, Tp, N, ·] or [B, N, Tp, ·] (a [.., K, G, ..] loop buffer drew an extra
    whole-array copy from XLA's layout assignment when G = 1), and each q block's output,
    or dq, is written in place into the buffer it read its q, or dout, rows from when
    H == Hv: no output is zero-filled or re-stacked per call (the forward run for a
    gradient keeps q, which the backward reads).
  * ``custom_vjp``: the forward saves only (q, k, v, out, lse); the backward recomputes
    the probabilities tile by tile (one pass over the same block lists, dq accumulated
    per q block, dk/dv/bias-gradients scattered into their blocks). A dense bias's
    gradient is accumulated per example (summed over the heads, rows or columns it
    broadcasts along inside each tile), so a bias broadcast over B costs B times its own
    size during the backward.

Differentiation: first-order reverse mode (grad, vjp) of every input, including the dense
bias, sink logits and the parameters of a ScoreBias. Forward mode and second order are not
available on this path (its backward loops have data-dependent trip counts); use the
``reference`` implementation for those.

Logit pipeline (library order): scale·q·k → softcap → + bias → mask. Sinks enter only the
denominator. Fully masked rows give 0 and lse = -inf (lse = σ with a sink), no NaN.
"""

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from attn_jax.attention import _checks
from attn_jax.attention import biases as biases_lib
from attn_jax.attention import masks as masks_lib

# Tile sizes measured fastest on a 2-core x86 CPU for H=64 (experiments/bench_attention.py).
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_KV = 512
# The forward (without gradient) works in the arrays' natural layout when its q blocks
# list at most this many kv tiles on average; otherwise it re-lays them by heads once per
# call, as the gradient path always does (module doc).
NATURAL_LAYOUT_MEAN_TILES = 4


def cpu_cores_per_device() -> float:
  """The CPU cores this process may run on per local XLA:CPU device (XLA shares them among
  its devices); inf when the default backend is not the CPU.

  Tile choices depend on it: XLA:CPU spreads only large operations over a device's cores,
  so one device with several cores favours large tiles, while a device with at most one
  core (a process pinned to a core, or ``--xla_force_host_platform_device_count`` devices)
  runs small tiles as fast and skips at a finer grain."""
  if jax.default_backend() != "cpu":
    return float("inf")
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # no affinity API (not Linux)
    cores = os.cpu_count() or 1
  return cores / jax.local_device_count()


class _Config(NamedTuple):
  """Static facts of one call (hashable: a custom_vjp nondiff argument)."""

  T: int
  S: int
  block_q: int
  block_kv: int
  num_q_blocks: int
  q_offset: int
  scale: float
  softcap: float | None
  bias_axes: tuple[bool, ...] | None  # per [B, K, G, T, S]: is the dense bias full there
  has_sinks: bool
  masked: bool  # a mask (beyond the padding of the last kv block) is present
  lists_batched: bool
  signed: bool = False  # signed weights sign(s)·exp(|s|)/Σexp(|s|) (cog attention)
  heads_first: bool = False  # the forward without gradient lays q / k / v / out by heads


def blocked_attention(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K Hv"],
  *,
  mask=None,
  bias=None,
  scale: float | None = None,
  softcap: float | None = None,
  sinks: Float[Array, " N"] | None = None,
  return_lse: bool = False,
  block_q: int = DEFAULT_BLOCK_Q,
  block_kv: int = DEFAULT_BLOCK_KV,
  signed: bool = False,
):
  """Blocked softmax attention with block skipping and a recomputing backward.

  Args: as ``reference.attention_reference`` (no ``return_probs``; ``signed`` as there:
    running max and sum over |s|, numerators times sign(s)), plus
    block_q, block_kv: tile sizes (clipped to T and S).

  Returns:
    out ``[B, T, N, Hv]`` (q's dtype), and lse ``[B, N, T]`` (float32) when asked.
  """
  dims = _checks.check_qkv(q, k, v)
  _checks.check_options(dims, mask=mask, bias=bias, scale=scale, softcap=softcap, sinks=sinks)
  _checks.check_block_size("block_q", block_q)
  _checks.check_block_size("block_kv", block_kv)
  B, T, S, N, K, H, Hv = dims
  G = N // K
  bq, bk = min(block_q, T), min(block_kv, S)
  nQ, nK = -(-T // bq), -(-S // bk)
  Tp, Sp = nQ * bq, nK * bk
  q_offset = S - T
  dtype = _checks.compute_dtype(q.dtype)

  if mask is None:
    mask = masks_lib.FullMask()
  if mask.holds_arrays and not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(mask)):
    # Concrete arrays (e.g. lists closed over by a jitted function): a host block map, so
    # the lists are constants of the program rather than computed in it.
    with jax.ensure_compile_time_eval():
      kinds = np.asarray(mask.block_kinds(T, S, bq, bk))
  else:
    kinds = mask.block_kinds(T, S, bq, bk)
  if Sp != S:  # the padded tail of the last kv block must be masked
    if isinstance(kinds, np.ndarray):
      kinds = kinds.copy()
      kinds[..., -1] = np.minimum(kinds[..., -1], masks_lib.PARTIAL)
    else:
      kinds = kinds.at[..., -1].min(masks_lib.PARTIAL)
  compact = masks_lib.compact_block_kinds(kinds)
  lists = tuple(jnp.asarray(a) for a in compact)
  # Inside listed tiles only the parts of the mask that vary within a tile are evaluated
  # (a BlockSparseMask on blocks the tiles divide is all-visible there).
  mask = mask.within_tiles(bq, bk, q_offset=q_offset)
  masked = not isinstance(mask, masks_lib.FullMask)

  def pad_to(x, axis, length):
    if x.shape[axis] == length:
      return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths)

  # The forward keeps the natural [B, T, heads, H] layout when its q blocks list few kv
  # tiles, and re-lays q / k / v / out by heads otherwise; the gradient path always works
  # by heads (module doc).
  if isinstance(kinds, np.ndarray):  # known lists: the mean kv tiles per q block
    counts = compact[0].reshape(-1, nQ)
    tiles_per_q_block = float(counts.max(0).mean())  # a batch runs its longest lists
  else:  # lists built in the program: their width bounds the mean
    tiles_per_q_block = float(lists[1].shape[-1])
  heads_first = tiles_per_q_block > NATURAL_LAYOUT_MEAN_TILES
  q_in = pad_to(q.astype(dtype), 1, Tp)
  k_in = pad_to(k.astype(dtype), 1, Sp)
  v_in = pad_to(v.astype(dtype), 1, Sp)

  dense_bias, bias_fn, bias_axes = None, None, None
  if isinstance(bias, biases_lib.ScoreBias):
    bias_fn = bias
  elif bias is not None:
    bB, bN, bT, bS = bias.shape
    bK, bG = (K, G) if bN == N else (1, 1)
    b5 = bias.reshape(bB, bK, bG, bT, bS).astype(dtype)
    dense_bias = pad_to(pad_to(b5, 3, Tp if bT > 1 else 1), 4, Sp if bS > 1 else 1)
    bias_axes = (bB > 1, bK > 1, bG > 1, bT > 1, bS > 1)
  sinks_KG = None if sinks is None else sinks.astype(dtype).reshape(K, G)

  cfg = _Config(
    T=T,
    S=S,
    block_q=bq,
    block_kv=bk,
    num_q_blocks=nQ,
    q_offset=q_offset,
    scale=_checks.default_scale(H, scale),
    softcap=softcap,
    bias_axes=bias_axes,
    has_sinks=sinks is not None,
    masked=masked,
    lists_batched=lists[0].ndim == 2,
    signed=bool(signed),
    heads_first=heads_first,
  )
  out, lse_BKGT = _flash(cfg, q_in, k_in, v_in, dense_bias, bias_fn, sinks_KG, mask, lists)
  out = out[:, :T].reshape(B, T, N, Hv).astype(q.dtype)
  if return_lse:
    return out, lse_BKGT[..., :T].reshape(B, N, T)
  return out


# ---------------------------------------------------------------------------------------
# Per-example tile functions (every head of one q block at once).
# ---------------------------------------------------------------------------------------


def _heads_first(x):
  """[B, T, K, (G,) A] -> [B, K, (G,) T, A]."""
  return jnp.moveaxis(x, 1, -2)


def _natural(x):
  """[B, K, (G,) T, A] -> [B, T, K, (G,) A]."""
  return jnp.moveaxis(x, -2, 1)


def _tile_logits(cfg, q_KGqH, k_kKH, bias_KGqk, bias_fn, q_idx, kv_idx, transposed):
  """(raw logits scale·q·k, logits after softcap and bias) of one tile, all heads.

  Layout [K, G, bq, bk] for the forward (k tile [bk, K, H], or [K, bk, H] when
  ``cfg.heads_first``), or [K, bk, G, bq] (``transposed``, k tile [K, bk, H]) for the
  backward, where every large product then reads its operands as stored.
  """
  K, G, bq, _ = q_KGqH.shape
  if transposed:
    raw = jnp.einsum("ksh,kgqh->ksgq", k_kKH, q_KGqH) * cfg.scale
  elif cfg.heads_first:
    raw = jnp.einsum("kgqh,ksh->kgqs", q_KGqH, k_kKH) * cfg.scale
  else:
    raw = jnp.einsum("kgqh,skh->kgqs", q_KGqH, k_kKH) * cfg.scale
  s = raw
  if cfg.softcap is not None:
    s = cfg.softcap * jnp.tanh(raw / cfg.softcap)
  if bias_fn is not None:
    fn_Nqk = bias_fn(jnp.arange(K * G), q_idx + cfg.q_offset, kv_idx).astype(s.dtype)
    fn_KGqk = fn_Nqk.reshape(K, G, bq, -1)
    bias_KGqk = fn_KGqk if bias_KGqk is None else bias_KGqk + fn_KGqk
  if bias_KGqk is not None:
    s = s + (bias_KGqk.transpose(0, 3, 1, 2) if transposed else bias_KGqk)
  return raw, s


def _apply_mask(cfg, s, is_full, mask, b, q_idx, kv_idx, transposed):
  """Sets invisible logits to -inf (a FULL tile keeps all; the padded kv tail never does)."""
  if transposed:
    q_grid, kv_grid = q_idx[None, :], kv_idx[:, None]  # [bk, bq]
  else:
    q_grid, kv_grid = q_idx[:, None], kv_idx[None, :]  # [bq, bk]
  visible = None
  if cfg.S % cfg.block_kv:  # the last kv block has a padded tail
    visible = kv_grid < cfg.S
  if cfg.masked:
    # A branch (lax.cond) on is_full would skip this arithmetic but costs a tile copy on
    # the XLA CPU backend, which is slower than the fused compare measured here.
    listed = is_full | mask.visible(q_grid, kv_grid, q_offset=cfg.q_offset, batch_index=b)
    visible = listed if visible is None else visible & listed
  if visible is None:
    return s
  visible = visible[None, :, None, :] if transposed else visible[None, None]
  return jnp.where(visible, s, -jnp.inf)


def _bias_tile(cfg, dense_bias, qi, kb):
  """The [K', G', bq', bk'] slice of one example's (broadcast) dense bias for tile (qi, kb)."""
  if dense_bias is None:
    return None
  _, _, _, full_t, full_s = cfg.bias_axes
  tile = dense_bias
  if full_t:
    tile = jax.lax.dynamic_slice_in_dim(tile, qi * cfg.block_q, cfg.block_q, axis=2)
  if full_s:
    tile = jax.lax.dynamic_slice_in_dim(tile, kb * cfg.block_kv, cfg.block_kv, axis=3)
  return tile


class _Tile(NamedTuple):
  """What a q block needs to load any of its kv tiles (k / v as [Sp, K, ·] for the
  natural-layout forward, head-major [K, Sp, ·] otherwise)."""

  q_KGqH: Array
  q_idx: Array
  k: Array
  v: Array
  dense_bias: Array | None
  bias_fn: object
  mask: object
  b: Array
  index_QM: Array
  full_QM: Array


def _load_tile(cfg, tile, qi, j, transposed):
  """The j-th listed kv tile of q block qi: (k, v, kv_idx, raw logits, masked logits)."""
  bk = cfg.block_kv
  kb = tile.index_QM[qi, j]
  axis = 1 if transposed or cfg.heads_first else 0
  k_tile = jax.lax.dynamic_slice_in_dim(tile.k, kb * bk, bk, axis=axis)
  v_tile = jax.lax.dynamic_slice_in_dim(tile.v, kb * bk, bk, axis=axis)
  kv_idx = kb * bk + jnp.arange(bk)
  bias = _bias_tile(cfg, tile.dense_bias, qi, kb)
  raw, s = _tile_logits(
    cfg, tile.q_KGqH, k_tile, bias, tile.bias_fn, tile.q_idx, kv_idx, transposed
  )
  is_full = tile.full_QM[qi, j]
  s = _apply_mask(cfg, s, is_full, tile.mask, tile.b, tile.q_idx, kv_idx, transposed)
  return k_tile, v_tile, kv_idx, raw, s


def _forward_one(
  cfg, q, k, v, dense_bias, bias_fn, sinks_KG, mask, lists, b, trips_Q, *, overwrite_q=False
):
  count_Q, index_QM, full_QM = lists
  # q / k / v: [Tp, N, H] / [Sp, K, ·], or [N, Tp, H] / [K, Sp, ·] when heads_first.
  t_axis = 1 if cfg.heads_first else 0
  K = k.shape[1 - t_axis]
  G = q.shape[1 - t_axis] // K
  H, Hv = q.shape[-1], v.shape[-1]
  bq = cfg.block_q

  def q_block(qi, q_KGqH):
    q_idx = qi * bq + jnp.arange(bq)
    tile = _Tile(q_KGqH, q_idx, k, v, dense_bias, bias_fn, mask, b, index_QM, full_QM)

    def kv_step(j, carry, past_list_possible=cfg.lists_batched):
      m_KGq, l_KGq, acc_KGqV = carry
      _, v_kKV, _, _, s_KGqk = _load_tile(cfg, tile, qi, j, transposed=False)
      if past_list_possible:  # a row may list fewer tiles than the trip count
        s_KGqk = jnp.where(j < count_Q[qi], s_KGqk, -jnp.inf)
      e_KGqk = _magnitude(s_KGqk) if cfg.signed else s_KGqk  # what the exponentials see
      m_new_KGq = jnp.maximum(m_KGq, e_KGqk.max(-1))
      m_safe_KGq = jnp.where(m_new_KGq == -jnp.inf, 0.0, m_new_KGq)
      p_KGqk = jnp.exp(e_KGqk - m_safe_KGq[..., None])
      correction_KGq = jnp.exp(m_KGq - m_safe_KGq)
      l_KGq = correction_KGq * l_KGq + p_KGqk.sum(-1)
      if cfg.signed:
        p_KGqk = jnp.sign(s_KGqk) * p_KGqk
      pv_spec = "kgqs,ksv->kgqv" if cfg.heads_first else "kgqs,skv->kgqv"
      pv_KGqV = jnp.einsum(pv_spec, p_KGqk, v_kKV)
      acc_KGqV = correction_KGq[..., None] * acc_KGqV + pv_KGqV
      return m_new_KGq, l_KGq, acc_KGqV

    empty = (
      jnp.full((K, G, bq), -jnp.inf, q.dtype),
      jnp.zeros((K, G, bq), q.dtype),
      jnp.zeros((K, G, bq, Hv), q.dtype),
    )
    # The first tile runs outside the loop (a one-tile row runs no loop iteration); a row
    # listing nothing sees its padding entry fully masked.
    init = kv_step(0, empty, past_list_possible=True)
    m_KGq, l_KGq, acc_KGqV = jax.lax.fori_loop(1, trips_Q[qi], kv_step, init)
    if cfg.has_sinks:
      sink_KG1 = sinks_KG[..., None]
      m_fin_KGq = jnp.maximum(m_KGq, sink_KG1)
      correction_KGq = jnp.exp(m_KGq - m_fin_KGq)
      l_KGq = correction_KGq * l_KGq + jnp.exp(sink_KG1 - m_fin_KGq)
      acc_KGqV = correction_KGq[..., None] * acc_KGqV
      m_KGq = m_fin_KGq
    empty_KGq = l_KGq == 0
    safe_l_KGq = jnp.where(empty_KGq, 1.0, l_KGq)
    out_KGqV = acc_KGqV / safe_l_KGq[..., None]
    lse_KGq = jnp.where(empty_KGq, -jnp.inf, m_KGq + jnp.log(safe_l_KGq))
    return out_KGqV, lse_KGq

  # Each q block's output is written into the [Tp, N, Hv] (or [N, Tp, Hv]) result in
  # place. With ``overwrite_q`` (q is not needed afterwards) and H == Hv that buffer is q
  # itself (a block's rows are read before they are overwritten, later blocks read only
  # later rows), so no output buffer is zero-filled.
  in_place = overwrite_q and H == Hv

  def step(qi, carry):
    qi = qi.astype(jnp.int32)  # an int64 counter under jax_enable_x64
    buf, lse_NT = carry
    rows = jax.lax.dynamic_slice_in_dim(buf if in_place else q, qi * bq, bq, axis=t_axis)
    if cfg.heads_first:
      q_KGqH = rows.reshape(K, G, bq, H)
    else:  # an in-cache copy of the block's rows
      q_KGqH = rows.reshape(bq, K, G, H).transpose(1, 2, 0, 3)
    out_KGqV, lse_KGq = q_block(qi, q_KGqH)
    if cfg.heads_first:
      out_rows = out_KGqV.reshape(K * G, bq, Hv)
    else:
      out_rows = out_KGqV.transpose(2, 0, 1, 3).reshape(bq, K * G, Hv)
    buf = jax.lax.dynamic_update_slice_in_dim(buf, out_rows, qi * bq, axis=t_axis)
    lse_NT = jax.lax.dynamic_update_slice_in_dim(lse_NT, lse_KGq.reshape(K * G, bq), qi * bq, 1)
    return buf, lse_NT

  out_shape = q.shape[:-1] + (Hv,)
  buf0 = q if in_place else jnp.zeros(out_shape, q.dtype)
  lse0 = jnp.zeros((K * G, out_shape[t_axis]), q.dtype)
  out, lse_NT = jax.lax.fori_loop(0, cfg.num_q_blocks, step, (buf0, lse0))
  return out, lse_NT.reshape(K, G, -1)


def _backward_one(
  cfg,
  q_NTH,
  k_KSH,
  v_KSV,
  dense_bias,
  bias_fn,
  sinks_KG,
  mask,
  lists,
  b,
  delta_KGT,
  lse_KGT,
  dout_NTV,
  trips_Q,
):
  """One example's gradients from head-major q / k / v / dout: every tile product and
  every dk / dv update then reads or writes contiguous [bk, ·] rows per head.

  dq [N, Tp, H] is written block by block into dout's buffer when H == Hv (block qi's
  dout rows are read before its dq rows replace them, later blocks read later rows)."""
  count_Q, index_QM, full_QM = lists
  K, G = delta_KGT.shape[:2]
  H, Hv = q_NTH.shape[-1], v_KSV.shape[-1]
  bq, bk = cfg.block_q, cfg.block_kv
  R = G * bq
  in_place = H == Hv
  # Fully masked rows have lse = -inf and only -inf logits: exp(-inf - 0) = 0, no NaN.
  lse_KGT = jnp.where(lse_KGT == -jnp.inf, 0.0, lse_KGT)

  def q_block(qi, carry):
    qi = qi.astype(jnp.int32)  # an int64 counter under jax_enable_x64
    dq_NTH, dk_KSH, dv_KSV, dbias, dfn = carry
    q_KGqH = jax.lax.dynamic_slice_in_dim(q_NTH, qi * bq, bq, axis=1).reshape(K, G, bq, H)
    dout = dq_NTH if in_place else dout_NTV
    do_KGqV = jax.lax.dynamic_slice_in_dim(dout, qi * bq, bq, axis=1).reshape(K, G, bq, Hv)
    lse_KGq = jax.lax.dynamic_slice_in_dim(lse_KGT, qi * bq, bq, axis=2)
    delta_KR = jax.lax.dynamic_slice_in_dim(delta_KGT, qi * bq, bq, axis=2).reshape(K, R)
    q_KRH, do_KRV = q_KGqH.reshape(K, R, H), do_KGqV.reshape(K, R, Hv)
    q_idx = qi * bq + jnp.arange(bq)
    tile = _Tile(q_KGqH, q_idx, k_KSH, v_KSV, dense_bias, bias_fn, mask, b, index_QM, full_QM)

    def kv_step(j, inner):
      dqT_KHR, dk_KSH, dv_KSV, dbias, dfn = inner
      kb = index_QM[qi, j]
      k_KkH, v_KkV, kv_idx, raw_KkGq, s_KkGq = _load_tile(cfg, tile, qi, j, transposed=True)
      if cfg.lists_batched:  # rows of the batch list fewer tiles than the trip count
        s_KkGq = jnp.where(j < count_Q[qi], s_KkGq, -jnp.inf)
      if cfg.signed:  # a = exp(|s| - lse), p = sign(s)·a: ds = a·(dp − sign(s)·delta)
        a_KkR = jnp.exp(_magnitude(s_KkGq) - lse_KGq[:, None]).reshape(K, bk, R)
        sign_KkR = jnp.sign(s_KkGq).reshape(K, bk, R)
        dv_KkV = jnp.einsum("ksr,krv->ksv", sign_KkR * a_KkR, do_KRV)
        dp_KkR = jnp.einsum("ksv,krv->ksr", v_KkV, do_KRV)
        ds_KkR = a_KkR * (dp_KkR - sign_KkR * delta_KR[:, None])
      else:
        p_KkR = jnp.exp(s_KkGq - lse_KGq[:, None]).reshape(K, bk, R)  # [K, bk, G*bq]
        dv_KkV = jnp.einsum("ksr,krv->ksv", p_KkR, do_KRV)
        dp_KkR = jnp.einsum("ksv,krv->ksr", v_KkV, do_KRV)
        ds_KkR = p_KkR * (dp_KkR - delta_KR[:, None])  # d loss / d (logit after bias)
      if dbias is not None or dfn is not None:
        ds_KGqk = ds_KkR.reshape(K, bk, G, bq).transpose(0, 2, 3, 1)
        if dbias is not None:
          dbias = _scatter_bias_grad(cfg, dbias, ds_KGqk, qi, kb)
        if dfn is not None:
          fn_out, fn_vjp = jax.vjp(
            lambda fn: fn(jnp.arange(K * G), q_idx + cfg.q_offset, kv_idx), bias_fn
          )
          (dfn_tile,) = fn_vjp(ds_KGqk.reshape(fn_out.shape).astype(fn_out.dtype))
          dfn = jax.tree.map(jnp.add, dfn, dfn_tile)
      if cfg.softcap is not None:
        tanh_KkR = jnp.tanh(raw_KkGq.reshape(K, bk, R) / cfg.softcap)
        ds_KkR = ds_KkR * (1.0 - jnp.square(tanh_KkR))
      ds_KkR = ds_KkR * cfg.scale
      # dq transposed ([K, H, G*bq]) so ds is read as stored.
      dqT_KHR = dqT_KHR + jnp.einsum("ksh,ksr->khr", k_KkH, ds_KkR)
      dk_KSH = _add_block(dk_KSH, jnp.einsum("ksr,krh->ksh", ds_KkR, q_KRH), kb * bk)
      dv_KSV = _add_block(dv_KSV, dv_KkV, kb * bk)
      return dqT_KHR, dk_KSH, dv_KSV, dbias, dfn

    init = (jnp.zeros((K, H, R), q_NTH.dtype), dk_KSH, dv_KSV, dbias, dfn)
    dqT_KHR, dk_KSH, dv_KSV, dbias, dfn = jax.lax.fori_loop(0, trips_Q[qi], kv_step, init)
    dq_NqH = dqT_KHR.reshape(K, H, G, bq).transpose(0, 2, 3, 1).reshape(K * G, bq, H)
    dq_NTH = jax.lax.dynamic_update_slice_in_dim(dq_NTH, dq_NqH, qi * bq, axis=1)
    return dq_NTH, dk_KSH, dv_KSV, dbias, dfn

  dbias0 = None if dense_bias is None else jnp.zeros_like(dense_bias)
  dfn0 = None if bias_fn is None else jax.tree.map(jnp.zeros_like, bias_fn)
  dq0 = dout_NTV if in_place else jnp.zeros_like(q_NTH)
  carry0 = (dq0, jnp.zeros_like(k_KSH), jnp.zeros_like(v_KSV), dbias0, dfn0)
  return jax.lax.fori_loop(0, cfg.num_q_blocks, q_block, carry0)


def _magnitude(s):
  """|s| with masked (-inf) logits kept at -inf."""
  return jnp.where(s == -jnp.inf, -jnp.inf, jnp.abs(s))


def _add_block(x, update, start):
  """x[:, start : start + n] += update ([K, n, ·] rows of head-major accumulators)."""
  current = jax.lax.dynamic_slice_in_dim(x, start, update.shape[1], axis=1)
  return jax.lax.dynamic_update_slice_in_dim(x, current + update, start, axis=1)


def _scatter_bias_grad(cfg, dbias, ds_KGqk, qi, kb):
  """Adds a tile's logit gradient into one example's [K', G', Tp', Sp'] bias gradient
  (summing over the axes the bias broadcasts along)."""
  _, full_k, full_g, full_t, full_s = cfg.bias_axes
  tile = ds_KGqk
  for axis, full in enumerate((full_k, full_g, full_t, full_s)):
    if not full:
      tile = tile.sum(axis, keepdims=True)
  zero = jnp.int32(0)
  start = (
    zero,
    zero,
    qi * cfg.block_q if full_t else zero,
    kb * cfg.block_kv if full_s else zero,
  )
  current = jax.lax.dynamic_slice(dbias, start, tile.shape)
  return jax.lax.dynamic_update_slice(dbias, current + tile, start)


# ---------------------------------------------------------------------------------------
# Batching over B and the custom_vjp.
# ---------------------------------------------------------------------------------------


def _vmapped(fn, cfg, dense_bias, extra_axes=()):
  """vmaps ``fn(cfg, q, k, v, bias, fn, sinks, mask, lists, b, *extra)`` over the batch."""
  bias_b = 0 if dense_bias is not None and cfg.bias_axes[0] else None
  lists_b = 0 if cfg.lists_batched else None
  return jax.vmap(
    functools.partial(fn, cfg),
    in_axes=(0, 0, 0, bias_b, None, None, None, lists_b, 0) + extra_axes,
  )


def _example_bias(cfg, dense_bias):
  """Dense bias [B', K', G', Tp', Sp'] with B' dropped where it broadcasts (for vmap)."""
  if dense_bias is None or cfg.bias_axes[0]:
    return dense_bias
  return dense_bias[0]


def _run_forward(cfg, q, k, v, dense_bias, bias_fn, sinks_KG, mask, lists, overwrite_q):
  B = q.shape[0]
  one = functools.partial(_forward_one, overwrite_q=overwrite_q)
  fwd = _vmapped(one, cfg, dense_bias, extra_axes=(None,))
  trips = _trips(cfg, lists)
  bias = _example_bias(cfg, dense_bias)
  return fwd(q, k, v, bias, bias_fn, sinks_KG, mask, lists, jnp.arange(B), trips)


def _trips(cfg, lists):
  """Per q block, the kv-tile loop's trip count shared by the batch (the longest list).

  A vmapped loop with per-example trip counts runs to the longest anyway, selecting between
  old and new carries at every step (in the backward whole dk / dv arrays); with a shared
  count the tiles past an example's list are masked instead (-inf logits, zero updates)."""
  return lists[0].max(0) if cfg.lists_batched else lists[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, dense_bias, bias_fn, sinks_KG, mask, lists):
  """Attention of natural-layout [B, Tp, heads, ·] q / k / v; out [B, Tp, N, Hv], lse
  [B, K, G, Tp]. Without a gradient the forward runs in ``cfg``'s layout."""
  if not cfg.heads_first:
    return _run_forward(cfg, q, k, v, dense_bias, bias_fn, sinks_KG, mask, lists, True)
  q, k, v = _heads_first(q), _heads_first(k), _heads_first(v)
  out, lse = _run_forward(cfg, q, k, v, dense_bias, bias_fn, sinks_KG, mask, lists, True)
  return _natural(out), lse


def _flash_fwd(cfg, q, k, v, dense_bias, bias_fn, sinks_KG, mask, lists):
  # The gradient path works by heads: the backward's tiles read head-major rows, and the
  # forward shares the re-laid q / k / v with it (q stays intact: the backward reads it).
  cfg = cfg._replace(heads_first=True)
  q, k, v = _heads_first(q), _heads_first(k), _heads_first(v)
  out, lse = _run_forward(cfg, q, k, v, dense_bias, bias_fn, sinks_KG, mask, lists, False)
  return (_natural(out), lse), (q, k, v, dense_bias, bias_fn, sinks_KG, mask, lists, out, lse)


def _flash_bwd(cfg, residuals, cotangents):
  q, k, v, dense_bias, bias_fn, sinks_KG, mask, lists, out, lse = residuals
  dout, dlse = cotangents
  dout = _heads_first(dout.astype(out.dtype))  # [B, N, Tp, Hv]
  # d lse / d s_ij = p_ij, so an lse cotangent folds into the softmax-backward row term:
  # ds = p * (dp - delta) with delta = rowsum(dout * out) - dlse.
  delta = (dout * out).sum(-1).reshape(lse.shape)
  delta = delta - dlse.astype(out.dtype)  # [B, K, G, Tp]
  B = q.shape[0]
  trips = _trips(cfg, lists)
  bwd = _vmapped(_backward_one, cfg, dense_bias, extra_axes=(0, 0, 0, None))
  bias = _example_bias(cfg, dense_bias)
  dq, dk, dv, dbias, dfn = bwd(
    q, k, v, bias, bias_fn, sinks_KG, mask, lists, jnp.arange(B), delta, lse, dout, trips
  )
  dq, dk, dv = _natural(dq), _natural(dk), _natural(dv)
  # dk/dv: already summed over the G query heads of each kv head.
  if dense_bias is not None:  # dbias: [B, K', G', Tp', Sp'] -> the broadcast shape
    if not cfg.bias_axes[0]:
      dbias = dbias.sum(0, keepdims=True)
    dbias = dbias.astype(dense_bias.dtype)
  if dfn is not None:
    dfn = jax.tree.map(lambda g: g.sum(0), dfn)
  dsinks = None
  if sinks_KG is not None:
    valid = jnp.arange(lse.shape[-1]) < cfg.T
    dsinks = -jnp.where(valid, jnp.exp(sinks_KG[None, :, :, None] - lse) * delta, 0.0)
    dsinks = dsinks.sum((0, 3)).astype(sinks_KG.dtype)
  return dq, dk, dv, dbias, dfn, dsinks, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
