"""Linear attention with scalar decay (catalog family (g): ``linear_attn``, ``lightning``,
``simple_gla``) under the linear-op contract of DESIGN.md.

Dimension key: B batch, T length, N heads (K kv heads are repeated to N: the state is per
query head), H key/query dim, Hv value dim, C chunk size, nC chunks.

The recurrence, per head, with a scalar decay a_t = exp(g_t) in (0, 1] per (token, head)::

    S_t = a_t · S_(t−1) + φ(k_t) v_tᵀ        o_t = scale · S_tᵀ φ(q_t)          S: [H, Hv]

``g`` (``log_decay``) is None (a = 1: ``linear_attn``), a fixed per-head ``[N]`` (Lightning
attention / retention: ``lightning``) or data-dependent ``[B, T, N]`` (``simple_gla``).
``normalize=True`` divides by z_tᵀ φ(q_t) with z_t = a_t z_(t−1) + φ(k_t) (the value gets
a ones column, so the state is ``[H, Hv + 1]``). Feature maps φ: identity, elu+1, relu,
softmax over the feature dim (random-feature maps are not built).

Three implementations: ``"reference"`` — the token-by-token ``lax.scan`` oracle; ``"xla"``
(default) — the chunkwise-parallel form; the Pallas kernel is separate work (the Pallas
names raise). ``mode="chunk"`` is for training and prefill; ``mode="recurrent"`` runs the
token scan (decoding, one or a few tokens against a carried state) whatever the
implementation. State accumulates in float32. ``segment_ids [B, T]`` reset the state at
every document start of a packed row; ``initial_state`` is the state before token 0.

Chunked form, per chunk of C tokens with b_t = Σ_(r <= t) g_r (cumulative inside the chunk)
and S_0 the state entering the chunk::

    o_t = scale · ( e^(b_t) φ(q_t)ᵀ S_0  +  Σ_(s <= t) (φ(q_t)·φ(k_s)) e^(b_t − b_s) v_s )
    S_C = e^(b_C) S_0 + Σ_s e^(b_C − b_s) φ(k_s) v_sᵀ

Every exponent is <= 0 (pairwise differences, never e^(−b) alone), so strong gates
(g ≈ −10 per token) stay finite. A reset at token r (a new document) removes every term that
crosses it: pairs (t, s) count only when no reset lies in (s, t], S_0 only before the
chunk's first reset. Cost per chunk: O(C²·(H + Hv) + C·H·Hv); memory O(T·C) for the
in-chunk maps plus one state per chunk boundary in the backward.
"""

import typing

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from attn_jax.attention import api as api_lib
from attn_jax.attention import registry

FEATURE_MAPS = ("identity", "elu1", "relu", "softmax", "taylor")
MODES = ("chunk", "recurrent")
IMPLEMENTATIONS = ("reference", "xla")


def feature_map(x, kind: str):
  """φ(x) of the module docstring (computed in x's dtype)."""
  if kind == "identity":
    return x
  if kind == "elu1":
    return jax.nn.elu(x) + 1
  if kind == "relu":
    return jax.nn.relu(x)
  if kind == "softmax":
    return jax.nn.softmax(x, axis=-1)
  if kind == "taylor":  # [1, x, vec(x xᵀ)/√2]: φ(q)·φ(k) = 1 + q·k + (q·k)²/2 (Based)
    outer = (x[..., :, None] * x[..., None, :]).reshape(x.shape[:-1] + (-1,)) * 2**-0.5
    return jnp.concatenate([jnp.ones(x.shape[:-1] + (1,), x.dtype), x, outer], axis=-1)
  raise ValueError(f"feature_map must be one of {FEATURE_MAPS}; got {kind!r}")


class _Prepared(typing.NamedTuple):
  q: Array  # [B, T, N, H] float32, φ applied
  k: Array  # [B, T, N, H]
  v: Array  # [B, T, N, Hv'] (ones column appended when normalising)
  g: Array  # [B, T, N] log decay (0 where none), or [B, T, N, H] per key dimension
  reset: Array  # [B, T] bool: a document starts here (the state is zeroed first)
  state: Array  # [B, N, H, Hv'] float32


def _prepare(q, k, v, log_decay, scale, feature, normalize, initial_state, segment_ids):
  if any(getattr(a, "ndim", None) != 4 for a in (q, k, v)):
    raise ValueError(
      "q, k, v must be [B, T, N, H], [B, T, K, H], [B, T, K, Hv]; got shapes "
      f"{[getattr(a, 'shape', a) for a in (q, k, v)]}"
    )
  B, T, N, H = q.shape
  if k.shape[:2] != (B, T) or v.shape[:3] != k.shape[:3] or k.shape[3] != H:
    raise ValueError(
      f"k must be [B={B}, T={T}, K, H={H}] and v [B, T, K, Hv]; got k {k.shape}, v {v.shape}"
    )
  K = k.shape[2]
  if N % K:
    raise ValueError(f"kv heads K={K} must divide the query heads N={N}")
  f32 = jnp.promote_types(q.dtype, jnp.float32)
  scale = H**-0.5 if scale is None else scale
  qf = feature_map(q.astype(f32), feature) * scale
  kf = feature_map(k.astype(f32), feature)
  vf = v.astype(f32)
  if normalize:
    vf = jnp.concatenate([vf, jnp.ones(vf.shape[:3] + (1,), f32)], axis=-1)
  if K != N:
    kf, vf = jnp.repeat(kf, N // K, axis=2), jnp.repeat(vf, N // K, axis=2)
  Hf = qf.shape[-1]
  if log_decay is None:
    g = jnp.zeros((B, T, N), f32)
  else:
    g = jnp.asarray(log_decay).astype(f32)
    if g.shape == (N,):
      g = jnp.broadcast_to(g, (B, T, N))
    elif g.shape not in ((B, T, N), (B, T, N, Hf)):
      raise ValueError(
        f"log_decay must be [N={N}], [B, T, N] = {(B, T, N)} or per key dimension "
        f"[B, T, N, H] = {(B, T, N, Hf)}; got {g.shape}"
      )
  Hv = vf.shape[-1]
  H = Hf
  if initial_state is None:
    state = jnp.zeros((B, N, H, Hv), f32)
  else:
    state = jnp.asarray(initial_state).astype(f32)
    if state.shape != (B, N, H, Hv):
      raise ValueError(
        f"initial_state must be [B, N, H, Hv] = {(B, N, H, Hv)} (Hv + 1 when normalize); got "
        f"{state.shape}"
      )
  if segment_ids is None:
    reset = jnp.zeros((B, T), bool)
  else:
    seg = jnp.asarray(segment_ids)
    if seg.shape != (B, T) or not jnp.issubdtype(seg.dtype, jnp.integer):
      raise ValueError(f"segment_ids must be an int array [B, T] = {(B, T)}; got {seg.shape}")
    reset = jnp.concatenate([jnp.zeros((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  return _Prepared(qf, kf, vf, g, reset, state)


def _scan(p: _Prepared):
  """The token-by-token oracle: (out [B, T, N, Hv'], final state)."""

  def step(S, xs):
    q_t, k_t, v_t, g_t, r_t = xs  # [B, N, H], [B, N, H], [B, N, Hv], [B, N(, H)], [B]
    a = jnp.exp(g_t)[..., None] if g_t.ndim == 3 else jnp.exp(g_t)[..., None, None]
    keep = jnp.where(r_t[:, None, None, None], 0.0, a)
    S = keep * S + k_t[..., :, None] * v_t[..., None, :]
    return S, jnp.einsum("BNH,BNHV->BNV", q_t, S)

  xs = tuple(jnp.moveaxis(a, 1, 0) for a in (p.q, p.k, p.v, p.g, p.reset))
  S, out = jax.lax.scan(step, p.state, xs)
  return jnp.moveaxis(out, 0, 1), S


def _chunked(p: _Prepared, C: int):
  B, T, N, H = p.q.shape
  Hv = p.v.shape[-1]
  nC = -(-T // C)
  pad = nC * C - T

  def chunks(a, fill=0):
    a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), constant_values=fill)
    return jnp.moveaxis(a.reshape((B, nC, C) + a.shape[2:]), 1, 0)  # [nC, B, C, ...]

  xs = (chunks(p.q), chunks(p.k), chunks(p.v), chunks(p.g), chunks(p.reset, False))
  tri = jnp.tril(jnp.ones((C, C), bool))

  per_dim = p.g.ndim == 4

  def step(S0, x):
    q, k, v, g, r = x  # [B, C, N, H], [B, C, N, H], [B, C, N, Hv], [B, C, N(, H)], [B, C]
    if per_dim:
      return _per_dim_step(S0, q, k, v, g, r, tri)
    b = jnp.cumsum(g, axis=1)  # [B, C, N]
    c = jnp.cumsum(r.astype(jnp.int32), axis=1)  # resets so far in the chunk, [B, C]
    same = (c[:, :, None] == c[:, None, :]) & tri  # [B, C(t), C(s)]
    diff = b[:, :, None, :] - b[:, None, :, :]  # [B, t, s, N]
    decay = jnp.exp(jnp.where(same[..., None], diff, -jnp.inf))
    a = jnp.einsum("BTNH,BSNH->BTSN", q, k) * decay
    intra = jnp.einsum("BTSN,BSNV->BTNV", a, v)
    carry_in = (c == 0)[:, :, None] * jnp.exp(b)  # [B, C, N]: S_0 reaches t
    inter = jnp.einsum("BTNH,BNHV->BTNV", q * carry_in[..., None], S0)
    last = c[:, -1:]  # [B, 1]
    to_end = jnp.where((c == last)[:, :, None], b[:, -1:, :] - b, -jnp.inf)  # [B, C, N]
    S_new = jnp.einsum("BSNH,BSNV->BNHV", k * jnp.exp(to_end)[..., None], v)
    keep = jnp.where(last[:, 0] == 0, 1.0, 0.0)[:, None] * jnp.exp(b[:, -1])  # [B, N]
    S = keep[..., None, None] * S0 + S_new
    return S, intra + inter

  S, out = jax.lax.scan(step, p.state, xs)
  out = jnp.moveaxis(out, 0, 1).reshape(B, nC * C, N, Hv)[:, :T]
  return out, S


def _per_dim_step(S0, q, k, v, g, r, tri):
  """One chunk with per-key-dimension decays (GLA): the pairwise decays are [t, s, N, H]."""
  b = jnp.cumsum(g, axis=1)  # [B, C, N, H]
  c = jnp.cumsum(r.astype(jnp.int32), axis=1)
  same = (c[:, :, None] == c[:, None, :]) & tri  # [B, t, s]
  diff = b[:, :, None] - b[:, None]  # [B, t, s, N, H]
  decay = jnp.exp(jnp.where(same[..., None, None], diff, -jnp.inf))
  a = jnp.einsum("BTNH,BSNH,BTSNH->BTSN", q, k, decay)
  intra = jnp.einsum("BTSN,BSNV->BTNV", a, v)
  carry_in = (c == 0)[:, :, None, None] * jnp.exp(b)  # [B, C, N, H]
  inter = jnp.einsum("BTNH,BNHV->BTNV", q * carry_in, S0)
  last = c[:, -1:]
  to_end = jnp.where((c == last)[:, :, None, None], b[:, -1:] - b, -jnp.inf)
  S_new = jnp.einsum("BSNH,BSNV->BNHV", k * jnp.exp(to_end), v)
  keep = jnp.where(last[:, 0] == 0, 1.0, 0.0)[:, None, None] * jnp.exp(b[:, -1])  # [B, N, H]
  return keep[..., None] * S0 + S_new, intra + inter


@typing.no_type_check
def linear_attention(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B T K H"],
  v: Float[Array, "B T K Hv"],
  log_decay=None,
  *,
  scale: float | None = None,
  feature_map: str = "identity",
  normalize: bool = False,
  initial_state=None,
  return_final_state: bool = False,
  segment_ids: Int[Array, "B T"] | None = None,
  chunk_size: int = 64,
  mode: str = "chunk",
  implementation: str | None = None,
):
  """Causal linear attention with an optional scalar decay (see the module docstring).

  Args:
    q, k, v: ``[B, T, N, H]``, ``[B, T, K, H]``, ``[B, T, K, Hv]`` (N % K == 0).
    log_decay: g <= 0: None, ``[N]`` (fixed per head), ``[B, T, N]`` (per token) or
      ``[B, T, N, H]`` (per token and key dimension: ``gla``; H after the feature map).
    scale: multiplies φ(q) (default H^-1/2).
    feature_map: "identity", "elu1", "relu" or "softmax".
    normalize: divide by z_tᵀ φ(q_t) (the state gets one extra value column).
    initial_state: ``[B, N, H, Hv(+1)]`` float, the state before token 0.
    return_final_state: also return the state after the last token.
    segment_ids: ``[B, T]`` ints; the state restarts where the id changes.
    chunk_size: C of the chunked form.
    mode: "chunk" (training, prefill) or "recurrent" (decoding: the token scan).
    implementation: "reference" (token scan) or "xla" (chunked; default).

  Returns:
    ``out [B, T, N, Hv]`` in q's dtype (and the final state, float32).
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    if implementation in api_lib.IMPLEMENTATIONS:
      raise NotImplementedError(
        f"linear_attention implementation {implementation!r} is not built: the chunked "
        "Pallas kernel is separate work; use 'xla' (chunked) or 'reference' (token scan)"
      )
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; got {implementation!r}")
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be an int >= 1; got {chunk_size!r}")
  if feature_map not in FEATURE_MAPS:
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}; got {feature_map!r}")
  p = _prepare(q, k, v, log_decay, scale, feature_map, normalize, initial_state, segment_ids)
  if mode == "recurrent" or implementation == "reference":
    out, S = _scan(p)
  else:
    out, S = _chunked(p, chunk_size)
  if normalize:
    den = out[..., -1:]
    out = out[..., :-1] / jnp.where(jnp.abs(den) > 1e-6, den, 1e-6)
  out = out.astype(q.dtype)
  return (out, S) if return_final_state else out


def materialised(q, k, v, log_decay=None, *, scale=None, feature_map="identity", normalize=False):
  """The quadratic form (φ(Q)·φ(K)ᵀ ⊙ D)·V with D_ts = e^(b_t − b_s) for s <= t (b the
  cumulative log decay over the whole sequence): an independent check of both forms."""
  p = _prepare(q, k, v, log_decay, scale, feature_map, normalize, None, None)
  g = p.g if p.g.ndim == 4 else jnp.broadcast_to(p.g[..., None], p.q.shape)
  b = jnp.cumsum(g, axis=1)  # [B, T, N, H]
  T = q.shape[1]
  tri = jnp.tril(jnp.ones((T, T), bool))
  d = jnp.exp(jnp.where(tri[None, :, :, None, None], b[:, :, None] - b[:, None], -jnp.inf))
  out = jnp.einsum("BTNH,BSNH,BTSNH,BSNV->BTNV", p.q, p.k, d, p.v)
  if normalize:
    out = out[..., :-1] / out[..., -1:]
  return out


def lightning_log_decay(num_heads: int) -> np.ndarray:
  """Per-head log λ_n with λ_n = 1 − 2^(−5 − n) (the retention schedule; the catalog's TNL
  formula is marked "verify", so this is our stated choice)."""
  return np.log1p(-(2.0 ** (-5.0 - np.arange(num_heads)))).astype(np.float32)


def _build_linear(key, dims, causal):
  del key, dims, causal
  return {"feature_map": "elu1", "normalize": True, "chunk_size": 8}


def _build_lightning(key, dims, causal):
  del key, causal
  return {"log_decay": jnp.asarray(lightning_log_decay(dims.N)), "chunk_size": 8}


def _build_gla(key, dims, causal):
  del causal
  g = -jax.nn.softplus(jax.random.normal(key, (dims.B, dims.T, dims.N)))
  return {"log_decay": g, "chunk_size": 8}


def _build_gla_dims(key, dims, causal):
  del causal
  g = -jax.nn.softplus(jax.random.normal(key, (dims.B, dims.T, dims.N, dims.H)))
  return {"log_decay": g, "chunk_size": 8}


def _build_based(key, dims, causal):
  del key, dims, causal
  return {"feature_map": "taylor", "normalize": True, "chunk_size": 8}


_ENTRY = "attn_jax.attention.linear:linear_attention"
for _id, _paper, _build, _check in (
  (
    "linear_attn",
    "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention (baseline "
    "kernelised linear attention)",
    _build_linear,
    "The chunk form equals both the token-recurrent oracle and the materialised "
    "(φ(Q)·φ(K)ᵀ ⊙ causal)·V. Running two halves with the carried state equals a single pass.",
  ),
  (
    "lightning",
    "Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention",
    _build_lightning,
    "The chunk form equals the recurrence for several chunk sizes. λ = 1 equals linear_attn.",
  ),
  (
    "simple_gla",
    "Retentive Network: A Successor to Transformer for Large Language Models (baseline "
    "data-dependent scalar decay)",
    _build_gla,
    "A constant g equals lightning, and g = 0 equals linear_attn. The chunk form equals the "
    "recurrence even under strong gates (g ≈ −10).",
  ),
  (
    "gla",
    "Gated Linear Attention Transformers with Hardware-Efficient Training",
    _build_gla_dims,
    "Gates equal across dimensions reproduce simple_gla. The chunk form (pairwise per-"
    "dimension decays inside a chunk) equals the recurrence.",
  ),
  (
    "based",
    "Simple linear attention language models balance the recall-throughput tradeoff",
    _build_based,
    "φ(q)·φ(k) equals 1 + q·k + (q·k)²/2 exactly (second-order Taylor feature map). The "
    "chunk form equals the recurrence.",
  ),
):
  registry.register(
    registry.Mechanism(
      id=_id,
      family="g",
      paper=_paper,
      entry_point=_ENTRY,
      implementations=IMPLEMENTATIONS,
      patterns=frozenset((registry.SELF_CAUSAL,)),
      decode=False,
      tier=1 if _id in ("linear_attn", "lightning", "simple_gla") else 2,
      check=_check,
      build=_build,
      module="attn_jax.nn.linear:LinearAttention",
    )
  )
