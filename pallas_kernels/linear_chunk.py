"""Chunked linear attention for TPU and GPU as Pallas kernels, forward and backward.

Dimension key: B batch, T length (Tp padded to whole chunks), N heads, H key dim, Hv value
dim, C chunk size, nC = Tp / C chunks, Hg = 1 (one log-gate per token and head) or H (one per
key dimension).

The recurrence, per (example, head), with log-gates g_t <= 0 (α_t = e^(g_t))::

    S_t = diag(α_t) S_(t−1) + k_t v_tᵀ        o_t = S_tᵀ q_t        S: [H, Hv], float32

It covers the scalar-decay rows of catalog family (g) — plain linear attention (g = 0),
a fixed per-head decay (Lightning / retention), a data-dependent decay per token (simple
GLA) — with Hg = 1, and per-dimension gates (GLA, HGRN-2) with Hg = H. Feature maps, the
scale, the normaliser column and GQA head repetition are applied by the caller
(``attn_jax.attention.linear``); the kernels see prepared float32 q, k, v. Packed documents:
``reset [B, T]`` zeroes the state before a token (a document start).

Chunked form, per chunk with b the cumulative log-gate inside the chunk (b_t = Σ_(r<=t) g_r)
and S_0 the entering state::

    o_t   = Σ_(s<=t, same doc) (Σ_h q_th k_sh e^(b_th − b_sh)) v_s  +  (q_t ⊙ ε_t)ᵀ S_0
    S_C   = ε_C ⊙ S_0  +  Σ_(s in the last doc) (k_s ⊙ e^(b_C − b_s)) v_sᵀ

with ε_t = e^(b_t) while no document started inside the chunk before t (else 0). Every
exponent is a difference b_t − b_s with s <= t or b alone, so it is <= 0: strong gates
(g ≈ −10 per token) stay finite. The decays (ε, e^(b_C − b), the chunk decay) and the
same-document counters are computed by the wrapper in plain jnp; the kernels do the C×C
and C×H×Hv work:

  * Scalar gates (Hg = 1): A = (Q Kᵀ) ⊙ D with D_ts = e^(b_t − b_s) (s <= t, same doc), a
    [C, C] tile; three matmuls per chunk (Q Kᵀ, A V, Q S_0) plus the state update Kᵀ V.
  * Per-dimension gates (Hg = H): A_ts needs e^(b_th − b_sh) per dimension, which does not
    factor into a matmul without exponents of both signs. The kernel builds A column by
    column (C steps of [C, H] element-wise work: exact and stable) and then runs the same
    matmuls. That is O(C²·H) VPU work per chunk against the O(C²·H) MXU work of the scalar
    case, so per-dimension gates favour small chunks (16–32).

Kernels:
  * TPU (Mosaic): grid ``(B, N, nC)``, the chunk axis sequential ("arbitrary"); the state is
    a float32 VMEM scratch [H, Hv] carried across chunks; each step reads one chunk of q, k,
    v ([C, H] tiles, H the full head dim), writes its output tile and the state entering
    the chunk (kept for the backward), and the last step writes the final state.
  * GPU (Triton): grid ``(B, N)``, one program per (example, head) loops over its chunks
    with ``lax.fori_loop`` (the state in registers); tiles are loaded with ``pl.ds`` from
    the whole-sequence refs. H and Hv are zero-padded to powers of two >= 16 (exact).
  * Backward (``jax.custom_vjp``; residuals q, k, v, g, the per-chunk entering states and
    the final state): one kernel walks the chunks in reverse carrying dS (the gradient of
    the state leaving the chunk) and writes dq, dk, dv per chunk and d initial_state::

        dP = (dO Vᵀ) ⊙ D,  dQ = dP K + ε ⊙ (dO S_0ᵀ),  dK = dPᵀ Q + e^(b_C − b) ⊙ (V dSᵀ)
        dV = Aᵀ dO + (K ⊙ e^(b_C − b)) dS,            dS_0 = (Q ⊙ ε)ᵀ dO + ε_C ⊙ dS

    (per-dimension gates: the column loop also accumulates dQ and dK of the intra-chunk
    term). The gate gradient needs no kernel: with G_t = Σ_(r<=t) g_r over the whole
    sequence every term depends on G only through differences e^(G_t − G_s) (and e^(G_t)
    with S_0), so ∂L/∂G_t = q_t ⊙ dq_t − k_t ⊙ dk_t (+ S_T ⊙ dS_T summed over Hv at the
    last token), and dg is its reverse cumulative sum (zero at a document start, where the
    gate multiplies a zeroed state).

Costs per (example, head), scalar gates, float32 (4 bytes), H = Hv:
  * FLOPs: forward 2·T·C·H (Q Kᵀ, causal half not skipped) + 2·T·C·Hv (A V) + 2·T·H·Hv
    (Q S_0) + 2·T·H·Hv (Kᵀ V) = 4·T·H·(C + H); backward about 2.5× that (Q Kᵀ and dO Vᵀ
    recomputed, dQ, dK, dV each a C-matmul and an H-matmul, dS_0). Linear in T: the time
    per token is flat at fixed C and H.
  * HBM bytes: forward reads q, k, v and writes o (4·T·H·4) plus the per-chunk states
    (T/C·H·Hv·4; with C = H = 64 as much as one more [T, H] array); backward reads q, k, v,
    dO, states and writes dq, dk, dv: about 2.5× the forward.
  * Arithmetic intensity ≈ 4·T·H·(C + H) / (20·T·H) = (C + H)/5 FLOP/byte: 26 for
    C = H = 64, so in float32 the kernels sit near the memory roofline of an H100
    (3.35 TB/s, ~67 TF/s float32 non-tensor) or a v5e TPU (0.82 TB/s): at B·N = 64,
    T = 32768, H = 64 the forward moves ~0.67 GB (≈0.2 ms on an H100) and does 17 GFLOP.
  * Per-dimension gates add C²·H·(≈6) element-wise operations per chunk (≈1.5 GFLOP-like
    VPU ops per (B·N = 1, T = 32768, C = 32, H = 64)), usually the bottleneck.

Limitations: float32 operands (the caller prepares q, k, v in float32); first-order reverse
mode only (custom_vjp); the delta rule's chunked solve is not built here (``attn_jax``'s
delta rule runs its pure-JAX chunked form).
"""

import dataclasses
import functools
import typing
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

BACKENDS = ("tpu", "gpu")
MIN_GPU_TILE = 16  # Triton's smallest tl.dot side


@dataclasses.dataclass(frozen=True)
class _Cfg:
  backend: str
  C: int
  nC: int
  per_dim: bool
  interpret: Any
  num_warps: int = 4
  num_stages: int = 1


# ---------------------------------------------------------------------------------------
# Chunk math shared by both backends (values, not refs).
# ---------------------------------------------------------------------------------------


def _mm(cfg, a, b, ta=False, tb=False):
  if cfg.backend == "gpu":
    return pl_triton.dot(a, b, trans_a=ta, trans_b=tb, precision=lax.Precision.HIGHEST)
  dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
  return lax.dot_general(
    a, b, dims, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32
  )


def _iota(shape, axis):
  return lax.broadcasted_iota(jnp.int32, shape, axis)


def _scalar_decay(cfg, b_col, b_row, d_col, d_row):
  """D [C, C]: e^(b_t − b_s) for s <= t in the same document, else 0."""
  C = cfg.C
  ok = (_iota((C, C), 0) >= _iota((C, C), 1)) & (d_col == d_row)
  return jnp.exp(jnp.where(ok, b_col - b_row, -jnp.inf))


def _per_dim_pairs(cfg, q, k, b, d_col, dp=None):
  """A [C, C], A_ts = Σ_h q_th k_sh e^(b_th − b_sh) (s <= t, same document), built column
  by column; with ``dp`` [C, C] (dO Vᵀ) also the intra-chunk dQ and dK [C, H]."""
  C, H = q.shape
  rows, cols = _iota((C, 1), 0), _iota((1, C), 1)

  def body(s, carry):
    sel = rows == s
    k_s = jnp.sum(jnp.where(sel, k, 0.0), axis=0, keepdims=True)  # [1, H]
    b_s = jnp.sum(jnp.where(sel, b, 0.0), axis=0, keepdims=True)
    d_s = jnp.sum(jnp.where(sel, d_col, 0.0), axis=0, keepdims=True)  # [1, 1]
    ok = (rows >= s) & (d_col == d_s)  # [C, 1]
    e = jnp.exp(jnp.where(ok, b - b_s, -jnp.inf))  # [C, H], exponents <= 0
    qe = q * e
    a = jnp.where(cols == s, jnp.sum(qe * k_s, axis=1, keepdims=True), carry[0])
    if dp is None:
      return (a,)
    dp_s = jnp.sum(jnp.where(cols == s, dp, 0.0), axis=1, keepdims=True)  # [C, 1]
    dq = carry[1] + dp_s * e * k_s
    dk = jnp.where(sel, jnp.sum(dp_s * qe, axis=0, keepdims=True), carry[2])
    return a, dq, dk

  zero = jnp.zeros((C, H), jnp.float32)
  init = (jnp.zeros((C, C), jnp.float32),) + (() if dp is None else (zero, zero))
  return lax.fori_loop(jnp.int32(0), jnp.int32(C), body, init)


def _fwd_chunk(cfg, S, q, k, v, b, b_row, d_col, d_row, qdec, kdec, cdec):
  if cfg.per_dim:
    (a,) = _per_dim_pairs(cfg, q, k, b, d_col)
  else:
    a = _mm(cfg, q, k, tb=True) * _scalar_decay(cfg, b, b_row, d_col, d_row)
  o = _mm(cfg, a, v) + _mm(cfg, q * qdec, S)
  return o, S * cdec + _mm(cfg, k * kdec, v, ta=True)


def _bwd_chunk(cfg, dS, S, q, k, v, do, b, b_row, d_col, d_row, qdec, kdec, cdec):
  dp = _mm(cfg, do, v, tb=True)
  if cfg.per_dim:
    a, dq, dk = _per_dim_pairs(cfg, q, k, b, d_col, dp)
  else:
    D = _scalar_decay(cfg, b, b_row, d_col, d_row)
    a, dp = _mm(cfg, q, k, tb=True) * D, dp * D
    dq, dk = _mm(cfg, dp, k), _mm(cfg, dp, q, ta=True)
  dv = _mm(cfg, a, do, ta=True) + _mm(cfg, k * kdec, dS)
  dq = dq + qdec * _mm(cfg, do, S, tb=True)
  dk = dk + kdec * _mm(cfg, v, dS, tb=True)
  return dq, dk, dv, _mm(cfg, q * qdec, do, ta=True) + cdec * dS


# ---------------------------------------------------------------------------------------
# Wrapper-side preparation: decays and document counters (plain jnp).
# ---------------------------------------------------------------------------------------


def _decays(cfg, g, d):
  """g [B, N, Tp, Hg] log-gates, d [B, Tp] float document counters → the operands."""
  B, N, Tp, Hg = g.shape
  C, nC = cfg.C, cfg.nC
  b = jnp.cumsum(g.reshape(B, N, nC, C, Hg), axis=3)  # in-chunk cumulative
  dc = d.reshape(B, nC, C)
  d_prev = jnp.concatenate([jnp.zeros((B, 1), d.dtype), d[:, :-1]], axis=1)
  d_in = d_prev.reshape(B, nC, C)[:, :, :1]  # counter of the entering state
  d_last = dc[:, :, -1:]
  carry = (dc == d_in)[:, None, :, :, None]  # S_0 reaches t
  to_end = (dc == d_last)[:, None, :, :, None]  # s reaches the chunk's final state
  b_last = b[:, :, :, -1:, :]
  keep = (d_last == d_in)[:, None, :, :, None]  # [B, 1, nC, 1, 1]
  ops = dict(
    b=b.reshape(B, N, Tp, Hg),
    b_row=b[..., 0].reshape(B, N, nC, 1, C),
    d_col=d.reshape(B, Tp, 1),
    d_row=dc.reshape(B, nC, 1, C),
    qdec=jnp.where(carry, jnp.exp(b), 0.0).reshape(B, N, Tp, Hg),
    kdec=jnp.where(to_end, jnp.exp(b_last - b), 0.0).reshape(B, N, Tp, Hg),
    cdec=jnp.where(keep, jnp.exp(b_last), 0.0).reshape(B, N, nC, Hg, 1),
  )
  return ops


_OPS = ("b", "b_row", "d_col", "d_row", "qdec", "kdec", "cdec")


# ---------------------------------------------------------------------------------------
# TPU kernels.
# ---------------------------------------------------------------------------------------


def _tpu_specs(cfg, H, Hv, Hg, reverse):
  sq = pl.squeezed
  nC = cfg.nC
  ci = (lambda c: nC - 1 - c) if reverse else (lambda c: c)
  tok = lambda w: pl.BlockSpec((sq, sq, cfg.C, w), lambda b, n, c: (b, n, ci(c), 0))  # noqa: E731
  return {
    "q": tok(H),
    "k": tok(H),
    "v": tok(Hv),
    "do": tok(Hv),
    "b": tok(Hg),
    "qdec": tok(Hg),
    "kdec": tok(Hg),
    "b_row": pl.BlockSpec((sq, sq, sq, 1, cfg.C), lambda b, n, c: (b, n, ci(c), 0, 0)),
    "d_col": pl.BlockSpec((sq, cfg.C, 1), lambda b, n, c: (b, ci(c), 0)),
    "d_row": pl.BlockSpec((sq, sq, 1, cfg.C), lambda b, n, c: (b, ci(c), 0, 0)),
    "cdec": pl.BlockSpec((sq, sq, sq, Hg, 1), lambda b, n, c: (b, n, ci(c), 0, 0)),
    "state": pl.BlockSpec((sq, sq, H, Hv), lambda b, n, c: (b, n, 0, 0)),
    "states": pl.BlockSpec((sq, sq, sq, H, Hv), lambda b, n, c: (b, n, ci(c), 0, 0)),
    "dq": tok(H),
    "dk": tok(H),
    "dv": tok(Hv),
  }


def _tpu_params():
  from jax.experimental.pallas import tpu as pltpu

  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _tpu_fwd_kernel(cfg, q_ref, k_ref, v_ref, *refs):
  ops = dict(zip(_OPS, refs[:7], strict=True))
  s0_ref, o_ref, states_ref, sT_ref, S_scr = refs[7:]
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _():
    S_scr[...] = s0_ref[...]

  S = S_scr[...]
  states_ref[...] = S
  o, S = _fwd_chunk(cfg, S, q_ref[...], k_ref[...], v_ref[...], *(ops[n][...] for n in _OPS))
  o_ref[...] = o.astype(o_ref.dtype)
  S_scr[...] = S

  @pl.when(c == cfg.nC - 1)
  def _():
    sT_ref[...] = S


def _tpu_bwd_kernel(cfg, q_ref, k_ref, v_ref, do_ref, *refs):
  ops = dict(zip(_OPS, refs[:7], strict=True))
  states_ref, dsT_ref, dq_ref, dk_ref, dv_ref, ds0_ref, dS_scr = refs[7:]
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _():
    dS_scr[...] = dsT_ref[...]

  vals = (q_ref[...], k_ref[...], v_ref[...], do_ref[...])
  dq, dk, dv, dS = _bwd_chunk(
    cfg, dS_scr[...], states_ref[...], *vals, *(ops[n][...] for n in _OPS)
  )
  dq_ref[...], dk_ref[...], dv_ref[...] = dq, dk, dv
  dS_scr[...] = dS

  @pl.when(c == cfg.nC - 1)
  def _():
    ds0_ref[...] = dS


def _tpu_forward(cfg, q, k, v, ops, s0):
  from jax.experimental.pallas import tpu as pltpu

  B, N, Tp, H = q.shape
  Hv, Hg = v.shape[-1], ops["b"].shape[-1]
  sp = _tpu_specs(cfg, H, Hv, Hg, reverse=False)
  f32 = jnp.float32
  return pl.pallas_call(
    functools.partial(_tpu_fwd_kernel, cfg),
    grid=(B, N, cfg.nC),
    in_specs=[sp["q"], sp["k"], sp["v"], *(sp[n] for n in _OPS), sp["state"]],
    out_specs=[sp["v"], sp["states"], sp["state"]],
    out_shape=[
      jax.ShapeDtypeStruct((B, N, Tp, Hv), f32),
      jax.ShapeDtypeStruct((B, N, cfg.nC, H, Hv), f32),
      jax.ShapeDtypeStruct((B, N, H, Hv), f32),
    ],
    scratch_shapes=[pltpu.VMEM((H, Hv), f32)],
    compiler_params=_tpu_params(),
    interpret=cfg.interpret,
    name="linear_chunk_fwd",
  )(q, k, v, *(ops[n] for n in _OPS), s0)


def _tpu_backward(cfg, q, k, v, do, ops, states, dsT):
  from jax.experimental.pallas import tpu as pltpu

  B, N, Tp, H = q.shape
  Hv, Hg = v.shape[-1], ops["b"].shape[-1]
  sp = _tpu_specs(cfg, H, Hv, Hg, reverse=True)
  f32 = jnp.float32
  return pl.pallas_call(
    functools.partial(_tpu_bwd_kernel, cfg),
    grid=(B, N, cfg.nC),
    in_specs=[
      sp["q"],
      sp["k"],
      sp["v"],
      sp["do"],
      *(sp[n] for n in _OPS),
      sp["states"],
      sp["state"],
    ],
    out_specs=[sp["dq"], sp["dk"], sp["dv"], sp["state"]],
    out_shape=[
      jax.ShapeDtypeStruct((B, N, Tp, H), f32),
      jax.ShapeDtypeStruct((B, N, Tp, H), f32),
      jax.ShapeDtypeStruct((B, N, Tp, Hv), f32),
      jax.ShapeDtypeStruct((B, N, H, Hv), f32),
    ],
    scratch_shapes=[pltpu.VMEM((H, Hv), f32)],
    compiler_params=_tpu_params(),
    interpret=cfg.interpret,
    name="linear_chunk_bwd",
  )(q, k, v, do, *(ops[n] for n in _OPS), states, dsT)


# ---------------------------------------------------------------------------------------
# GPU kernels.
# ---------------------------------------------------------------------------------------


def _gpu_chunk_ops(cfg, ops, c):
  rows = pl.ds(c * cfg.C, cfg.C)
  return (
    ops["b"][rows, :],
    ops["b_row"][c],
    ops["d_col"][rows, :],
    ops["d_row"][c],
    ops["qdec"][rows, :],
    ops["kdec"][rows, :],
    ops["cdec"][c],
  )


def _gpu_fwd_kernel(cfg, q_ref, k_ref, v_ref, *refs):
  ops = dict(zip(_OPS, refs[:7], strict=True))
  s0_ref, o_ref, states_ref, sT_ref = refs[7:]

  def body(c, S):
    rows = pl.ds(c * cfg.C, cfg.C)
    states_ref[c] = S
    o, S = _fwd_chunk(
      cfg, S, q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], *_gpu_chunk_ops(cfg, ops, c)
    )
    o_ref[rows, :] = o.astype(o_ref.dtype)
    return S

  sT_ref[...] = lax.fori_loop(jnp.int32(0), jnp.int32(cfg.nC), body, s0_ref[...])


def _gpu_bwd_kernel(cfg, q_ref, k_ref, v_ref, do_ref, *refs):
  ops = dict(zip(_OPS, refs[:7], strict=True))
  states_ref, dsT_ref, dq_ref, dk_ref, dv_ref, ds0_ref = refs[7:]

  def body(i, dS):
    c = cfg.nC - 1 - i
    rows = pl.ds(c * cfg.C, cfg.C)
    vals = (q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :])
    dq, dk, dv, dS = _bwd_chunk(cfg, dS, states_ref[c], *vals, *_gpu_chunk_ops(cfg, ops, c))
    dq_ref[rows, :], dk_ref[rows, :], dv_ref[rows, :] = dq, dk, dv
    return dS

  ds0_ref[...] = lax.fori_loop(jnp.int32(0), jnp.int32(cfg.nC), body, dsT_ref[...])


def _gpu_call(cfg, kernel, args, out_shapes, name, shared=(5, 6)):

  sq = pl.squeezed

  def spec(shape, batch_only=False):
    if batch_only:  # the document counters [B, ...], shared by the heads
      return pl.BlockSpec((sq,) + shape[1:], lambda b, n: (b,) + (0,) * (len(shape) - 1))
    return pl.BlockSpec((sq, sq) + shape[2:], lambda b, n: (b, n) + (0,) * (len(shape) - 2))

  B, N = args[0].shape[:2]
  return pl.pallas_call(
    functools.partial(kernel, cfg),
    grid=(B, N),
    in_specs=[spec(a.shape, i in shared) for i, a in enumerate(args)],
    out_specs=[spec(s.shape) for s in out_shapes],
    out_shape=out_shapes,
    compiler_params=pl_triton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    interpret=cfg.interpret,
    name=name,
  )(*args)


def _gpu_forward(cfg, q, k, v, ops, s0):
  B, N, Tp, H = q.shape
  Hv, f32 = v.shape[-1], jnp.float32
  args = (q, k, v, *(ops[n] for n in _OPS), s0)
  outs = (
    jax.ShapeDtypeStruct((B, N, Tp, Hv), f32),
    jax.ShapeDtypeStruct((B, N, cfg.nC, H, Hv), f32),
    jax.ShapeDtypeStruct((B, N, H, Hv), f32),
  )
  return _gpu_call(cfg, _gpu_fwd_kernel, args, outs, "linear_chunk_fwd")


def _gpu_backward(cfg, q, k, v, do, ops, states, dsT):
  B, N, Tp, H = q.shape
  Hv, f32 = v.shape[-1], jnp.float32
  args = (q, k, v, do, *(ops[n] for n in _OPS), states, dsT)
  outs = (
    jax.ShapeDtypeStruct((B, N, Tp, H), f32),
    jax.ShapeDtypeStruct((B, N, Tp, H), f32),
    jax.ShapeDtypeStruct((B, N, Tp, Hv), f32),
    jax.ShapeDtypeStruct((B, N, H, Hv), f32),
  )
  return _gpu_call(cfg, _gpu_bwd_kernel, args, outs, "linear_chunk_bwd", shared=(6, 7))


# ---------------------------------------------------------------------------------------
# custom_vjp core and the public wrapper.
# ---------------------------------------------------------------------------------------


def _forward(cfg, q, k, v, g, d, s0):
  ops = _decays(cfg, g, d)
  fwd = _gpu_forward if cfg.backend == "gpu" else _tpu_forward
  return fwd(cfg, q, k, v, ops, s0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg, q, k, v, g, d, s0):
  out, _, sT = _forward(cfg, q, k, v, g, d, s0)
  return out, sT


def _core_fwd(cfg, q, k, v, g, d, s0):
  out, states, sT = _forward(cfg, q, k, v, g, d, s0)
  return (out, sT), (q, k, v, g, d, states, sT)


def _core_bwd(cfg, res, cts):
  q, k, v, g, d, states, sT = res
  do, dsT = cts
  ops = _decays(cfg, g, d)
  bwd = _gpu_backward if cfg.backend == "gpu" else _tpu_backward
  dq, dk, dv, ds0 = bwd(cfg, q, k, v, do.astype(jnp.float32), ops, states, dsT)
  # ∂L/∂G_t = q_t ⊙ dq_t − k_t ⊙ dk_t (+ S_T ⊙ dS_T at the last token); dg = reverse cumsum.
  dG = q * dq - k * dk
  fin = jnp.sum(sT * dsT, axis=-1)  # [B, N, H]
  if not cfg.per_dim:
    dG, fin = jnp.sum(dG, axis=-1, keepdims=True), jnp.sum(fin, axis=-1, keepdims=True)
  dG = dG.at[:, :, -1, :].add(fin)
  dg = jnp.flip(jnp.cumsum(jnp.flip(dG, axis=2), axis=2), axis=2)
  d_prev = jnp.concatenate([d[:, :1], d[:, :-1]], axis=1)
  dg = jnp.where((d != d_prev)[:, None, :, None], 0.0, dg)
  return dq, dk, dv, dg, jnp.zeros_like(d), ds0


_core.defvjp(_core_fwd, _core_bwd)


def _pow2(n: int) -> int:
  return max(MIN_GPU_TILE, 1 << (n - 1).bit_length())


def check_chunk_size(chunk_size, backend: str) -> int:
  """The chunk size C a backend takes (ValueError otherwise): TPU a multiple of 8 (sublane
  tiles), GPU a power of two >= 16 (Triton dot tiles)."""
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be an int >= 1; got {chunk_size!r}")
  if backend == "tpu" and chunk_size % 8:
    raise ValueError(f"the TPU kernel needs chunk_size a multiple of 8; got {chunk_size}")
  if backend == "gpu" and (chunk_size < MIN_GPU_TILE or chunk_size & (chunk_size - 1)):
    raise ValueError(f"the GPU kernel needs chunk_size a power of two >= 16; got {chunk_size}")
  return chunk_size


def chunked_linear_attention(
  q,
  k,
  v,
  log_decay,
  reset,
  initial_state,
  *,
  chunk_size: int = 64,
  backend: str = "tpu",
  interpret: Any = False,
  num_warps: int = 4,
  num_stages: int = 1,
):
  """The gated linear recurrence of the module docstring on the Pallas kernels.

  Args:
    q, k: ``[B, T, N, H]`` float32 (feature map and scale already applied).
    v: ``[B, T, N, Hv]`` float32.
    log_decay: ``[B, T, N]`` (scalar gates) or ``[B, T, N, H]`` (per key dimension), <= 0.
    reset: ``[B, T]`` bool, True where a document starts (the state is zeroed first).
    initial_state: ``[B, N, H, Hv]`` float32.
    chunk_size: C (TPU: a multiple of 8; GPU: a power of two >= 16).
    backend: "tpu" (Mosaic) or "gpu" (Triton).
    interpret: False on hardware; True (or ``pltpu.InterpretParams()`` for the TPU kernel)
      runs the kernels in Pallas interpret mode on any host.
    num_warps, num_stages: Triton launch parameters (GPU only).

  Returns:
    ``(out [B, T, N, Hv], final_state [B, N, H, Hv])``, float32; differentiable in q, k, v,
    log_decay and initial_state (first-order reverse mode).
  """
  lay = layout(q, k, v, reset, initial_state, chunk_size, backend)
  B, T, N, H = q.shape
  g = jnp.asarray(log_decay, jnp.float32)
  per_dim = g.ndim == 4
  if g.shape not in ((B, T, N), (B, T, N, H)):
    raise ValueError(f"log_decay must be [B, T, N] or [B, T, N, H]; got {g.shape}")
  cfg = _Cfg(backend, lay.C, lay.nC, per_dim, interpret, num_warps, num_stages)
  gh = lay.heads_first(g if per_dim else g[..., None], lay.Hp if per_dim else 1)
  out, sT = _core(cfg, *lay.qkv, gh, lay.d, lay.s0)
  return lay.unpad(out, sT)


class Layout(typing.NamedTuple):
  """Checked sizes and the kernel layout shared by the chunked wrappers (this module's and
  ``pallas_kernels.delta_chunk``'s)."""

  C: int
  nC: int
  Hp: int  # head dims as the kernels see them (GPU: powers of two >= 16)
  Hvp: int
  heads_first: typing.Callable  # [B, T, N, w] -> [B, N, Tp, width] float32, zero-padded
  qkv: tuple  # q, k, v in that layout
  d: jax.Array  # [B, Tp] float32 document counters (cumulative resets)
  s0: jax.Array  # [B, N, Hp, Hvp] float32
  unpad: typing.Callable  # (out, final state) back to [B, T, N, Hv], [B, N, H, Hv]


def layout(q, k, v, reset, initial_state, chunk_size, backend) -> Layout:
  """Validates q, k, v, reset and the initial state, and lays them out for the kernels."""
  C = check_chunk_size(chunk_size, backend)
  if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
    raise ValueError(
      f"q, k must be [B, T, N, H] and v [B, T, N, Hv]; got {q.shape}, {k.shape}, {v.shape}"
    )
  B, T, N, H = q.shape
  Hv = v.shape[-1]
  if reset.shape != (B, T):
    raise ValueError(f"reset must be [B, T] = {(B, T)}; got {reset.shape}")
  if initial_state.shape != (B, N, H, Hv):
    raise ValueError(f"initial_state must be [B, N, H, Hv]; got {initial_state.shape}")
  nC = -(-T // C)
  Tp = nC * C
  Hp, Hvp = (_pow2(H), _pow2(Hv)) if backend == "gpu" else (H, Hv)
  f32 = jnp.float32

  def heads_first(x, width):
    x = jnp.swapaxes(x.astype(f32), 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, Tp - T), (0, width - x.shape[-1])))

  def unpad(out, sT):
    return jnp.swapaxes(out[:, :, :T, :Hv], 1, 2), sT[:, :, :H, :Hv]

  d = jnp.cumsum(reset.astype(jnp.int32), axis=1).astype(f32)
  d = jnp.pad(d, ((0, 0), (0, Tp - T)), mode="edge")
  s0 = jnp.pad(initial_state.astype(f32), ((0, 0), (0, 0), (0, Hp - H), (0, Hvp - Hv)))
  qkv = (heads_first(q, Hp), heads_first(k, Hp), heads_first(v, Hvp))
  return Layout(C, nC, Hp, Hvp, heads_first, qkv, d, s0, unpad)
