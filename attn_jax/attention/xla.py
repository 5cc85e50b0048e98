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
    all-visible there). Masks holding concrete arrays get their block map on the host.
  * Per-example lists (batched masks): each q block's kv loop runs the batch's longest
    list, masking the tiles past an example's own (a vmapped loop with per-example trip
    counts would select between old and new dk/dv, whole arrays, at every step).
  * GQA/MQA without repeating K/V: the tile holds the G query heads of one kv head.
  * ``custom_vjp``: the forward saves only (q, k, v, out, lse); the backward recomputes
    the probabilities tile by tile (one pass over the same block lists, dq accumulated
    per q block, dk/dv/bias-gradients scattered into their blocks). A dense bias's
    gradient is accumulated per (example, kv head) before summing over broadcast axes,
    so a bias broadcast over B or N costs B·K times its own size during the backward.

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
  lists = tuple(jnp.asarray(a) for a in masks_lib.compact_block_kinds(kinds))
  # Inside listed tiles only the parts of the mask that vary within a tile are evaluated
  # (a BlockSparseMask on blocks the tiles divide is all-visible there).
  mask = mask.within_tiles(bq, bk)
  masked = not isinstance(mask, masks_lib.FullMask)

  def pad_to(x, axis, length):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths)

  q_BKGTH = pad_to(q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).astype(dtype), 3, Tp)
  k_BKSH = pad_to(k.transpose(0, 2, 1, 3).astype(dtype), 2, Sp)
  v_BKSV = pad_to(v.transpose(0, 2, 1, 3).astype(dtype), 2, Sp)

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
  )
  out_BKGTV, lse_BKGT = _flash(
    cfg, q_BKGTH, k_BKSH, v_BKSV, dense_bias, bias_fn, sinks_KG, mask, lists
  )
  out = out_BKGTV[:, :, :, :T].transpose(0, 3, 1, 2, 4).reshape(B, T, N, Hv).astype(q.dtype)
  if return_lse:
    return out, lse_BKGT[..., :T].reshape(B, N, T)
  return out


# ---------------------------------------------------------------------------------------
# Per-(example, kv-head) tile functions.
# ---------------------------------------------------------------------------------------


def _tile_logits(cfg, q_GqH, k_kH, bias_Gqk, bias_fn, heads_G, q_idx, kv_idx, transposed):
  """(raw logits scale·q·k, logits after softcap and bias) of one tile.

  Layout [G, bq, bk] for the forward, or [bk, G, bq] (``transposed``) for the backward,
  where every large product then reads its operands in their natural layout.
  """
  if transposed:
    G, bq, H = q_GqH.shape
    raw = (k_kH @ q_GqH.reshape(G * bq, H).T).reshape(-1, G, bq) * cfg.scale
  else:
    raw = _rows_matmul(q_GqH, k_kH.T) * cfg.scale
  s = raw
  if cfg.softcap is not None:
    s = cfg.softcap * jnp.tanh(raw / cfg.softcap)
  if bias_fn is not None:
    fn_Gqk = bias_fn(heads_G, q_idx + cfg.q_offset, kv_idx).astype(s.dtype)
    bias_Gqk = fn_Gqk if bias_Gqk is None else bias_Gqk + fn_Gqk
  if bias_Gqk is not None:
    s = s + (bias_Gqk.transpose(2, 0, 1) if transposed else bias_Gqk)
  return raw, s


def _rows_matmul(x_Gqa, y_ab):
  """[G, bq, a] @ [a, b] with the G query heads stacked as rows of one matmul."""
  G, bq, a = x_Gqa.shape
  return (x_Gqa.reshape(G * bq, a) @ y_ab).reshape(G, bq, -1)


def _apply_mask(cfg, s, is_full, mask, b, q_idx, kv_idx, transposed):
  """Sets invisible logits to -inf (a FULL tile keeps all; the padded kv tail never does)."""
  if transposed:
    q_grid, kv_grid = q_idx[None, :], kv_idx[:, None]  # [bk, bq]
  else:
    q_grid, kv_grid = q_idx[:, None], kv_idx[None, :]  # [bq, bk]
  in_range = kv_grid < cfg.S
  visible = in_range
  if cfg.masked:
    # A branch (lax.cond) on is_full would skip this arithmetic but costs a tile copy on
    # the XLA CPU backend, which is slower than the fused compare measured here.
    visible = in_range & (
      is_full | mask.visible(q_grid, kv_grid, q_offset=cfg.q_offset, batch_index=b)
    )
  visible = visible[:, None, :] if transposed else visible[None]
  return jnp.where(visible, s, -jnp.inf)


def _bias_tile(cfg, dense_bias, qi, kb):
  """The [G', bq', bk'] slice of the (broadcast) dense bias for tile (qi, kb)."""
  if dense_bias is None:
    return None
  _, _, _, full_t, full_s = cfg.bias_axes
  tile = dense_bias
  if full_t:
    tile = jax.lax.dynamic_slice_in_dim(tile, qi * cfg.block_q, cfg.block_q, axis=1)
  if full_s:
    tile = jax.lax.dynamic_slice_in_dim(tile, kb * cfg.block_kv, cfg.block_kv, axis=2)
  return tile


class _Tile(NamedTuple):
  """What a q block needs to load any of its kv tiles."""

  q_GqH: Array
  q_idx: Array
  k_SH: Array
  v_SV: Array
  dense_bias: Array | None
  bias_fn: object
  heads_G: Array
  mask: object
  b: Array
  index_QM: Array
  full_QM: Array


def _load_tile(cfg, tile, qi, j, transposed):
  """The j-th listed kv tile of q block qi: (k, v, kv_idx, raw logits, masked logits)."""
  bk = cfg.block_kv
  kb = tile.index_QM[qi, j]
  k_kH = jax.lax.dynamic_slice_in_dim(tile.k_SH, kb * bk, bk, axis=0)  # [bk, H]
  v_kV = jax.lax.dynamic_slice_in_dim(tile.v_SV, kb * bk, bk, axis=0)  # [bk, Hv]
  kv_idx = kb * bk + jnp.arange(bk)
  bias = _bias_tile(cfg, tile.dense_bias, qi, kb)
  raw, s = _tile_logits(
    cfg, tile.q_GqH, k_kH, bias, tile.bias_fn, tile.heads_G, tile.q_idx, kv_idx, transposed
  )
  is_full = tile.full_QM[qi, j]
  s = _apply_mask(cfg, s, is_full, tile.mask, tile.b, tile.q_idx, kv_idx, transposed)
  return k_kH, v_kV, kv_idx, raw, s


def _forward_one(cfg, q_GTH, k_SH, v_SV, dense_bias, bias_fn, sinks_G, mask, lists, b, kh, trips_Q):
  count_Q, index_QM, full_QM = lists
  G = q_GTH.shape[0]
  Hv = v_SV.shape[-1]
  bq = cfg.block_q
  heads_G = kh * G + jnp.arange(G)

  def q_block(qi):
    q_GqH = jax.lax.dynamic_slice_in_dim(q_GTH, qi * bq, bq, axis=1)
    q_idx = qi * bq + jnp.arange(bq)
    tile = _Tile(q_GqH, q_idx, k_SH, v_SV, dense_bias, bias_fn, heads_G, mask, b, index_QM, full_QM)

    def kv_step(j, carry, past_list_possible=cfg.lists_batched):
      m_Gq, l_Gq, acc_GqV = carry
      _, v_kV, _, _, s_Gqk = _load_tile(cfg, tile, qi, j, transposed=False)
      if past_list_possible:  # a row may list fewer tiles than the trip count
        s_Gqk = jnp.where(j < count_Q[qi], s_Gqk, -jnp.inf)
      e_Gqk = _magnitude(s_Gqk) if cfg.signed else s_Gqk  # what the exponentials see
      m_new_Gq = jnp.maximum(m_Gq, e_Gqk.max(-1))
      m_safe_Gq = jnp.where(m_new_Gq == -jnp.inf, 0.0, m_new_Gq)
      p_Gqk = jnp.exp(e_Gqk - m_safe_Gq[..., None])  # [G, bq, bk]
      correction_Gq = jnp.exp(m_Gq - m_safe_Gq)
      l_Gq = correction_Gq * l_Gq + p_Gqk.sum(-1)
      if cfg.signed:
        p_Gqk = jnp.sign(s_Gqk) * p_Gqk
      acc_GqV = correction_Gq[..., None] * acc_GqV + _rows_matmul(p_Gqk, v_kV)
      return m_new_Gq, l_Gq, acc_GqV

    empty = (
      jnp.full((G, bq), -jnp.inf, q_GTH.dtype),
      jnp.zeros((G, bq), q_GTH.dtype),
      jnp.zeros((G, bq, Hv), q_GTH.dtype),
    )
    # The first tile runs outside the loop (a one-tile row runs no loop iteration); a row
    # listing nothing sees its padding entry fully masked.
    init = kv_step(0, empty, past_list_possible=True)
    m_Gq, l_Gq, acc_GqV = jax.lax.fori_loop(1, trips_Q[qi], kv_step, init)
    if cfg.has_sinks:
      sink_G1 = sinks_G[:, None]
      m_fin_Gq = jnp.maximum(m_Gq, sink_G1)
      correction_Gq = jnp.exp(m_Gq - m_fin_Gq)
      l_Gq = correction_Gq * l_Gq + jnp.exp(sink_G1 - m_fin_Gq)
      acc_GqV = correction_Gq[..., None] * acc_GqV
      m_Gq = m_fin_Gq
    empty_Gq = l_Gq == 0
    safe_l_Gq = jnp.where(empty_Gq, 1.0, l_Gq)
    out_GqV = acc_GqV / safe_l_Gq[..., None]
    lse_Gq = jnp.where(empty_Gq, -jnp.inf, m_Gq + jnp.log(safe_l_Gq))
    return out_GqV, lse_Gq

  out_QGqV, lse_QGq = jax.lax.map(q_block, jnp.arange(cfg.num_q_blocks, dtype=jnp.int32))
  out_GTV = out_QGqV.transpose(1, 0, 2, 3).reshape(G, -1, Hv)
  lse_GT = lse_QGq.transpose(1, 0, 2).reshape(G, -1)
  return out_GTV, lse_GT


def _backward_one(
  cfg,
  q_GTH,
  k_SH,
  v_SV,
  dense_bias,
  bias_fn,
  sinks_G,
  mask,
  lists,
  b,
  kh,
  delta_GT,
  lse_GT,
  dout_GTV,
  trips_Q,
):
  count_Q, index_QM, full_QM = lists
  G, Tp, H = q_GTH.shape
  bq, bk = cfg.block_q, cfg.block_kv
  R = G * bq
  heads_G = kh * G + jnp.arange(G)
  # Fully masked rows have lse = -inf and only -inf logits: exp(-inf - 0) = 0, no NaN.
  lse_GT = jnp.where(lse_GT == -jnp.inf, 0.0, lse_GT)

  def q_block(carry, qi):
    dk_SH, dv_SV, dbias, dfn = carry
    q_GqH = jax.lax.dynamic_slice_in_dim(q_GTH, qi * bq, bq, axis=1)
    do_GqV = jax.lax.dynamic_slice_in_dim(dout_GTV, qi * bq, bq, axis=1)
    lse_Gq = jax.lax.dynamic_slice_in_dim(lse_GT, qi * bq, bq, axis=1)
    delta_R = jax.lax.dynamic_slice_in_dim(delta_GT, qi * bq, bq, axis=1).reshape(R)
    q_RH, do_RV = q_GqH.reshape(R, H), do_GqV.reshape(R, -1)
    q_idx = qi * bq + jnp.arange(bq)
    tile = _Tile(q_GqH, q_idx, k_SH, v_SV, dense_bias, bias_fn, heads_G, mask, b, index_QM, full_QM)

    def kv_step(j, inner):
      dqT_HGq, dk_SH, dv_SV, dbias, dfn = inner
      kb = index_QM[qi, j]
      k_kH, v_kV, kv_idx, raw_kGq, s_kGq = _load_tile(cfg, tile, qi, j, transposed=True)
      if cfg.lists_batched:  # rows of the batch list fewer tiles than the trip count
        s_kGq = jnp.where(j < count_Q[qi], s_kGq, -jnp.inf)
      if cfg.signed:  # a = exp(|s| - lse), p = sign(s)·a: ds = a·(dp − sign(s)·delta)
        a_kR = jnp.exp(_magnitude(s_kGq) - lse_Gq[None]).reshape(bk, R)
        sign_kR = jnp.sign(s_kGq).reshape(bk, R)
        dv_kV = (sign_kR * a_kR) @ do_RV
        dp_kR = v_kV @ do_RV.T
        ds_kR = a_kR * (dp_kR - sign_kR * delta_R[None])
      else:
        p_kR = jnp.exp(s_kGq - lse_Gq[None]).reshape(bk, R)  # [bk, G*bq]
        dv_kV = p_kR @ do_RV
        dp_kR = v_kV @ do_RV.T
        ds_kR = p_kR * (dp_kR - delta_R[None])  # d loss / d (logit after bias)
      if dbias is not None or dfn is not None:
        ds_Gqk = ds_kR.reshape(bk, G, bq).transpose(1, 2, 0)
        if dbias is not None:
          dbias = _scatter_bias_grad(cfg, dbias, ds_Gqk, qi, kb)
        if dfn is not None:
          fn_out, fn_vjp = jax.vjp(lambda fn: fn(heads_G, q_idx + cfg.q_offset, kv_idx), bias_fn)
          (dfn_tile,) = fn_vjp(ds_Gqk.astype(fn_out.dtype))
          dfn = jax.tree.map(jnp.add, dfn, dfn_tile)
      if cfg.softcap is not None:
        ds_kR = ds_kR * (1.0 - jnp.square(jnp.tanh(raw_kGq.reshape(bk, R) / cfg.softcap)))
      ds_kR = ds_kR * cfg.scale
      dqT_HGq = dqT_HGq + k_kH.T @ ds_kR  # [H, G*bq]: transposed so ds is read as stored
      dk_SH = _add_block(dk_SH, ds_kR @ q_RH, kb * bk)
      dv_SV = _add_block(dv_SV, dv_kV, kb * bk)
      return dqT_HGq, dk_SH, dv_SV, dbias, dfn

    init = (jnp.zeros((H, R), q_GTH.dtype), dk_SH, dv_SV, dbias, dfn)
    dqT_HR, dk_SH, dv_SV, dbias, dfn = jax.lax.fori_loop(0, trips_Q[qi], kv_step, init)
    return (dk_SH, dv_SV, dbias, dfn), dqT_HR.T.reshape(G, bq, H)

  dbias0 = None if dense_bias is None else jnp.zeros_like(dense_bias)
  dfn0 = None if bias_fn is None else jax.tree.map(jnp.zeros_like, bias_fn)
  carry0 = (jnp.zeros_like(k_SH), jnp.zeros_like(v_SV), dbias0, dfn0)
  (dk_SH, dv_SV, dbias, dfn), dq_QGqH = jax.lax.scan(
    q_block, carry0, jnp.arange(cfg.num_q_blocks, dtype=jnp.int32)
  )
  dq_GTH = dq_QGqH.transpose(1, 0, 2, 3).reshape(G, Tp, H)
  return dq_GTH, dk_SH, dv_SV, dbias, dfn


def _magnitude(s):
  """|s| with masked (-inf) logits kept at -inf."""
  return jnp.where(s == -jnp.inf, -jnp.inf, jnp.abs(s))


def _add_block(x, update, start):
  current = jax.lax.dynamic_slice_in_dim(x, start, update.shape[0], axis=0)
  return jax.lax.dynamic_update_slice_in_dim(x, current + update, start, axis=0)


def _scatter_bias_grad(cfg, dbias, ds_Gqk, qi, kb):
  """Adds a tile's logit gradient into the [G', Tp', Sp'] bias gradient (summing broadcasts)."""
  _, _, full_g, full_t, full_s = cfg.bias_axes
  tile = ds_Gqk
  if not full_g:
    tile = tile.sum(0, keepdims=True)
  if not full_t:
    tile = tile.sum(1, keepdims=True)
  if not full_s:
    tile = tile.sum(2, keepdims=True)
  zero = jnp.int32(0)
  start = (zero, qi * cfg.block_q if full_t else zero, kb * cfg.block_kv if full_s else zero)
  current = jax.lax.dynamic_slice(dbias, start, tile.shape)
  return jax.lax.dynamic_update_slice(dbias, current + tile, start)


# ---------------------------------------------------------------------------------------
# Batching over (B, K) and the custom_vjp.
# ---------------------------------------------------------------------------------------


def _vmapped(fn, cfg, dense_bias, extra_axes=()):
  """vmaps ``fn(cfg, q, k, v, bias, fn, sinks, mask, lists, b, kh, *extra)`` over B and K."""
  bias_b = bias_k = None
  if dense_bias is not None:
    bias_b = 0 if cfg.bias_axes[0] else None
    bias_k = 0 if cfg.bias_axes[1] else None
  lists_b = 0 if cfg.lists_batched else None
  inner = jax.vmap(
    functools.partial(fn, cfg), in_axes=(0, 0, 0, bias_k, None, 0, None, None, None, 0) + extra_axes
  )
  outer = jax.vmap(
    inner, in_axes=(0, 0, 0, bias_b, None, None, None, lists_b, 0, None) + extra_axes
  )
  return outer


def _squeeze_bias_axes(cfg, dense_bias):
  """Dense bias [B', K', G', Tp', Sp'] with B'/K' dropped where they broadcast (for vmap)."""
  if dense_bias is None:
    return None
  if not cfg.bias_axes[1]:
    dense_bias = dense_bias[:, 0]
    if not cfg.bias_axes[0]:
      dense_bias = dense_bias[0]
  elif not cfg.bias_axes[0]:
    dense_bias = dense_bias[0]
  return dense_bias


def _run_forward(cfg, q, k, v, dense_bias, bias_fn, sinks_KG, mask, lists):
  B, K = q.shape[:2]
  bias = _squeeze_bias_axes(cfg, dense_bias)
  sinks = sinks_KG if sinks_KG is not None else jnp.zeros((K, 0), q.dtype)
  fwd = _vmapped(_forward_one, cfg, dense_bias, extra_axes=(None,))
  trips = _trips(cfg, lists)
  return fwd(q, k, v, bias, bias_fn, sinks, mask, lists, jnp.arange(B), jnp.arange(K), trips)


def _trips(cfg, lists):
  """Per q block, the kv-tile loop's trip count shared by the batch (the longest list).

  A vmapped loop with per-example trip counts runs to the longest anyway, selecting between
  old and new carries at every step (in the backward whole dk / dv arrays); with a shared
  count the tiles past an example's list are masked instead (-inf logits, zero updates)."""
  return lists[0].max(0) if cfg.lists_batched else lists[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, dense_bias, bias_fn, sinks_KG, mask, lists):
  return _run_forward(cfg, q, k, v, dense_bias, bias_fn, sinks_KG, mask, lists)


def _flash_fwd(cfg, q, k, v, dense_bias, bias_fn, sinks_KG, mask, lists):
  out, lse = _run_forward(cfg, q, k, v, dense_bias, bias_fn, sinks_KG, mask, lists)
  return (out, lse), (q, k, v, dense_bias, bias_fn, sinks_KG, mask, lists, out, lse)


def _flash_bwd(cfg, residuals, cotangents):
  q, k, v, dense_bias, bias_fn, sinks_KG, mask, lists, out, lse = residuals
  dout, dlse = cotangents
  dout = dout.astype(out.dtype)
  # d lse / d s_ij = p_ij, so an lse cotangent folds into the softmax-backward row term:
  # ds = p * (dp - delta) with delta = rowsum(dout * out) - dlse.
  delta = (dout * out).sum(-1) - dlse.astype(out.dtype)  # [B, K, G, Tp]
  B, K = q.shape[:2]
  bias = _squeeze_bias_axes(cfg, dense_bias)
  sinks = sinks_KG if sinks_KG is not None else jnp.zeros((K, 0), q.dtype)
  trips = _trips(cfg, lists)
  bwd = _vmapped(_backward_one, cfg, dense_bias, extra_axes=(0, 0, 0, None))
  dq, dk, dv, dbias, dfn = bwd(
    q,
    k,
    v,
    bias,
    bias_fn,
    sinks,
    mask,
    lists,
    jnp.arange(B),
    jnp.arange(K),
    delta,
    lse,
    dout,
    trips,
  )
  # dk/dv: [B, K, Sp, H] already summed over the G query heads of each kv head.
  if dense_bias is not None:  # dbias: [B, K, G', Tp', Sp'] -> the broadcast shape
    keep_b, keep_k = cfg.bias_axes[:2]
    dbias = dbias.sum(
      axis=tuple(a for a, keep in ((0, keep_b), (1, keep_k)) if not keep), keepdims=True
    )
    dbias = dbias.astype(dense_bias.dtype)
  if dfn is not None:
    dfn = jax.tree.map(lambda g: g.sum((0, 1)), dfn)
  dsinks = None
  if sinks_KG is not None:
    valid = jnp.arange(lse.shape[-1]) < cfg.T
    dsinks = -jnp.where(valid, jnp.exp(sinks_KG[None, :, :, None] - lse) * delta, 0.0)
    dsinks = dsinks.sum((0, 3)).astype(sinks_KG.dtype)
  return dq, dk, dv, dbias, dfn, dsinks, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
