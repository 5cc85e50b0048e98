"""The chunked (gated) delta rule for TPU and GPU as Pallas kernels, forward and backward.

Dimension key: B batch, T length (Tp padded to whole chunks), N heads, H key dim, Hv value
dim, C chunk size, nC = Tp / C chunks.

The recurrence, per (example, head), with β_t (``beta``) and a log decay g_t <= 0::

    S_t = e^(g_t) (I − β_t k_t k_tᵀ) S_(t−1) + β_t k_t v_tᵀ        o_t = S_tᵀ q_t

(g = 0: ``delta_rule``; data-dependent g: ``gated_delta``). The caller
(``attn_jax.attention.delta``) applies the scale, the optional L2 normalisation and GQA
head repetition; the kernels see prepared float32 q, k, v. ``reset [B, T]`` zeroes the
state before a document start.

Chunked form (the WY / UT representation), per chunk with b the cumulative log decay inside
the chunk, Γ_ts = e^(b_t − b_s) (s <= t, same document; 0 otherwise), ε_t = e^(b_t) while
the entering state S_0 still reaches t, and S_0 the entering state::

    A = diag(β) (K Kᵀ ⊙ Γ_strict)         X = (I + A)⁻¹      T̃ = X diag(β)
    W = T̃ (ε ⊙ K)      U = T̃ V − W S_0
    O = (ε ⊙ Q) S_0 + (Q Kᵀ ⊙ Γ) U      S_C = ε_C S_0 + (e^(b_C − b) ⊙ K)ᵀ U

X is computed in the kernel by forward substitution over the C rows of the unit
lower-triangular I + A (row i: X_i = e_i − Σ_(j<i) A_ij X_j; C steps of [C, C] element-wise
work; a Neumann/doubling series would be matmul-only but cancels catastrophically when
keys are correlated). Every exponent is <= 0.

Backward (``jax.custom_vjp``; residuals: the prepared operands and the per-chunk entering
states). One kernel walks the chunks in reverse carrying dS, recomputes A and X, and
differentiates the chunk map above with ``jax.vjp`` *inside the kernel* (its primitives are
matmuls and element-wise ops, which both Pallas backends lower), treating X as an input;
the solve's own gradient is the matrix identity dA = −Xᵀ dX Xᵀ (restricted to the strictly
lower part by A's mask), and dA flows back through A's formula with ``jax.vjp`` again. The
kernel returns gradients for q, k, v and for every prepared operand (β in column and row
form, b in column and row form, ε, e^(b_C − b), ε_C, S_0); the wrapper carries them back to
β and g with ordinary JAX autodiff of the preparation (cumulative sums and exponentials).

Layout and grids as ``pallas_kernels.linear_chunk``: TPU grid ``(B, N, nC)`` with the chunk
axis sequential and the state in a float32 VMEM scratch; GPU grid ``(B, N)``, each program
loops over its chunks (H, Hv zero-padded to powers of two >= 16: exact, zero key
dimensions add nothing to k·k).

Costs per (example, head) and chunk, float32: matmuls K Kᵀ, Q Kᵀ (2·C²·H each), T̃ V,
T̃ (ε ⊙ K), W S_0, (Q Kᵀ ⊙ Γ) U, (ε ⊙ Q) S_0, Kᵀ U (2·C²·Hv, 2·C²·H, 4·C·H·Hv ×3):
≈ 4·C²·(H + Hv) + 12·C·H·Hv FLOPs per chunk, i.e. per token 4·C·(H + Hv) + 12·H·Hv —
linear in T. The substitution adds ≈ 3·C³ element-wise operations per chunk (3·C² per
token: 12k at C = 64, comparable to the matmul FLOPs at H = 64, and on the VPU / CUDA
cores), so C = 32–64 balances it. The backward recomputes the forward of each chunk and
costs ≈ 3× the forward. Bytes: as the linear kernel (q, k, v, o, the per-chunk states; the
backward ≈ 2.5× the forward), so the arithmetic intensity is ≈ (C + 3·H)/5 FLOP/byte in
float32 — near the memory roofline on an H100 or a TPU v5e for H = 64.

Limitations: scalar decays only (per token and head); float32 operands; first-order
reverse mode only.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import linear_chunk as lc

# Per-token operands ([B, N, Tp, w] tiles [C, w]) and per-chunk ones, in kernel order.
_OPS = ("beta_col", "beta_row", "b", "b_row", "qdec", "kdec", "cdec")
_DOCS = ("d_col", "d_row")


def _masked_decay(cfg, b, b_row, d_col, d_row, strict, upper=False):
  C = cfg.C
  rows, cols = lc._iota((C, C), 0), lc._iota((C, C), 1)
  if upper:
    ok = cols > rows
  else:
    ok = rows > cols if strict else rows >= cols
  ok = ok & (d_col == d_row)
  return jnp.exp(jnp.where(ok, (b_row - b) if upper else (b - b_row), -jnp.inf))


def _a_matrix(cfg, k, beta_col, b, b_row, d_col, d_row):
  """A = diag(β) (K Kᵀ ⊙ Γ_strict), [C, C]."""
  return beta_col * lc._mm(cfg, k, k, tb=True) * _masked_decay(cfg, b, b_row, d_col, d_row, True)


def _solve(cfg, k, beta_row, b, b_row, d_col, d_row):
  """X = (I + A)⁻¹ by forward substitution; reads A's rows as columns of Aᵀ."""
  C = cfg.C
  a_t = beta_row * lc._mm(cfg, k, k, tb=True)  # Aᵀ_js = A_sj = β_s (k_s·k_j) e^(b_s − b_j)
  a_t = a_t * _masked_decay(cfg, b, b_row, d_col, d_row, True, upper=True)
  rows, cols = lc._iota((C, 1), 0), lc._iota((1, C), 1)

  def body(i, x):
    a_i = jnp.sum(jnp.where(cols == i, a_t, 0.0), axis=1, keepdims=True)  # [C, 1]: A_i·
    r = jnp.sum(a_i * x, axis=0, keepdims=True)  # [1, C]
    return jnp.where(rows == i, jnp.where(cols == i, 1.0, 0.0) - r, x)

  eye = jnp.where(lc._iota((C, C), 0) == lc._iota((C, C), 1), 1.0, 0.0)
  return lax.fori_loop(jnp.int32(0), jnp.int32(C), body, eye)


def _chunk(cfg, d_col, d_row, S, q, k, v, beta_row, b, b_row, qdec, kdec, cdec, x):
  tb = x * beta_row  # X diag(β)
  w = lc._mm(cfg, tb, k * qdec)
  u = lc._mm(cfg, tb, v) - lc._mm(cfg, w, S)
  qk = lc._mm(cfg, q, k, tb=True) * _masked_decay(cfg, b, b_row, d_col, d_row, False)
  o = lc._mm(cfg, q * qdec, S) + lc._mm(cfg, qk, u)
  return o, S * cdec + lc._mm(cfg, k * kdec, u, ta=True)


def _fwd_chunk(cfg, S, q, k, v, ops, d_col, d_row):
  x = _solve(cfg, k, ops["beta_row"], ops["b"], ops["b_row"], d_col, d_row)
  rest = (ops["beta_row"], ops["b"], ops["b_row"], ops["qdec"], ops["kdec"], ops["cdec"])
  return _chunk(cfg, d_col, d_row, S, q, k, v, *rest, x)


def _bwd_chunk(cfg, dS, S, q, k, v, do, ops, d_col, d_row):
  """(dS_in, dq, dk, dv, {operand: gradient})."""
  beta_row, b, b_row = ops["beta_row"], ops["b"], ops["b_row"]
  x = _solve(cfg, k, beta_row, b, b_row, d_col, d_row)
  primals = (S, q, k, v, beta_row, b, b_row, ops["qdec"], ops["kdec"], ops["cdec"], x)
  _, vjp = jax.vjp(functools.partial(_chunk, cfg, d_col, d_row), *primals)
  dS_in, dq, dk, dv, dbeta_row, db, db_row, dqdec, dkdec, dcdec, dx = vjp((do, dS))
  da = -lc._mm(cfg, lc._mm(cfg, x, dx, ta=True), x, tb=True)  # d(I + A)⁻¹ → dA
  _, vjp_a = jax.vjp(
    lambda k, bc, b, br: _a_matrix(cfg, k, bc, b, br, d_col, d_row), k, ops["beta_col"], b, b_row
  )
  dk2, dbeta_col, db2, db_row2 = vjp_a(da)
  grads = {
    "beta_col": dbeta_col,
    "beta_row": dbeta_row,
    "b": db + db2,
    "b_row": db_row + db_row2,
    "qdec": dqdec,
    "kdec": dkdec,
    "cdec": dcdec,
  }
  return dS_in, dq, dk + dk2, dv, grads


# ---------------------------------------------------------------------------------------
# TPU kernels.
# ---------------------------------------------------------------------------------------


def _tpu_specs(cfg, H, Hv, reverse):
  sp = lc._tpu_specs(cfg, H, Hv, 1, reverse)
  sp["beta_col"] = sp["b"]
  sp["beta_row"] = sp["b_row"]
  return sp


def _tpu_fwd_kernel(cfg, q_ref, k_ref, v_ref, *refs):
  n = len(_OPS)
  ops = {name: r[...] for name, r in zip(_OPS, refs[:n], strict=True)}
  d_col, d_row = refs[n][...], refs[n + 1][...]
  s0_ref, o_ref, states_ref, sT_ref, S_scr = refs[n + 2 :]
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _():
    S_scr[...] = s0_ref[...]

  S = S_scr[...]
  states_ref[...] = S
  o, S = _fwd_chunk(cfg, S, q_ref[...], k_ref[...], v_ref[...], ops, d_col, d_row)
  o_ref[...] = o
  S_scr[...] = S

  @pl.when(c == cfg.nC - 1)
  def _():
    sT_ref[...] = S


def _tpu_bwd_kernel(cfg, q_ref, k_ref, v_ref, do_ref, *refs):
  n = len(_OPS)
  ops = {name: r[...] for name, r in zip(_OPS, refs[:n], strict=True)}
  d_col, d_row = refs[n][...], refs[n + 1][...]
  states_ref, dsT_ref, dq_ref, dk_ref, dv_ref = refs[n + 2 : n + 7]
  dops_refs, (ds0_ref, dS_scr) = refs[n + 7 : 2 * n + 7], refs[2 * n + 7 :]
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _():
    dS_scr[...] = dsT_ref[...]

  vals = (q_ref[...], k_ref[...], v_ref[...], do_ref[...])
  dS, dq, dk, dv, grads = _bwd_chunk(cfg, dS_scr[...], states_ref[...], *vals, ops, d_col, d_row)
  dq_ref[...], dk_ref[...], dv_ref[...] = dq, dk, dv
  for name, r in zip(_OPS, dops_refs, strict=True):
    r[...] = grads[name]
  dS_scr[...] = dS

  @pl.when(c == cfg.nC - 1)
  def _():
    ds0_ref[...] = dS


def _op_shapes(cfg, B, N, Tp):
  C, nC = cfg.C, cfg.nC
  tok, row = (B, N, Tp, 1), (B, N, nC, 1, C)
  return {
    "beta_col": tok,
    "beta_row": row,
    "b": tok,
    "b_row": row,
    "qdec": tok,
    "kdec": tok,
    "cdec": (B, N, nC, 1, 1),
  }


def _tpu_forward(cfg, q, k, v, ops, docs, s0):
  from jax.experimental.pallas import tpu as pltpu

  B, N, Tp, H = q.shape
  Hv, f32 = v.shape[-1], jnp.float32
  sp = _tpu_specs(cfg, H, Hv, reverse=False)
  return pl.pallas_call(
    functools.partial(_tpu_fwd_kernel, cfg),
    grid=(B, N, cfg.nC),
    in_specs=[sp["q"], sp["k"], sp["v"], *(sp[n] for n in _OPS + _DOCS), sp["state"]],
    out_specs=[sp["v"], sp["states"], sp["state"]],
    out_shape=[
      jax.ShapeDtypeStruct((B, N, Tp, Hv), f32),
      jax.ShapeDtypeStruct((B, N, cfg.nC, H, Hv), f32),
      jax.ShapeDtypeStruct((B, N, H, Hv), f32),
    ],
    scratch_shapes=[pltpu.VMEM((H, Hv), f32)],
    compiler_params=lc._tpu_params(),
    interpret=cfg.interpret,
    name="delta_chunk_fwd",
  )(q, k, v, *(ops[n] for n in _OPS), *docs, s0)


def _tpu_backward(cfg, q, k, v, do, ops, docs, states, dsT):
  from jax.experimental.pallas import tpu as pltpu

  B, N, Tp, H = q.shape
  Hv, f32 = v.shape[-1], jnp.float32
  sp = _tpu_specs(cfg, H, Hv, reverse=True)
  shapes = _op_shapes(cfg, B, N, Tp)
  return pl.pallas_call(
    functools.partial(_tpu_bwd_kernel, cfg),
    grid=(B, N, cfg.nC),
    in_specs=[
      *(sp[n] for n in ("q", "k", "v", "do")),
      *(sp[n] for n in _OPS + _DOCS),
      sp["states"],
      sp["state"],
    ],
    out_specs=[sp["dq"], sp["dk"], sp["dv"], *(sp[n] for n in _OPS), sp["state"]],
    out_shape=[
      jax.ShapeDtypeStruct((B, N, Tp, H), f32),
      jax.ShapeDtypeStruct((B, N, Tp, H), f32),
      jax.ShapeDtypeStruct((B, N, Tp, Hv), f32),
      *(jax.ShapeDtypeStruct(shapes[n], f32) for n in _OPS),
      jax.ShapeDtypeStruct((B, N, H, Hv), f32),
    ],
    scratch_shapes=[pltpu.VMEM((H, Hv), f32)],
    compiler_params=lc._tpu_params(),
    interpret=cfg.interpret,
    name="delta_chunk_bwd",
  )(q, k, v, do, *(ops[n] for n in _OPS), *docs, states, dsT)


# ---------------------------------------------------------------------------------------
# GPU kernels.
# ---------------------------------------------------------------------------------------


def _gpu_chunk(cfg, ops_refs, docs_refs, c):
  rows = pl.ds(c * cfg.C, cfg.C)
  tok = {"beta_col", "b", "qdec", "kdec"}
  ops = {n: (r[rows, :] if n in tok else r[c]) for n, r in ops_refs.items()}
  return ops, docs_refs[0][rows, :], docs_refs[1][c]


def _gpu_fwd_kernel(cfg, q_ref, k_ref, v_ref, *refs):
  n = len(_OPS)
  ops_refs = dict(zip(_OPS, refs[:n], strict=True))
  docs_refs = refs[n : n + 2]
  s0_ref, o_ref, states_ref, sT_ref = refs[n + 2 :]

  def body(c, S):
    rows = pl.ds(c * cfg.C, cfg.C)
    ops, d_col, d_row = _gpu_chunk(cfg, ops_refs, docs_refs, c)
    states_ref[c] = S
    o, S = _fwd_chunk(cfg, S, q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], ops, d_col, d_row)
    o_ref[rows, :] = o
    return S

  sT_ref[...] = lax.fori_loop(jnp.int32(0), jnp.int32(cfg.nC), body, s0_ref[...])


def _gpu_bwd_kernel(cfg, q_ref, k_ref, v_ref, do_ref, *refs):
  n = len(_OPS)
  ops_refs = dict(zip(_OPS, refs[:n], strict=True))
  docs_refs = refs[n : n + 2]
  states_ref, dsT_ref, dq_ref, dk_ref, dv_ref = refs[n + 2 : n + 7]
  dops_refs, ds0_ref = refs[n + 7 : 2 * n + 7], refs[2 * n + 7]
  tok = {"beta_col", "b", "qdec", "kdec"}

  def body(i, dS):
    c = cfg.nC - 1 - i
    rows = pl.ds(c * cfg.C, cfg.C)
    ops, d_col, d_row = _gpu_chunk(cfg, ops_refs, docs_refs, c)
    vals = (q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :])
    dS, dq, dk, dv, grads = _bwd_chunk(cfg, dS, states_ref[c], *vals, ops, d_col, d_row)
    dq_ref[rows, :], dk_ref[rows, :], dv_ref[rows, :] = dq, dk, dv
    for name, r in zip(_OPS, dops_refs, strict=True):
      if name in tok:
        r[rows, :] = grads[name]
      else:
        r[c] = grads[name]
    return dS

  ds0_ref[...] = lax.fori_loop(jnp.int32(0), jnp.int32(cfg.nC), body, dsT_ref[...])


def _gpu_forward(cfg, q, k, v, ops, docs, s0):
  B, N, Tp, H = q.shape
  Hv, f32 = v.shape[-1], jnp.float32
  args = (q, k, v, *(ops[n] for n in _OPS), *docs, s0)
  outs = (
    jax.ShapeDtypeStruct((B, N, Tp, Hv), f32),
    jax.ShapeDtypeStruct((B, N, cfg.nC, H, Hv), f32),
    jax.ShapeDtypeStruct((B, N, H, Hv), f32),
  )
  return lc._gpu_call(cfg, _gpu_fwd_kernel, args, outs, "delta_chunk_fwd", shared=(10, 11))


def _gpu_backward(cfg, q, k, v, do, ops, docs, states, dsT):
  B, N, Tp, H = q.shape
  Hv, f32 = v.shape[-1], jnp.float32
  shapes = _op_shapes(cfg, B, N, Tp)
  args = (q, k, v, do, *(ops[n] for n in _OPS), *docs, states, dsT)
  outs = (
    jax.ShapeDtypeStruct((B, N, Tp, H), f32),
    jax.ShapeDtypeStruct((B, N, Tp, H), f32),
    jax.ShapeDtypeStruct((B, N, Tp, Hv), f32),
    *(jax.ShapeDtypeStruct(shapes[n], f32) for n in _OPS),
    jax.ShapeDtypeStruct((B, N, H, Hv), f32),
  )
  return lc._gpu_call(cfg, _gpu_bwd_kernel, args, outs, "delta_chunk_bwd", shared=(11, 12))


# ---------------------------------------------------------------------------------------
# custom_vjp core and the public wrapper.
# ---------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg, q, k, v, ops, docs, s0):
  fwd = _gpu_forward if cfg.backend == "gpu" else _tpu_forward
  out, _, sT = fwd(cfg, q, k, v, ops, docs, s0)
  return out, sT


def _core_fwd(cfg, q, k, v, ops, docs, s0):
  fwd = _gpu_forward if cfg.backend == "gpu" else _tpu_forward
  out, states, sT = fwd(cfg, q, k, v, ops, docs, s0)
  return (out, sT), (q, k, v, ops, docs, states)


def _core_bwd(cfg, res, cts):
  q, k, v, ops, docs, states = res
  do, dsT = cts
  bwd = _gpu_backward if cfg.backend == "gpu" else _tpu_backward
  dq, dk, dv, *dops, ds0 = bwd(cfg, q, k, v, do, ops, docs, states, dsT)
  dops = dict(zip(_OPS, dops, strict=True))
  return dq, dk, dv, dops, tuple(jnp.zeros_like(d) for d in docs), ds0


_core.defvjp(_core_fwd, _core_bwd)


def chunked_delta_rule(
  q,
  k,
  v,
  beta,
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
  """The (gated) delta rule of the module docstring on the Pallas kernels.

  Args:
    q, k: ``[B, T, N, H]`` float32 (scale / normalisation already applied).
    v: ``[B, T, N, Hv]`` float32.
    beta: ``[B, T, N]``.
    log_decay: ``[B, T, N]`` (<= 0; zeros for the plain delta rule).
    reset: ``[B, T]`` bool, True where a document starts.
    initial_state: ``[B, N, H, Hv]``.
    chunk_size, backend, interpret, num_warps, num_stages: as
      ``pallas_kernels.linear_chunk.chunked_linear_attention``.

  Returns:
    ``(out [B, T, N, Hv], final_state [B, N, H, Hv])`` float32; differentiable in q, k, v,
    beta, log_decay and initial_state (first-order reverse mode).
  """
  lay = lc.layout(q, k, v, reset, initial_state, chunk_size, backend)
  B, T, N, _ = q.shape
  for name, a in (("beta", beta), ("log_decay", log_decay)):
    if a.shape != (B, T, N):
      raise ValueError(f"{name} must be [B, T, N] = {(B, T, N)}; got {a.shape}")
  cfg = lc._Cfg(backend, lay.C, lay.nC, False, interpret, num_warps, num_stages)
  dec = lc._decays(cfg, lay.heads_first(log_decay[..., None], 1), lay.d)
  beta_col = lay.heads_first(beta[..., None], 1)  # padded tokens: β = 0 (no update)
  ops = {
    "beta_col": beta_col,
    "beta_row": beta_col[..., 0].reshape(B, N, lay.nC, 1, lay.C),
    **{n: dec[n] for n in ("b", "b_row", "qdec", "kdec", "cdec")},
  }
  out, sT = _core(cfg, *lay.qkv, ops, (dec["d_col"], dec["d_row"]), lay.s0)
  return lay.unpad(out, sT)
