"""The (gated) delta rule (catalog family (g): ``delta_rule``, ``gated_delta``) under the
linear-op contract of DESIGN.md.

Dimension key: B batch, T length, N heads (K kv heads repeated to N), H key dim, Hv value
dim, C chunk size.

Per head, with β_t ∈ (0, 1] (``beta [B, T, N]``; up to 2 for negative eigenvalues) and an
optional decay α_t = exp(g_t) (``log_decay``: None, ``[N]`` or ``[B, T, N]``)::

    S_t = α_t (I − β_t k_t k_tᵀ) S_(t−1) + β_t k_t v_tᵀ        o_t = scale · S_tᵀ q_t

(S: [H, Hv]; α = 1 is ``delta_rule``). Keys are used as given: the layers L2-normalise them
(the rule is a contraction only for ‖k‖ = 1, β <= 1).

Chunked form (the WY / UT representation), per chunk with γ_t = e^(b_t), b the cumulative
log decay inside the chunk, and S_0 the entering state::

    A_ts = β_t (k_t·k_s) γ_t/γ_s  (s < t),   T = (I + A)⁻¹ diag(β)     (one triangular solve)
    W = T (γ ⊙ K),   U = T V,   U' = U − W S_0
    O = scale · [ (γ ⊙ Q) S_0 + (Q Kᵀ ⊙ Γ ⊙ M) U' ],   Γ_ts = γ_t/γ_s, M: s <= t
    S_C = γ_C S_0 + (γ_C/γ ⊙ K)ᵀ U'

Every ratio γ_t/γ_s is formed as e^(b_t − b_s) with b_t − b_s <= 0. A document start (a
segment reset) acts as α = 0 at that token; the chunk form cuts every term across it the way
``attn_jax.attention.linear`` does (pair terms only within a run, S_0 only before the first
reset). Implementations: ``"reference"`` (token scan), ``"xla"`` (chunked, default) and the
Pallas kernels of ``pallas_kernels.delta_chunk`` (``"pallas_tpu"``, ``"pallas_gpu"``,
``"pallas_interpret"``: the same chunked form, forward and backward, in-kernel triangular
solve); ``mode="recurrent"`` is the token scan for decoding.
"""

import typing

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from attn_jax.attention import linear as linear_lib
from attn_jax.attention import registry


def _prepare(q, k, v, beta, log_decay, scale, initial_state, segment_ids):
  p = linear_lib._prepare(q, k, v, log_decay, scale, "identity", False, initial_state, segment_ids)
  B, T, N, _ = p.q.shape
  if p.g.ndim != 3:
    raise ValueError(f"the delta rule takes log_decay [N] or [B, T, N]; got {p.g.shape}")
  b = jnp.asarray(beta)
  if b.shape != (B, T, N) or not jnp.issubdtype(b.dtype, jnp.floating):
    raise ValueError(f"beta must be a float array [B, T, N] = {(B, T, N)}; got {b.shape}")
  return p, b.astype(p.q.dtype)


def _scan(p, beta):
  def step(S, xs):
    q_t, k_t, v_t, g_t, r_t, b_t = xs
    a = jnp.where(r_t[:, None], 0.0, jnp.exp(g_t))[..., None, None]  # [B, N, 1, 1]
    kS = jnp.einsum("BNH,BNHV->BNV", k_t, S)
    S = a * (S - b_t[..., None, None] * k_t[..., :, None] * kS[..., None, :])
    S = S + b_t[..., None, None] * k_t[..., :, None] * v_t[..., None, :]
    return S, jnp.einsum("BNH,BNHV->BNV", q_t, S)

  xs = tuple(jnp.moveaxis(a, 1, 0) for a in (p.q, p.k, p.v, p.g, p.reset, beta))
  S, out = jax.lax.scan(step, p.state, xs)
  return jnp.moveaxis(out, 0, 1), S


@jax.custom_vjp
def unit_lower_inverse(a):
  """(I + A)⁻¹ for strictly lower-triangular ``a [..., C, C]`` by block substitution: the
  inverses of the diagonal blocks double in size each level, X21 = −X22·L21·X11 (exact
  like forward substitution, ~C³/6 multiply-adds, batched matmuls; C is padded to a power of
  two with an identity extension). Gradient: dA = −Xᵀ·dX·Xᵀ on the strictly lower part."""
  return _unit_lower_inverse(a)


def _inverse_fwd(a):
  x = _unit_lower_inverse(a)
  return x, x


def _inverse_bwd(x, dx):
  da = -jnp.einsum("...ji,...jk,...lk->...il", x, dx, x)
  return (jnp.tril(da, -1),)


unit_lower_inverse.defvjp(_inverse_fwd, _inverse_bwd)


def _unit_lower_inverse(a):
  C = a.shape[-1]
  P = 1 << max(C - 1, 0).bit_length()
  lead = a.shape[:-2]
  if P != C:
    a = jnp.pad(a, [(0, 0)] * len(lead) + [(0, P - C), (0, P - C)])
  d = jnp.ones(lead + (P, 1, 1), a.dtype)
  s = 1
  while s < P:
    nb = P // (2 * s)
    blocks = jnp.diagonal(a.reshape(lead + (nb, 2 * s, nb, 2 * s)), axis1=-4, axis2=-2)
    l21 = jnp.moveaxis(blocks, -1, -3)[..., s:, :s]  # [..., nb, s, s]
    x11, x22 = d[..., 0::2, :, :], d[..., 1::2, :, :]
    x21 = -jnp.einsum("...ij,...jk,...kl->...il", x22, l21, x11)
    top = jnp.concatenate([x11, jnp.zeros_like(x11)], axis=-1)
    d = jnp.concatenate([top, jnp.concatenate([x21, x22], axis=-1)], axis=-2)
    s *= 2
  return d[..., 0, :C, :C]


def _chunked(p, beta, C: int):
  """Everything that does not depend on the state (A, its inverse, W, U, the masked Q Kᵀ
  and the decays) is computed for all chunks at once; the scan only carries S."""
  B, T, N, H = p.q.shape
  Hv = p.v.shape[-1]
  nC = -(-T // C)
  pad = nC * C - T

  def chunks(a, fill=0):  # [B, T, ...] -> [B, nC, C, ...]
    a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), constant_values=fill)
    return a.reshape((B, nC, C) + a.shape[2:])

  q, k, v, g = chunks(p.q), chunks(p.k), chunks(p.v), chunks(p.g)  # [B, nC, C, N(, ·)]
  r, bt = chunks(p.reset, False), chunks(beta)
  incl = jnp.tril(jnp.ones((C, C), bool))
  strict = jnp.tril(jnp.ones((C, C), bool), -1)
  bcum = jnp.cumsum(g, axis=2)  # [B, nC, C, N]
  c = jnp.cumsum(r.astype(jnp.int32), axis=2)  # [B, nC, C]
  same = c[..., :, None] == c[..., None, :]  # [B, nC, t, s]
  diff = jnp.moveaxis(bcum[:, :, :, None, :] - bcum[:, :, None, :, :], -1, 2)  # [B,nC,N,t,s]
  gam_in = jnp.exp(jnp.where((same & incl)[:, :, None], diff, -jnp.inf))  # Γ ⊙ M
  gam_strict = jnp.where(strict, gam_in, 0.0)
  btn = jnp.moveaxis(bt, -1, 2)  # [B, nC, N, C]
  kk = jnp.einsum("BKTNH,BKSNH->BKNTS", k, k)
  x = unit_lower_inverse(btn[..., :, None] * kk * gam_strict)  # (I + A)⁻¹
  tm = x * btn[..., None, :]  # (I + A)⁻¹ diag(β)
  start = (c == 0)[..., None] * jnp.exp(bcum)  # γ_t where S_0 still reaches t, [B, nC, C, N]
  W = jnp.einsum("BKNTS,BKSNH->BKTNH", tm, k * start[..., None])
  U0 = jnp.einsum("BKNTS,BKSNV->BKTNV", tm, v)
  qk = jnp.einsum("BKTNH,BKSNH->BKNTS", q, k) * gam_in
  last = c[:, :, -1:]
  to_end = jnp.exp(jnp.where((c == last)[..., None], bcum[:, :, -1:, :] - bcum, -jnp.inf))
  keep = jnp.where(last[..., 0] == 0, 1.0, 0.0)[..., None] * jnp.exp(bcum[:, :, -1])  # [B,nC,N]
  kend = k * to_end[..., None]

  def step(S0, xs):
    q_, start_, W_, U0_, qk_, keep_, kend_ = xs
    U = U0_ - jnp.einsum("BTNH,BNHV->BTNV", W_, S0)
    out = jnp.einsum("BTNH,BNHV->BTNV", q_ * start_[..., None], S0)
    out = out + jnp.einsum("BNTS,BSNV->BTNV", qk_, U)
    S = keep_[..., None, None] * S0 + jnp.einsum("BSNH,BSNV->BNHV", kend_, U)
    return S, out

  xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, start, W, U0, qk, keep, kend))
  S, out = jax.lax.scan(step, p.state, xs)
  return jnp.moveaxis(out, 0, 1).reshape(B, nC * C, N, Hv)[:, :T], S


@typing.no_type_check
def delta_rule_attention(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B T K H"],
  v: Float[Array, "B T K Hv"],
  beta: Float[Array, "B T N"],
  log_decay=None,
  *,
  scale: float | None = None,
  initial_state=None,
  return_final_state: bool = False,
  segment_ids: Int[Array, "B T"] | None = None,
  chunk_size: int = 64,
  mode: str = "chunk",
  implementation: str | None = None,
  l2_normalize: bool = False,
):
  """The (gated) delta rule (see the module docstring). Arguments as
  ``attn_jax.attention.linear.linear_attention`` plus ``beta [B, T, N]``; ``log_decay``
  None is ``delta_rule``, given it is ``gated_delta``. ``l2_normalize=True`` divides q and k
  by their L2 norms per head first (what the layers do)."""
  if mode not in linear_lib.MODES:
    raise ValueError(f"mode must be one of {linear_lib.MODES}; got {mode!r}")
  if implementation is not None and implementation not in linear_lib.IMPLEMENTATIONS:
    raise ValueError(
      f"implementation must be one of {linear_lib.IMPLEMENTATIONS}; got {implementation!r}"
    )
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be an int >= 1; got {chunk_size!r}")
  if l2_normalize:
    q, k = (a * jax.lax.rsqrt(jnp.sum(jnp.square(a), -1, keepdims=True) + 1e-6) for a in (q, k))
  p, b = _prepare(q, k, v, beta, log_decay, scale, initial_state, segment_ids)
  if mode == "recurrent" or implementation == "reference":
    out, S = _scan(p, b)
  elif implementation in linear_lib.KERNELS:
    from attn_jax.attention import block_sparse
    from pallas_kernels import delta_chunk

    backend, interpret = block_sparse.kernel_backend(implementation)
    out, S = delta_chunk.chunked_delta_rule(
      p.q,
      p.k,
      p.v,
      b,
      p.g,
      p.reset,
      p.state,
      chunk_size=chunk_size,
      backend=backend,
      interpret=interpret,
    )
  else:
    out, S = _chunked(p, b, chunk_size)
  out = out.astype(q.dtype)
  return (out, S) if return_final_state else out


def _betas(key, dims):
  k = jax.random.normal(key, (dims.B, dims.T, dims.N))
  return jax.nn.sigmoid(k)


def _build_delta(key, dims, causal):
  del causal
  return {"beta": _betas(key, dims), "chunk_size": 8, "l2_normalize": True}


def _build_gated(key, dims, causal):
  del causal
  kb, kg = jax.random.split(key)
  g = -jax.nn.softplus(jax.random.normal(kg, (dims.B, dims.T, dims.N)))
  return {"beta": _betas(kb, dims), "log_decay": g, "chunk_size": 8, "l2_normalize": True}


for _id, _paper, _build, _check in (
  (
    "delta_rule",
    "Parallelizing Linear Transformers with the Delta Rule over Sequence Length",
    _build_delta,
    "The chunk form equals the recurrence. β = 0 leaves the state unchanged. With "
    "orthonormal keys and β = 1, reading with k_i returns v_i exactly, unlike linear_attn.",
  ),
  (
    "gated_delta",
    "Gated Delta Networks: Improving Mamba2 with Delta Rule",
    _build_gated,
    "α = 1 equals delta_rule, and β = 0 gives pure decay. The chunk form equals the recurrence.",
  ),
):
  registry.register(
    registry.Mechanism(
      id=_id,
      family="g",
      paper=_paper,
      entry_point="attn_jax.attention.delta:delta_rule_attention",
      implementations=linear_lib.IMPLEMENTATIONS,
      patterns=frozenset((registry.SELF_CAUSAL,)),
      decode=False,
      tier=1,
      check=_check,
      build=_build,
      module="attn_jax.nn.linear:LinearAttention",
    )
  )
