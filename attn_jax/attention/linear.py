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

Implementations: ``"reference"`` — the token-by-token ``lax.scan`` oracle; ``"xla"``
(default) — the chunkwise-parallel form; ``"pallas_tpu"`` / ``"pallas_gpu"`` — the chunked
Pallas kernels of ``pallas_kernels.linear_chunk`` (forward and backward; chunk_size a
multiple of 8 on TPU, a power of two >= 16 on GPU); ``"pallas_interpret"`` — the TPU kernel
with TPU memory simulated, on any host. ``mode="chunk"`` is for training and prefill;
``mode="recurrent"`` runs the token scan (decoding, one or a few tokens against a carried
state) whatever the implementation. State accumulates in float32. ``segment_ids [B, T]``
reset the state at every document start of a packed row; ``initial_state`` is the state
before token 0.

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

from attn_jax.attention import registry

FEATURE_MAPS = ("identity", "elu1", "relu", "softmax", "taylor")
MODES = ("chunk", "recurrent")
IMPLEMENTATIONS = ("reference", "xla", "pallas_tpu", "pallas_gpu", "pallas_interpret")
KERNELS = IMPLEMENTATIONS[2:]


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

  # Per-dimension gates: the backward recomputes each chunk's [C, C, N, H] decays instead of
  # keeping them for every chunk (memory O(state) per chunk, not O(C²·N·H)).
  S, out = jax.lax.scan(jax.checkpoint(step) if per_dim else step, p.state, xs)
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
    implementation: "reference" (token scan), "xla" (chunked; default) or a Pallas kernel
      ("pallas_tpu", "pallas_gpu", "pallas_interpret").

  Returns:
    ``out [B, T, N, Hv]`` in q's dtype (and the final state, float32).
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; got {implementation!r}")
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be an int >= 1; got {chunk_size!r}")
  if feature_map not in FEATURE_MAPS:
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}; got {feature_map!r}")
  p = _prepare(q, k, v, log_decay, scale, feature_map, normalize, initial_state, segment_ids)
  if mode == "recurrent" or implementation == "reference":
    out, S = _scan(p)
  elif implementation in KERNELS:
    out, S = run_kernel(p, chunk_size, implementation)
  else:
    out, S = _chunked(p, chunk_size)
  if normalize:
    den = out[..., -1:]
    out = out[..., :-1] / jnp.where(jnp.abs(den) > 1e-6, den, 1e-6)
  out = out.astype(q.dtype)
  return (out, S) if return_final_state else out


def run_kernel(p: _Prepared, chunk_size: int, implementation: str):
  """The prepared recurrence on ``pallas_kernels.linear_chunk``: (out, final state)."""
  from attn_jax.attention import block_sparse
  from pallas_kernels import linear_chunk

  backend, interpret = block_sparse.kernel_backend(implementation)
  return linear_chunk.chunked_linear_attention(
    p.q,
    p.k,
    p.v,
    p.g,
    p.reset,
    p.state,
    chunk_size=chunk_size,
    backend=backend,
    interpret=interpret,
  )


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


def short_conv(
  x: Float[Array, "B T *F"],
  weight: Float[Array, "W *F"],
  *,
  segment_ids: Int[Array, "B T"] | None = None,
  cache: Float[Array, "B Wm1 *F"] | None = None,
  activation: str | None = "silu",
):
  """Causal depthwise ("short") convolution over time, one filter per channel:
  y_t = act(Σ_(i<W) w_i ⊙ x_(t−i)), the token mixer that linear-attention layers run on their
  q/k/v projections (H3, Based, GLA, DeltaNet) so that a single layer sees each token's
  predecessors — the "shift" an induction head otherwise needs a second layer for.

  ``segment_ids`` stop the filter at document starts (a token never sees the previous
  document's tail). ``cache`` ``[B, W − 1, *F]`` holds the W − 1 inputs before ``x`` (zeros
  at the start of a sequence): then the result is ``(y, new cache)`` — decoding one token at
  a time, or a long sequence in pieces, equals one pass. ``activation``: "silu" or None."""
  W = weight.shape[0]
  if W < 1 or weight.shape[1:] != x.shape[2:]:
    raise ValueError(
      f"short_conv weight must be [W >= 1, *{x.shape[2:]}] for x {x.shape}; got {weight.shape}"
    )
  if activation not in ("silu", None):
    raise ValueError(f"short_conv activation must be 'silu' or None; got {activation!r}")
  if cache is not None and segment_ids is not None:
    raise ValueError("short_conv takes segment_ids or a cache, not both")
  B, T = x.shape[:2]
  prefix = cache if cache is not None else jnp.zeros((B, W - 1, *x.shape[2:]), x.dtype)
  if prefix.shape != (B, W - 1, *x.shape[2:]):
    raise ValueError(f"short_conv cache must be {(B, W - 1, *x.shape[2:])}; got {prefix.shape}")
  xp = jnp.concatenate([prefix.astype(x.dtype), x], axis=1)  # [B, W - 1 + T, *F]
  if segment_ids is not None:
    seg = jnp.pad(segment_ids, ((0, 0), (W - 1, 0)), constant_values=-1)
  extra = (1,) * (x.ndim - 2)
  acc = jnp.promote_types(x.dtype, jnp.float32)  # at least float32
  y = jnp.zeros(x.shape, acc)
  for i in range(W):  # tap i reads x_(t - i)
    tap = jax.lax.slice_in_dim(xp, W - 1 - i, W - 1 - i + T, axis=1).astype(acc)
    if segment_ids is not None:
      same = jax.lax.slice_in_dim(seg, W - 1 - i, W - 1 - i + T, axis=1) == segment_ids
      tap = jnp.where(same.reshape(B, T, *extra), tap, 0.0)
    y = y + weight[i].astype(acc) * tap
  if activation == "silu":
    y = jax.nn.silu(y)
  y = y.astype(x.dtype)
  if cache is None:
    return y
  return y, xp[:, xp.shape[1] - (W - 1) :]


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


# ---------------------------------------------------------------------------------------
# HGRN-2 (HGRN2: Gated Linear RNNs with State Expansion) on the per-dimension-gate path.
# ---------------------------------------------------------------------------------------


def hgrn2_gates(forget_logits, lower_bound=0.0):
  """(log f, 1 − f) of the forget gate f = γ + (1 − γ)·σ(z), both in float32.

  ``1 − f = (1 − γ)·σ(−z)`` is formed directly (no cancellation when f is near 1), and
  ``log f`` as ``log1p(−(1 − f))`` where 1 − f < 1/2, else ``log f``, so it stays accurate at
  both ends; ``lower_bound`` γ broadcasts against the logits.
  """
  z = jnp.asarray(forget_logits).astype(jnp.promote_types(forget_logits.dtype, jnp.float32))
  gamma = jnp.asarray(lower_bound).astype(z.dtype)
  one_minus_f = (1 - gamma) * jax.nn.sigmoid(-z)
  small = one_minus_f < 0.5
  f = gamma + (1 - gamma) * jax.nn.sigmoid(z)
  log_f = jnp.where(
    small,
    jnp.log1p(-jnp.where(small, one_minus_f, 0.0)),
    jnp.log(jnp.maximum(jnp.where(small, 1.0, f), jnp.finfo(z.dtype).tiny)),
  )
  return log_f, one_minus_f


def hgrn2_lower_bound(theta, layer_index: int, num_layers: int = 0):
  """The learned forget-gate lower bound of layer ``layer_index`` (1-based), rising with depth.

  γ_l = lo_l + (hi_l − lo_l)·σ(θ) inside a band of layer l: ``[(l − 1)/L, l/L)`` for
  ``num_layers`` L > 0, else ``[1 − 2^(1−l), 1 − 2^(−l))`` (no depth needed). Bands of
  different layers do not overlap, so γ grows strictly with depth for any learned θ.
  HGRN makes γ monotone with a softmax over all layers' parameters followed by a cumulative
  sum (one parameter shared by the stack); our stacks build each layer alone, so the
  monotonicity comes from the bands instead (our choice).
  """
  if isinstance(layer_index, bool) or not isinstance(layer_index, int | np.integer):
    raise ValueError(f"layer_index must be an int >= 1; got {layer_index!r}")
  if isinstance(num_layers, bool) or not isinstance(num_layers, int | np.integer):
    raise ValueError(f"num_layers must be an int >= 0; got {num_layers!r}")
  if layer_index < 1 or num_layers < 0 or (num_layers and layer_index > num_layers):
    raise ValueError(
      f"need 1 <= layer_index <= num_layers (num_layers 0: unknown); got {layer_index=}, "
      f"{num_layers=}"
    )
  if num_layers:
    lo, hi = (layer_index - 1) / num_layers, layer_index / num_layers
  else:
    lo, hi = 1.0 - 2.0 ** (1 - layer_index), 1.0 - 2.0 ** (-layer_index)
  return lo + (hi - lo) * jax.nn.sigmoid(jnp.asarray(theta, jnp.float32))


@typing.no_type_check
def hgrn2_attention(
  q: Float[Array, "B T N H"],
  forget_logits: Float[Array, "B T K H"],
  i: Float[Array, "B T K Hv"],
  *,
  lower_bound=0.0,
  scale: float = 1.0,
  initial_state=None,
  return_final_state: bool = False,
  segment_ids: Int[Array, "B T"] | None = None,
  chunk_size: int = 64,
  mode: str = "chunk",
  implementation: str | None = None,
):
  """HGRN-2 (HGRN2: Gated Linear RNNs with State Expansion) as a ``gla`` recurrence.

  Per head, with the forget gate f_t = γ + (1 − γ)·σ(z_t) ∈ (γ, 1)^H (γ the lower bound),
  the input i_t and the output gate g_t (``q``)::

      h_t = diag(f_t)·h_(t−1) + (1 − f_t)·i_tᵀ        o_t = scale · h_tᵀ g_t     h: [H, Hv]

  i.e. ``linear_attention(g, 1 − f, i, log f)`` with per-key-dimension gates: k = 1 − f (the
  input gate tied to the forget gate), α = f, v = i, q = g. The forget logits and inputs
  have K heads and are repeated to the N heads (the lower bound may differ per query head).
  ``scale`` defaults to 1 (the paper's o_t = h_tᵀ g_t has none).

  Args:
    q: output gate g ``[B, T, N, H]``.
    forget_logits: z ``[B, T, K, H]`` (N % K == 0).
    i: input ``[B, T, K, Hv]``.
    lower_bound: γ in [0, 1): a scalar, ``[N]`` or ``[N, H]``.
    scale, initial_state, return_final_state, segment_ids, chunk_size, mode,
      implementation: as ``linear_attention`` (the state is ``[B, N, H, Hv]``).

  Returns:
    ``out [B, T, N, Hv]`` in q's dtype (and the final state, float32).
  """
  for name, a in (("q", q), ("forget_logits", forget_logits), ("i", i)):
    if getattr(a, "ndim", None) != 4 or not jnp.issubdtype(a.dtype, jnp.floating):
      raise ValueError(f"{name} must be a float array of rank 4; got {getattr(a, 'shape', a)}")
  B, T, N, H = q.shape
  K = forget_logits.shape[2]
  if forget_logits.shape != (B, T, K, H) or i.shape[:3] != (B, T, K):
    raise ValueError(
      f"forget_logits must be [B={B}, T={T}, K, H={H}] and i [B, T, K, Hv]; got "
      f"forget_logits {forget_logits.shape}, i {i.shape}"
    )
  if N % K:
    raise ValueError(f"kv heads K={K} must divide the query heads N={N}")
  gamma = jnp.asarray(lower_bound)
  if gamma.shape not in ((), (N,), (N, H)) or not jnp.issubdtype(gamma.dtype, jnp.floating):
    raise ValueError(
      f"lower_bound must be a float scalar, [N={N}] or [N, H]={(N, H)}; got {gamma.shape}"
    )
  if not isinstance(gamma, jax.core.Tracer) and not bool(np.all((gamma >= 0) & (gamma < 1))):
    raise ValueError(
      f"lower_bound must lie in [0, 1); got values in [{gamma.min()}, {gamma.max()}]"
    )
  if gamma.ndim == 1:
    gamma = gamma[:, None]
  if K != N:
    forget_logits = jnp.repeat(forget_logits, N // K, axis=2)
    i = jnp.repeat(i, N // K, axis=2)
  log_f, one_minus_f = hgrn2_gates(forget_logits, gamma)
  return linear_attention(
    q,
    one_minus_f,
    i,
    log_f,
    scale=scale,
    initial_state=initial_state,
    return_final_state=return_final_state,
    segment_ids=segment_ids,
    chunk_size=chunk_size,
    mode=mode,
    implementation=implementation,
  )


def _build_hgrn2(key, dims, causal):
  del causal
  return {"lower_bound": jax.random.uniform(key, (dims.N, dims.H), maxval=0.9), "chunk_size": 8}


registry.register(
  registry.Mechanism(
    id="hgrn2",
    family="g",
    paper="HGRN2: Gated Linear RNNs with State Expansion",
    entry_point="attn_jax.attention.linear:hgrn2_attention",
    implementations=IMPLEMENTATIONS,
    patterns=frozenset((registry.SELF_CAUSAL,)),
    decode=False,
    tier=2,
    check="Equals gla (linear_attention with per-dimension gates) under k = 1 − f, α = f, "
    "v = i, q = g. The chunk form equals the recurrence; two halves with the carried state "
    "equal one pass. Forget-gate lower bounds rise strictly with depth.",
    build=_build_hgrn2,
    module="attn_jax.nn.linear:LinearAttention",
  )
)


# ---------------------------------------------------------------------------------------
# RoPE inside state-space duality (Wonderful Matrices): SSD as a scalar-decay recurrence
# with rotary positions on its query-like (C) and key-like (B) projections.
# ---------------------------------------------------------------------------------------


def ssd_rope_attention(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B T K H"],
  v: Float[Array, "B T K Hv"],
  log_decay=None,
  *,
  positions=None,
  rope_base: float = 10000.0,
  rotary_dim: int | None = None,
  **kwargs,
):
  """SSD with RoPE: q (C) and k (B) rotated by ``positions`` (default ``arange(T)``; ``[T]``
  or ``[B, T]``), then the scalar-decay recurrence of ``linear_attention`` (``log_decay``
  ``[B, T, N]`` as ``simple_gla``; other keyword arguments as there). The rotation makes
  q_t·k_s depend on positions only through t − s, so a shift of every position leaves the
  output unchanged; zero angles (all positions 0, or ``rotary_dim=0``) are plain SSD. The
  feature map must be "identity" (a rotation of φ(x) is not RoPE of x)."""
  from attn_jax.attention import rope as rope_lib

  if kwargs.get("feature_map", "identity") != "identity":
    raise ValueError("ssd_rope rotates q and k themselves: feature_map must be 'identity'")
  T = q.shape[1]
  pos = jnp.arange(T) if positions is None else jnp.asarray(positions)
  if rotary_dim != 0:
    q = rope_lib.apply_rope(q, pos, base=rope_base, rotary_dim=rotary_dim)
    k = rope_lib.apply_rope(k, pos, base=rope_base, rotary_dim=rotary_dim)
  return linear_attention(q, k, v, log_decay, **kwargs)


registry.register(
  registry.Mechanism(
    id="ssd_rope",
    family="g",
    paper="Wonderful Matrices: Combining for a More Efficient and Effective Foundation Model "
    "Architecture (RoPE inside state-space duality)",
    entry_point="attn_jax.attention.linear:ssd_rope_attention",
    implementations=IMPLEMENTATIONS,
    patterns=frozenset((registry.SELF_CAUSAL,)),
    decode=False,
    tier=3,
    check="Zero rotation angles equal plain SSD (simple_gla); shifting every position by a "
    "constant leaves the output unchanged; the chunk form equals the recurrence.",
    build=_build_gla,
    module="attn_jax.nn.linear:LinearAttention",
  )
)
