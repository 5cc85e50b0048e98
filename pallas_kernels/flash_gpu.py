"""Flash attention for GPUs as a Pallas kernel (Triton lowering), with block skipping.

Dimension key: B batch, T query length, S key/value length, N query heads, K kv heads,
G = N // K query heads per kv head, H q/k head dim, Hv value head dim; Tp / Sp lengths
padded to whole blocks, Hp / Hvp head dims padded to powers of two (>= 16), nQ / nK block
counts, M longest block list; bq / bk tile sizes.

How it works:
  * Forward: grid (nQ, B, N), one program per (q block, example, query head). It keeps the
    q tile [bq, Hp] in registers and runs ``lax.fori_loop(0, count, ...)`` over the
    compacted list of non-empty kv blocks of its q block (``_blocks.forward_lists``, read
    from refs), doing online softmax (running max ``m``, sum ``l``, fp32 accumulator).
    Empty kv blocks are neither loaded nor computed. A FULL tile skips the mask arithmetic
    (``lax.cond`` on the list's FULL flag, an ``scf.if`` in Triton); only PARTIAL tiles
    evaluate ``mask_fn`` and the ``kv_idx < S`` test of the ragged last kv block. When
    the (static) block map has no PARTIAL tile, or no FULL tile, the branch is dropped.
  * GQA/MQA: query head n reads kv head n // G through the BlockSpec index maps; k and v
    are never repeated.
  * Backward (``jax.custom_vjp``; residuals q, k, v, out, lse): ``delta = rowsum(dO·O) -
    dlse`` is formed in the wrapper (an lse cotangent enters only there). Two kernels
    recompute the probabilities ``p = exp(s - lse)``:
      - dq: grid (nQ, B, N), loops over the same forward lists; also emits the bias
        gradient ``ds`` when a dense bias is given (summed over rows / columns in the
        kernel where the bias broadcasts over T / S, over B / N in the wrapper);
      - dk/dv: grid (nK, B, K), one program per kv block and *kv head*, looping over its G
        query heads and, per head, over the transposed list (``_blocks.transposed_lists``:
        the q blocks that see this kv block). GQA sums happen in registers: no per-query-
        head partials in HBM and no atomics.
    The sink gradient needs no kernel: ``dσ_n = -Σ_{b,t} exp(σ_n - lse)·delta``.
  * Masked logits are -inf; the running max is replaced by 0 while it is -inf, so fully
    masked rows give l = 0 → output 0, lse = -inf (σ with a sink), and zero gradients.
    A sink initialises the running state (m = σ, l = 1), entering only the denominator.
  * Padding: T, S are padded to whole blocks in the wrapper (padded query rows dropped, the
    padded kv tail masked: ``finalize_kinds`` demotes the last kv block to PARTIAL). H and
    Hv are zero-padded to the next power of two >= 16 (Triton tensors must have
    power-of-two sizes); zeros leave q·k and p·v exact.
  * Matmuls: ``triton.dot`` with fp32 accumulation. bf16/fp16 inputs go into the tensor
    cores as they are (p is cast to v's dtype for p·v, ds to q/k's dtype); float32 inputs
    use ``precision=HIGHEST`` (IEEE fp32, not TF32) so results match float32 references.

Lowering: ``pl.pallas_call`` with ``triton.CompilerParams(num_warps=, num_stages=)`` takes
the Triton path when lowering for CUDA (``interpret=True`` runs the same kernel body on any
backend, as the tests do). A Mosaic-GPU version (``plgpu.Mosaic`` ``CompilerParams``) would
differ: it needs explicit SMEM staging and TMA/``emit_pipeline`` copies instead of pointer
loads from the whole-sequence k/v refs, warpgroup-shaped tiles (bq a multiple of 64 per
warpgroup, WGMMA layouts), and the scalar list reads would come from SMEM/GMEM refs with
explicit barriers; the per-tile math (online softmax, cond on FULL) carries over.

Cost model (c = 1/2 for causal, the fraction of tiles computed; 1 without a mask):
  * FLOPs, forward: 4·B·N·T·S·H·c (two matmuls of 2·T·S·H each, H = Hv).
    Backward: dq kernel 3 matmuls (q·kᵀ, dO·vᵀ, ds·k), dk/dv kernel 4 (q·kᵀ, dO·vᵀ, pᵀ·dO,
    dsᵀ·q): 14·B·N·T·S·H·c executed, versus the 10·B·N·T·S·H·c of a fused FA2 backward
    (the price of no atomics). "Model" fwd+bwd FLOPs, the usual 3.5 × forward, 14·BNTSH·c.
  * HBM bytes (bf16, e = 2 bytes; S = T, K = N), compulsory traffic: forward reads q, k, v
    and writes out, 4·B·T·N·H·e, plus lse 4·B·N·T; backward reads q, k, v, out, dO, lse,
    delta and writes dq, dk, dv, 8·B·T·N·H·e + 8·B·N·T (2× forward). Beyond that each q
    block re-reads its k/v blocks (about 2·B·N·T·S·H·e·c / bq, mostly served from L2 at
    these sizes), and the dk/dv kernel re-reads q and dO per kv block likewise.
  * Roofline on an H100 SXM (989 TF/s bf16 dense, 3.35 TB/s HBM), causal, B = 1, N = 8,
    H = 64; time = max(FLOPs / 989e12, compulsory bytes / 3.35e12):

      T = S   fwd FLOPs  fwd bytes  fwd time      fwd+bwd FLOPs (model)  bytes    time
      1024    1.07 GF    4.2 MB     1.26 µs (BW)  3.76 GF                12.7 MB  3.8 µs
      2048    4.29 GF    8.4 MB     4.34 µs       15.0 GF                25.4 MB  15.2 µs
      4096    17.2 GF    16.9 MB    17.4 µs       60.1 GF                50.7 MB  60.8 µs
      8192    68.7 GF    33.8 MB    69.5 µs       241 GF                 101 MB   243 µs
      16384   275 GF     67.6 MB    278 µs        962 GF                 203 MB   973 µs

    Everything but the 1k forward is compute-bound. This kernel executes 18/14 of the
    model fwd+bwd FLOPs (two backward kernels): 4.9 µs at 1k ... 1.25 ms at 16k.
  * Head-dim padding: FLOPs and q/k/v/out bytes scale with the padded dims Hp, Hvp, so
    H = 64 and 128 pay nothing, H = 96 → 128 costs 4/3, H = 80 → 128 1.6×, H < 16 → 16.
  * Real kernels reach a fraction of the roofline: natural exp (not exp2 with the scale
    folded in), IEEE float32 dots for float32 inputs, the branch on FULL, and two backward
    kernels all cost time.

Limitations: first-order reverse mode only (``custom_vjp``; no jvp, no second order). The
dense bias gradient is produced per (example, query head) before the wrapper sums the
broadcast B / N axes: a float32 ``[B, N, Tp, Sp]`` buffer (``[B, N, nQ, Sp]`` when the bias
broadcasts over T, ``[B, N, Tp or nQ, 1]`` over S), i.e. B·N times a bias shared by all.

API:
  ``flash_attention(q, k, v, *, block_kinds, mask_fn, q_operands, kv_operands, bias,
  sinks, scale, softcap, return_lse, block_q, block_kv, interpret, debug_visits)``; see its
  docstring and ``pallas_kernels/_blocks.py`` for the mask contract.
"""

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels import _blocks

DEFAULT_BLOCK_Q = 64
DEFAULT_BLOCK_KV = 64
MIN_BLOCK = 16  # Triton's smallest tl.dot tile side
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _next_pow2(n: int) -> int:
  return 1 << max(int(n) - 1, 0).bit_length()


def _head_pad(h: int) -> int:
  return max(MIN_BLOCK, _next_pow2(h))


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static facts of one call (a custom_vjp nondiff argument)."""

  B: int
  T: int
  S: int
  N: int
  K: int
  bq: int
  bk: int
  nQ: int
  nK: int
  scale: float
  softcap: float | None
  mask_fn: Callable | None
  mask_mode: str  # "none" (no PARTIAL tile), "all" (no FULL tile) or "cond"
  lists_batched: bool
  list_heads: int  # 1 (lists shared by the heads), K (per kv head) or N (per query head)
  bias_full: tuple[bool, bool, bool, bool] | None  # per [B, N, T, S]: full (not 1)
  has_sinks: bool
  num_q_ops: int
  q_ops_heads: int  # 1 (q operands shared by the heads), K or N (per kv / query head)
  num_kv_ops: int
  debug_visits: bool
  interpret: bool
  precision: object
  num_warps: int
  num_stages: int

  @property
  def G(self):
    return self.N // self.K

  @property
  def Tp(self):
    return self.nQ * self.bq

  @property
  def Sp(self):
    return self.nK * self.bk


# ---------------------------------------------------------------------------------------
# Shared tile math (runs inside the kernels).
# ---------------------------------------------------------------------------------------


def _logits(cfg, q_qH, k_kH):
  """(tanh(raw/c) or None, logits after scale and softcap) of a [bq, bk] tile, float32."""
  s = pl_triton.dot(q_qH, k_kH, trans_b=True, precision=cfg.precision) * cfg.scale
  if cfg.softcap is None:
    return None, s
  t = jnp.tanh(s / cfg.softcap)
  return t, cfg.softcap * t


def _bias_tile(cfg, bias_ref, row_slice, col_slice, lead=()):
  """The [bq or 1, bk or 1] float32 slice of the bias block for this tile."""
  _, _, full_t, full_s = cfg.bias_full
  rows = row_slice if full_t else slice(0, 1)
  cols = col_slice if full_s else slice(0, 1)
  return bias_ref[(*lead, rows, cols)].astype(jnp.float32)


def _masked(cfg, s, is_full, q_idx, kv_start, q_vals, kv_vals):
  """Sets invisible logits of a tile to -inf; FULL tiles skip the arithmetic."""

  def apply(s):
    kv_idx = kv_start + lax.broadcasted_iota(jnp.int32, (1, cfg.bk), 1)
    visible = None
    if cfg.Sp != cfg.S:
      visible = kv_idx < cfg.S
    if cfg.mask_fn is not None:
      fn_visible = cfg.mask_fn(q_idx, kv_idx, q_vals, kv_vals)
      visible = fn_visible if visible is None else visible & fn_visible
    if visible is None:
      return s
    return jnp.where(visible, s, -jnp.inf)

  if cfg.mask_mode == "none":
    return s
  if cfg.mask_mode == "all":
    return apply(s)
  return lax.cond(is_full != 0, lambda s: s, apply, s)


def _head_row(cfg, n, heads):
  """Row of query head n in an array with ``heads`` = 1 (shared), K or N head rows."""
  if heads == cfg.N:
    return n
  if heads == 1:
    return 0 * n
  return n // cfg.G


def _list_head(cfg, n):
  """The list head of query head n (lists shared, per kv head or per query head)."""
  return _head_row(cfg, n, cfg.list_heads)


def _safe(x):
  """-inf (an empty running max or lse) → 0 so that exp(-inf - x) = 0, never NaN."""
  return jnp.where(x == -jnp.inf, 0.0, x)


def _named(refs, names):
  """The kernel's refs by name (``names`` in call order; None entries are absent refs)."""
  names = [name for name in names if name]
  assert len(names) == len(refs), (names, len(refs))
  return dict(zip(names, refs, strict=True))


def _operand_names(cfg):
  return [
    "bias" if cfg.bias_full else None,
    "qops" if cfg.num_q_ops else None,
    "kvops" if cfg.num_kv_ops else None,
  ]


# ---------------------------------------------------------------------------------------
# Forward kernel.
# ---------------------------------------------------------------------------------------


def _fwd_kernel(*refs, cfg):
  has_bias = cfg.bias_full is not None
  r = _named(
    refs,
    ["count", "index", "full", "q", "k", "v", "bias" if has_bias else None]
    + ["sinks" if cfg.has_sinks else None]
    + _operand_names(cfg)[1:]
    + ["o", "lse", "visits" if cfg.debug_visits else None],
  )
  count_ref, index_ref, full_ref, q_ref, k_ref, v_ref = (
    r[name] for name in ("count", "index", "full", "q", "k", "v")
  )
  bias_ref, sinks_ref, qops_ref, kvops_ref = (r.get(n) for n in ("bias", "sinks", "qops", "kvops"))
  qi, b, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  bl = b if cfg.lists_batched else 0
  hl = _list_head(cfg, n)
  bq, bk = cfg.bq, cfg.bk

  q_qH = q_ref[...]
  q_idx = qi * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  q_vals = tuple(qops_ref[c, :][:, None] for c in range(cfg.num_q_ops))
  count = count_ref[bl, hl, qi]

  if cfg.has_sinks:
    m0 = jnp.full((bq,), sinks_ref[n], jnp.float32)
    l0 = jnp.ones((bq,), jnp.float32)
  else:
    m0 = jnp.full((bq,), -jnp.inf, jnp.float32)
    l0 = jnp.zeros((bq,), jnp.float32)
  acc0 = jnp.zeros((bq, v_ref.shape[-1]), jnp.float32)

  def body(j, carry):
    acc, m, l, visits = carry
    kb = index_ref[bl, hl, qi, j]
    start = pl.multiple_of(kb * bk, bk)
    cols = pl.ds(start, bk)
    _, s = _logits(cfg, q_qH, k_ref[cols, :])
    if has_bias:
      s = s + _bias_tile(cfg, bias_ref, slice(None), cols)
    kv_vals = tuple(kvops_ref[c, cols][None, :] for c in range(cfg.num_kv_ops))
    s = _masked(cfg, s, full_ref[bl, hl, qi, j], q_idx, start, q_vals, kv_vals)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = _safe(m_new)
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe[:, None])
    v_kV = v_ref[cols, :]
    pv = pl_triton.dot(p.astype(v_kV.dtype), v_kV, precision=cfg.precision)
    return acc * alpha[:, None] + pv, m_new, l * alpha + jnp.sum(p, axis=1), visits + 1

  acc, m, l, visits = lax.fori_loop(jnp.int32(0), count, body, (acc0, m0, l0, jnp.int32(0)))
  empty = l == 0.0
  r["o"][...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(r["o"].dtype)
  r["lse"][...] = jnp.where(empty, -jnp.inf, _safe(m) + jnp.log(jnp.where(empty, 1.0, l)))
  if cfg.debug_visits:
    r["visits"][...] = jnp.full((1,), visits, jnp.int32)


def _forward(cfg, q, k, v, bias, sinks, lists_f, q_ops, kv_ops):
  B, N, G = cfg.B, cfg.N, cfg.G
  Hp, Hvp = q.shape[-1], v.shape[-1]
  bq, Tp, Sp = cfg.bq, cfg.Tp, cfg.Sp
  count, index, full = lists_f
  whole = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)  # noqa: E731
  in_specs = [
    whole(count),
    whole(index),
    whole(full),
    pl.BlockSpec((None, bq, None, Hp), lambda i, b, n: (b, i, n, 0)),
    pl.BlockSpec((None, Sp, None, Hp), lambda i, b, n: (b, 0, n // G, 0)),
    pl.BlockSpec((None, Sp, None, Hvp), lambda i, b, n: (b, 0, n // G, 0)),
  ]
  args = [count, index, full, q, k, v]
  if bias is not None:
    in_specs.append(_bias_spec_rows(cfg))
    args.append(bias)
  if sinks is not None:
    in_specs.append(whole(sinks))
    args.append(sinks)
  if q_ops is not None:
    in_specs.append(_q_ops_spec_rows(cfg))
    args.append(q_ops)
  if kv_ops is not None:
    in_specs.append(pl.BlockSpec((None, cfg.num_kv_ops, Sp), lambda i, b, n: (b, 0, 0)))
    args.append(kv_ops)
  out_shape = [
    jax.ShapeDtypeStruct((B, Tp, N, Hvp), q.dtype),
    jax.ShapeDtypeStruct((B, N, Tp), jnp.float32),
  ]
  out_specs = [
    pl.BlockSpec((None, bq, None, Hvp), lambda i, b, n: (b, i, n, 0)),
    pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i)),
  ]
  if cfg.debug_visits:
    out_shape.append(jax.ShapeDtypeStruct((B, N, cfg.nQ), jnp.int32))
    out_specs.append(pl.BlockSpec((None, None, 1), lambda i, b, n: (b, n, i)))
  outs = pl.pallas_call(
    functools.partial(_fwd_kernel, cfg=cfg),
    grid=(cfg.nQ, B, N),
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    compiler_params=pl_triton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    interpret=cfg.interpret,
    name="flash_gpu_fwd",
  )(*args)
  out, lse = outs[0], outs[1]
  visits = outs[2] if cfg.debug_visits else jnp.zeros((B, N, cfg.nQ), jnp.int32)
  return out, lse, visits


def _q_ops_spec_rows(cfg):
  """q-operand BlockSpec for the grid (q block, b, n): this head's Cq columns, q block rows."""
  C = cfg.num_q_ops
  return pl.BlockSpec((None, C, cfg.bq), lambda i, b, n: (b, _head_row(cfg, n, cfg.q_ops_heads), i))


def _bias_spec_rows(cfg):
  """Bias BlockSpec for the grid (q block, b, n): rows of this q block, every column."""
  fb, fn, ft, fs = cfg.bias_full
  shape = (None, None, cfg.bq if ft else 1, cfg.Sp if fs else 1)
  return pl.BlockSpec(shape, lambda i, b, n: (b if fb else 0, n if fn else 0, i if ft else 0, 0))


# ---------------------------------------------------------------------------------------
# Backward kernels.
# ---------------------------------------------------------------------------------------


def _dq_kernel(*refs, cfg):
  has_bias = cfg.bias_full is not None
  zeroed = has_bias and cfg.bias_full[3]  # the dbias output arrives zeroed (aliased input)
  r = _named(
    refs,
    ["count", "index", "full", "q", "k", "v", "do", "lse", "delta"]
    + _operand_names(cfg)
    + ["dbias_zeros" if zeroed else None, "dq", "dbias" if has_bias else None],
  )
  count_ref, index_ref, full_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = (
    r[name] for name in ("count", "index", "full", "q", "k", "v", "do", "lse", "delta")
  )
  bias_ref, qops_ref, kvops_ref, dbias_ref = (r.get(n) for n in ("bias", "qops", "kvops", "dbias"))
  qi, b, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  bl = b if cfg.lists_batched else 0
  hl = _list_head(cfg, n)
  bq, bk = cfg.bq, cfg.bk
  full_t, full_s = (cfg.bias_full[2], cfg.bias_full[3]) if has_bias else (True, True)

  q_qH = q_ref[...]
  do_qV = do_ref[...]
  lse = _safe(lse_ref[...])[:, None]
  delta = delta_ref[...][:, None]
  q_idx = qi * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  q_vals = tuple(qops_ref[c, :][:, None] for c in range(cfg.num_q_ops))
  count = count_ref[bl, hl, qi]

  def body(j, carry):
    dq, dbias_acc = carry
    kb = index_ref[bl, hl, qi, j]
    start = pl.multiple_of(kb * bk, bk)
    cols = pl.ds(start, bk)
    k_kH = k_ref[cols, :]
    t, s = _logits(cfg, q_qH, k_kH)
    if has_bias:
      s = s + _bias_tile(cfg, bias_ref, slice(None), cols)
    kv_vals = tuple(kvops_ref[c, cols][None, :] for c in range(cfg.num_kv_ops))
    s = _masked(cfg, s, full_ref[bl, hl, qi, j], q_idx, start, q_vals, kv_vals)
    p = jnp.exp(s - lse)
    dp = pl_triton.dot(do_qV, v_ref[cols, :], trans_b=True, precision=cfg.precision)
    ds = p * (dp - delta)  # d loss / d (logit after softcap and bias)
    if has_bias:
      ds_b = ds if full_t else jnp.sum(ds, axis=0, keepdims=True)
      if full_s:
        dbias_ref[:, cols] = ds_b
      else:
        dbias_acc = dbias_acc + jnp.sum(ds_b, axis=1, keepdims=True)
    if t is not None:
      ds = ds * (1.0 - t * t)
    dq = dq + pl_triton.dot(ds.astype(k_kH.dtype), k_kH, precision=cfg.precision)
    return dq, dbias_acc

  dq0 = jnp.zeros((bq, q_ref.shape[-1]), jnp.float32)
  dbias0 = jnp.zeros((bq if full_t else 1, 1), jnp.float32)
  dq, dbias_acc = lax.fori_loop(jnp.int32(0), count, body, (dq0, dbias0))
  r["dq"][...] = (dq * cfg.scale).astype(r["dq"].dtype)
  if has_bias and not full_s:
    dbias_ref[...] = dbias_acc


def _dkdv_kernel(*refs, cfg):
  has_bias = cfg.bias_full is not None
  r = _named(
    refs,
    ["count", "index", "full", "q", "k", "v", "do", "lse", "delta"]
    + _operand_names(cfg)
    + ["dk", "dv"],
  )
  count_ref, index_ref, full_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = (
    r[name] for name in ("count", "index", "full", "q", "k", "v", "do", "lse", "delta")
  )
  bias_ref, qops_ref, kvops_ref = (r.get(n) for n in ("bias", "qops", "kvops"))
  kb, b, kh = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  bl = b if cfg.lists_batched else 0
  bq, bk = cfg.bq, cfg.bk
  bias_heads = has_bias and cfg.bias_full[1]

  k_kH = k_ref[...]
  v_kV = v_ref[...]
  kv_start = kb * bk
  kv_vals = tuple(kvops_ref[c, :][None, :] for c in range(cfg.num_kv_ops))

  def head(g, carry):
    hl = _list_head(cfg, kh * cfg.G + g)

    def body(j, carry):
      dk, dv = carry
      qb = index_ref[bl, hl, kb, j]
      start = pl.multiple_of(qb * bq, bq)
      rows = pl.ds(start, bq)
      q_qH = q_ref[rows, g, :]
      t, s = _logits(cfg, q_qH, k_kH)
      if has_bias:
        lead = (g if bias_heads else 0,)
        s = s + _bias_tile(cfg, bias_ref, rows, slice(None), lead)
      q_idx = start + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
      first = g * cfg.num_q_ops if cfg.q_ops_heads == cfg.N and cfg.N != cfg.K else 0
      q_vals = tuple(qops_ref[first + c, rows][:, None] for c in range(cfg.num_q_ops))
      s = _masked(cfg, s, full_ref[bl, hl, kb, j], q_idx, kv_start, q_vals, kv_vals)
      p = jnp.exp(s - _safe(lse_ref[g, rows])[:, None])
      do_qV = do_ref[rows, g, :]
      dv = dv + pl_triton.dot(p.astype(do_qV.dtype), do_qV, trans_a=True, precision=cfg.precision)
      dp = pl_triton.dot(do_qV, v_kV, trans_b=True, precision=cfg.precision)
      ds = p * (dp - delta_ref[g, rows][:, None])
      if t is not None:
        ds = ds * (1.0 - t * t)
      dk = dk + pl_triton.dot(ds.astype(q_qH.dtype), q_qH, trans_a=True, precision=cfg.precision)
      return dk, dv

    return lax.fori_loop(jnp.int32(0), count_ref[bl, hl, kb], body, carry)

  dk0 = jnp.zeros((bk, k_ref.shape[-1]), jnp.float32)
  dv0 = jnp.zeros((bk, v_ref.shape[-1]), jnp.float32)
  dk, dv = lax.fori_loop(jnp.int32(0), jnp.int32(cfg.G), head, (dk0, dv0))
  r["dk"][...] = (dk * cfg.scale).astype(r["dk"].dtype)
  r["dv"][...] = dv.astype(r["dv"].dtype)


def _backward_kernels(cfg, q, k, v, bias, lists_f, lists_b, q_ops, kv_ops, do, lse, delta):
  B, N, K, G = cfg.B, cfg.N, cfg.K, cfg.G
  Hp, Hvp = q.shape[-1], v.shape[-1]
  bq, bk, Tp, Sp, nQ = cfg.bq, cfg.bk, cfg.Tp, cfg.Sp, cfg.nQ
  params = pl_triton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
  whole = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)  # noqa: E731

  # dq (and the dense bias gradient): grid (q block, b, query head).
  in_specs = [whole(a) for a in lists_f] + [
    pl.BlockSpec((None, bq, None, Hp), lambda i, b, n: (b, i, n, 0)),
    pl.BlockSpec((None, Sp, None, Hp), lambda i, b, n: (b, 0, n // G, 0)),
    pl.BlockSpec((None, Sp, None, Hvp), lambda i, b, n: (b, 0, n // G, 0)),
    pl.BlockSpec((None, bq, None, Hvp), lambda i, b, n: (b, i, n, 0)),
    pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i)),
    pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i)),
  ]
  args = [*lists_f, q, k, v, do, lse, delta]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  out_specs = [pl.BlockSpec((None, bq, None, Hp), lambda i, b, n: (b, i, n, 0))]
  aliases = {}
  if bias is not None:
    in_specs.append(_bias_spec_rows(cfg))
    args.append(bias)
  if q_ops is not None:
    in_specs.append(_q_ops_spec_rows(cfg))
    args.append(q_ops)
  if kv_ops is not None:
    in_specs.append(pl.BlockSpec((None, cfg.num_kv_ops, Sp), lambda i, b, n: (b, 0, 0)))
    args.append(kv_ops)
  if bias is not None:
    _, _, full_t, full_s = cfg.bias_full
    # Per (b, n): rows Tp (or one partial sum per q block), columns Sp (or their sum).
    shape = (B, N, Tp if full_t else nQ, Sp if full_s else 1)
    block = (None, None, bq if full_t else 1, shape[3])
    spec = pl.BlockSpec(block, lambda i, b, n: (b, n, i, 0))
    out_shape.append(jax.ShapeDtypeStruct(shape, jnp.float32))
    out_specs.append(spec)
    if full_s:  # tiles the kernel skips keep these zeros
      aliases = {len(args): 1}
      in_specs.append(spec)
      args.append(jnp.zeros(shape, jnp.float32))
  dq, *dbias = pl.pallas_call(
    functools.partial(_dq_kernel, cfg=cfg),
    grid=(nQ, B, N),
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    input_output_aliases=aliases,
    compiler_params=params,
    interpret=cfg.interpret,
    name="flash_gpu_dq",
  )(*args)

  # dk/dv: grid (kv block, b, kv head); each program loops over its G query heads.
  q5 = q.reshape(B, Tp, K, G, Hp)
  do5 = do.reshape(B, Tp, K, G, Hvp)
  lse4, delta4 = lse.reshape(B, K, G, Tp), delta.reshape(B, K, G, Tp)
  in_specs = [whole(a) for a in lists_b] + [
    pl.BlockSpec((None, Tp, None, G, Hp), lambda j, b, h: (b, 0, h, 0, 0)),
    pl.BlockSpec((None, bk, None, Hp), lambda j, b, h: (b, j, h, 0)),
    pl.BlockSpec((None, bk, None, Hvp), lambda j, b, h: (b, j, h, 0)),
    pl.BlockSpec((None, Tp, None, G, Hvp), lambda j, b, h: (b, 0, h, 0, 0)),
    pl.BlockSpec((None, None, G, Tp), lambda j, b, h: (b, h, 0, 0)),
    pl.BlockSpec((None, None, G, Tp), lambda j, b, h: (b, h, 0, 0)),
  ]
  args = [*lists_b, q5, k, v, do5, lse4, delta4]
  if bias is not None:
    fb, fn, ft, fs = cfg.bias_full
    bB, _, bT, bS = bias.shape
    bias5 = bias.reshape(bB, K if fn else 1, G if fn else 1, bT, bS)
    in_specs.append(
      pl.BlockSpec(
        (None, None, G if fn else 1, bT, bk if fs else 1),
        lambda j, b, h: (b if fb else 0, h if fn else 0, 0, 0, j if fs else 0),
      )
    )
    args.append(bias5)
  if q_ops is not None:
    # Per query head (Hq = N): the G heads of kv head h, rows [h·G·C, (h+1)·G·C).
    rows = cfg.num_q_ops * (G if cfg.q_ops_heads == N and N != K else 1)
    per_kv = cfg.q_ops_heads != 1
    in_specs.append(pl.BlockSpec((None, rows, Tp), lambda j, b, h: (b, h if per_kv else 0, 0)))
    args.append(q_ops)
  if kv_ops is not None:
    in_specs.append(pl.BlockSpec((None, cfg.num_kv_ops, bk), lambda j, b, h: (b, 0, j)))
    args.append(kv_ops)
  dk, dv = pl.pallas_call(
    functools.partial(_dkdv_kernel, cfg=cfg),
    grid=(cfg.nK, B, K),
    in_specs=in_specs,
    out_specs=[
      pl.BlockSpec((None, bk, None, Hp), lambda j, b, h: (b, j, h, 0)),
      pl.BlockSpec((None, bk, None, Hvp), lambda j, b, h: (b, j, h, 0)),
    ],
    out_shape=[
      jax.ShapeDtypeStruct(k.shape, k.dtype),
      jax.ShapeDtypeStruct(v.shape, v.dtype),
    ],
    compiler_params=params,
    interpret=cfg.interpret,
    name="flash_gpu_dkdv",
  )(*args)
  return dq, dk, dv, (dbias[0] if dbias else None)


# ---------------------------------------------------------------------------------------
# custom_vjp on padded operands.
# ---------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, bias, sinks, lists_f, lists_b, q_ops, kv_ops):
  del lists_b
  return _forward(cfg, q, k, v, bias, sinks, lists_f, q_ops, kv_ops)


def _flash_fwd(cfg, q, k, v, bias, sinks, lists_f, lists_b, q_ops, kv_ops):
  out, lse, visits = _forward(cfg, q, k, v, bias, sinks, lists_f, q_ops, kv_ops)
  res = (q, k, v, bias, sinks, lists_f, lists_b, q_ops, kv_ops, out, lse)
  return (out, lse, visits), res


def _flash_bwd(cfg, res, cts):
  q, k, v, bias, sinks, lists_f, lists_b, q_ops, kv_ops, out, lse = res
  do, dlse, _ = cts
  do = do.astype(q.dtype)
  # d loss / d logit_ij = p_ij (dp_ij - delta_i), with the lse cotangent folded into delta.
  delta = jnp.einsum("btnv,btnv->bnt", do.astype(jnp.float32), out.astype(jnp.float32))
  delta = delta - dlse.astype(jnp.float32)
  dq, dk, dv, dbias = _backward_kernels(
    cfg, q, k, v, bias, lists_f, lists_b, q_ops, kv_ops, do, lse, delta
  )
  if bias is not None:
    fb, fn, ft, _ = cfg.bias_full
    axes = tuple(a for a, full in ((0, fb), (1, fn)) if not full)
    axes += () if ft else (2,)
    dbias = jnp.sum(dbias, axis=axes, keepdims=True).astype(bias.dtype)
  dsinks = None
  if sinks is not None:
    # The sink's probability is exp(σ - lse); its "value" is 0, so dσ = -Σ p_σ·delta.
    p_sink = jnp.exp(sinks[None, :, None] - lse)
    dsinks = -jnp.sum(p_sink * delta, axis=(0, 2)).astype(sinks.dtype)
  none3 = (None, None, None)
  return dq, dk, dv, dbias, dsinks, none3, none3, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------------------
# Public entry point.
# ---------------------------------------------------------------------------------------


def _check_block(name, value):
  if value is None:
    return
  if (
    not isinstance(value, (int, np.integer))
    or isinstance(value, bool)
    or value < MIN_BLOCK
    or value & (value - 1)
  ):
    raise ValueError(f"{name} must be a power of two >= {MIN_BLOCK} (Triton tiles); got {value!r}")


def _check_inputs(
  q, k, v, bias, sinks, scale, softcap, mask_fn, block_kinds, q_operands, kv_operands
):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if jnp.ndim(x) != 4:
      raise ValueError(f"{name} must have rank 4 ([B, T|S, heads, dim]); got shape {jnp.shape(x)}")
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in _DTYPES]:
      raise ValueError(f"{name} must be float32, bfloat16 or float16; got {x.dtype}")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
  B, T, N, H = q.shape
  Bk, S, K, Hk = k.shape
  if Bk != B or v.shape[0] != B:
    raise ValueError(f"q, k, v batch sizes differ: {q.shape}, {k.shape}, {v.shape}")
  if Hk != H:
    raise ValueError(f"k head dim {Hk} must equal q head dim {H}")
  if v.shape[1] != S or v.shape[2] != K:
    raise ValueError(f"v shape {v.shape} must match k in [B, S, K] = {(B, S, K)}")
  if K == 0 or N % K:
    raise ValueError(f"q heads N={N} must be a multiple of kv heads K={K}")
  if bias is not None:
    shape = jnp.shape(bias)
    want = (B, N, T, S)
    if len(shape) != 4 or any(d not in (1, w) for d, w in zip(shape, want, strict=True)):
      raise ValueError(
        f"bias shape {shape} must broadcast to [B, N, T, S] = {want} (each 1 or full)"
      )
    if not jnp.issubdtype(bias.dtype, jnp.floating):
      raise ValueError(f"bias must be a float array; got {bias.dtype}")
  if sinks is not None:
    if jnp.shape(sinks) != (N,) or not jnp.issubdtype(sinks.dtype, jnp.floating):
      raise ValueError(
        f"sinks must be a float array of shape [N] = ({N},); got shape {jnp.shape(sinks)}"
      )
  if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale)):
    raise ValueError(f"scale must be a finite Python float; got {scale!r}")
  if softcap is not None and (
    not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap <= 0
  ):
    raise ValueError(f"softcap must be a positive Python float or None; got {softcap!r}")
  if mask_fn is not None and not callable(mask_fn):
    raise ValueError(f"mask_fn must be callable or None; got {type(mask_fn).__name__}")
  if block_kinds is not None and not callable(block_kinds):
    raise ValueError(f"block_kinds must be callable or None; got {type(block_kinds).__name__}")
  for name, ops, want in (
    ("q_operands", q_operands, f"[B, T, Cq] = [{B}, {T}, Cq]"),
    ("kv_operands", kv_operands, f"[B, Ck, S] = [{B}, Ck, {S}]"),
  ):
    if ops is None:
      continue
    shape = jnp.shape(ops)
    if name == "q_operands" and len(shape) == 4:  # per head [B, Hq, T, Cq]
      want = f"[B, Hq, T, Cq] = [{B}, 1 | {K} | {N}, {T}, Cq]"
      ok = shape[0] == B and shape[1] in (1, K, N) and shape[2] == T
    else:
      ok = (
        len(shape) == 3
        and shape[0] == B
        and shape[1 if name == "q_operands" else 2] == (T if name == "q_operands" else S)
      )
    if not ok or not jnp.issubdtype(ops.dtype, jnp.integer):
      raise ValueError(f"{name} must be an int array of shape {want}; got {shape} {ops.dtype}")


def flash_attention(
  q,
  k,
  v,
  *,
  block_kinds=None,
  mask_fn=None,
  q_operands=None,
  kv_operands=None,
  bias=None,
  sinks=None,
  scale=None,
  softcap=None,
  return_lse=False,
  block_q=None,
  block_kv=None,
  interpret=False,
  debug_visits=False,
):
  """Flash attention (Pallas, Triton lowering) with block skipping; differentiable.

  Args:
    q, k, v: ``[B, T, N, H]``, ``[B, S, K, H]``, ``[B, S, K, Hv]``, one float dtype
      (float32, bfloat16, float16); N % K == 0 (query head n reads kv head n // (N // K)).
    block_kinds: ``(block_q, block_kv) -> int8 [nQ, nK], [B, nQ, nK] or [B, Hs, nQ, nK]``
      (Hs = K or N: a list per kv / query head) EMPTY / PARTIAL / FULL per tile
      (``_blocks``), or None: every tile FULL (PARTIAL when ``mask_fn`` is
      given, so a predicate is never ignored).
    mask_fn: ``(q_idx [bq,1], kv_idx [1,bk], q_vals, kv_vals) -> bool [bq, bk]`` evaluated on
      PARTIAL tiles only (absolute indices), or None.
    q_operands, kv_operands: int ``[B, T, Cq]`` / ``[B, Ck, S]`` read by ``mask_fn``, or None;
      q operands may be per head ``[B, Hq, T, Cq]``, Hq = K or N (head n reads row n // G or
      n).
    bias: float ``[bB, bN, bT, bS]``, each dim 1 or full; added after the softcap.
    sinks: float ``[N]`` sink logits (denominator only), or None.
    scale: logit scale, default 1/sqrt(H). softcap: c in c·tanh(s/c), or None.
    return_lse: also return lse ``[B, N, T]`` float32.
    block_q, block_kv: tile sizes, powers of two >= 16 (default 64, 64); clipped to the
      next power of two >= 16 above T / S.
    interpret: run in Pallas interpret mode (any backend).
    debug_visits: also return int32 ``[B, N, nQ]``: kv tiles the forward kernel computed.

  Returns:
    out ``[B, T, N, Hv]`` in q's dtype, then lse (if asked), then visits (if asked).
  """
  _check_inputs(q, k, v, bias, sinks, scale, softcap, mask_fn, block_kinds, q_operands, kv_operands)
  _check_block("block_q", block_q)
  _check_block("block_kv", block_kv)
  B, T, N, H = q.shape
  _, S, K, _ = k.shape
  Hv = v.shape[-1]
  bq = min(block_q or DEFAULT_BLOCK_Q, max(MIN_BLOCK, _next_pow2(T)))
  bk = min(block_kv or DEFAULT_BLOCK_KV, max(MIN_BLOCK, _next_pow2(S)))
  nQ, nK = _blocks.num_blocks(T, bq), _blocks.num_blocks(S, bk)
  Tp, Sp = nQ * bq, nK * bk
  Hp, Hvp = _head_pad(H), _head_pad(Hv)

  if block_kinds is None:
    # No block map: every tile FULL, or PARTIAL when there is a predicate to evaluate.
    kinds = np.full((nQ, nK), _blocks.FULL if mask_fn is None else _blocks.PARTIAL, np.int8)
  else:
    kinds = block_kinds(bq, bk)
    shape = None if kinds is None else jnp.shape(kinds)
    if shape is None or len(shape) not in (2, 3, 4) or shape[-2:] != (nQ, nK):
      raise ValueError(
        f"block_kinds({bq}, {bk}) must return [nQ, nK] = [{nQ}, {nK}], [B, nQ, nK] or "
        f"[B, Hs, nQ, nK]; got {shape}"
      )
  kinds = _blocks.finalize_kinds(kinds, B, S, bk, heads=(N, K))
  if isinstance(kinds, np.ndarray):
    has_partial = bool((kinds == _blocks.PARTIAL).any())
    has_full = bool((kinds == _blocks.FULL).any())
    mask_mode = "cond" if has_partial and has_full else ("all" if has_partial else "none")
  else:
    mask_mode = "cond"
  lists_f = tuple(jnp.asarray(a, jnp.int32) for a in _blocks.forward_lists(kinds))
  lists_b = tuple(jnp.asarray(a, jnp.int32) for a in _blocks.transposed_lists(kinds))

  # Per [B, N, T, S]: does the bias have the full extent there (else it broadcasts)?
  bias_full = None
  if bias is not None:
    bias_full = tuple(bool(d == w) for d, w in zip(bias.shape, (B, N, T, S), strict=True))

  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  cfg = _Config(
    B=B,
    T=T,
    S=S,
    N=N,
    K=K,
    bq=bq,
    bk=bk,
    nQ=nQ,
    nK=nK,
    scale=float(scale) if scale is not None else 1.0 / math.sqrt(H),
    softcap=float(softcap) if softcap is not None else None,
    mask_fn=mask_fn,
    mask_mode=mask_mode,
    lists_batched=lists_f[0].shape[0] > 1,
    list_heads=int(kinds.shape[1]),
    bias_full=bias_full,
    has_sinks=sinks is not None,
    num_q_ops=0 if q_operands is None else q_operands.shape[-1],
    q_ops_heads=1 if q_operands is None or q_operands.ndim == 3 else q_operands.shape[1],
    num_kv_ops=0 if kv_operands is None else kv_operands.shape[1],
    debug_visits=bool(debug_visits),
    interpret=bool(interpret),
    precision=precision,
    num_warps=4 if max(Hp, Hvp) <= 64 else 8,
    num_stages=2,
  )

  q_p = _blocks.pad_axis(_blocks.pad_axis(q, 1, Tp), 3, Hp)
  k_p = _blocks.pad_axis(_blocks.pad_axis(k, 1, Sp), 3, Hp)
  v_p = _blocks.pad_axis(_blocks.pad_axis(v, 1, Sp), 3, Hvp)
  bias_p = None
  if bias is not None:
    bias_p = bias
    if bias_full[2]:
      bias_p = _blocks.pad_axis(bias_p, 2, Tp)
    if bias_full[3]:
      bias_p = _blocks.pad_axis(bias_p, 3, Sp)
  sinks_p = None if sinks is None else sinks.astype(jnp.float32)
  q_ops = None
  if q_operands is not None:  # [B, (Hq,) T, C] → [B, Hq·C, Tp]: head hq's columns at hq·C
    ops = q_operands.astype(jnp.int32)
    ops = ops[:, None] if ops.ndim == 3 else ops
    q_ops = _blocks.pad_axis(jnp.swapaxes(ops, 2, 3), 3, Tp).reshape(B, -1, Tp)
  kv_ops = None
  if kv_operands is not None:
    kv_ops = _blocks.pad_axis(kv_operands.astype(jnp.int32), 2, Sp)

  out_p, lse_p, visits = _flash(
    cfg, q_p, k_p, v_p, bias_p, sinks_p, lists_f, lists_b, q_ops, kv_ops
  )
  out = out_p[:, :T, :, :Hv]
  results = [out]
  if return_lse:
    results.append(lse_p[:, :, :T])
  if debug_visits:
    results.append(visits)
  return tuple(results) if len(results) > 1 else out
