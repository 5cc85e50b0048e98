"""Flow-Attention (catalog family (g), ``flowformer``): Flowformer: Linearizing Transformers
with Conservation Flows.

Dimension key: B batch, T query length (n sinks), S key/value length (m sources), N query
heads, K kv heads (repeated to N: the flows are per query head), H q/k head dim, Hv value
head dim.

Attention read as a flow network from sources (values) to sinks (results) with capacities
φ(q_i)·φ(k_j), φ = sigmoid. Non-causal, per head::

    I_i = φ(q_i)·Σ_j φ(k_j)          incoming flow of sink i
    O_j = φ(k_j)·Σ_i φ(q_i)          outgoing flow of source j
    Î_i = φ(q_i)·Σ_j φ(k_j)/O_j      incoming flow with the outgoing flows conserved
    Ô_j = φ(k_j)·Σ_i φ(q_i)/I_i      outgoing flow with the incoming flows conserved
    V̂ = m·softmax_j(Ô) ⊙ V           competition (rescaled by the number of sources)
    out_i = σ(Î_i·n/m) · (φ(q_i)/I_i)·(φ(K)ᵀ V̂)     allocation ⊙ aggregation

The n/m inside the allocation gate (1 for self-attention) keeps Î's scale independent of
the lengths (Î ~ m/n); our choice where the catalog writes σ(Î).

Causal, sink i sees sources j <= i. The flows use the prefix each token ends, as means
(our reading of the paper's prefix-sum form; the per-token count normalisation is what makes
it track the non-causal formula on a prefix)::

    Ī_i = φ(q_i)·mean_(j<=i) φ(k_j)            Ō_j = φ(k_j)·mean_(i<=j) φ(q_i)
    Î_i = φ(q_i)·mean_(j<=i) φ(k_j)/Ō_j        Ô_j = φ(k_j)·mean_(i<=j) φ(q_i)/Ī_i
    out_i = σ(Î_i) · (φ(q_i)/(i·Ī_i))·Σ_(j<=i) i·softmax_(j'<=i)(Ô)_j φ(k_j) v_jᵀ

Recomputing the non-causal formula on the prefix [0, t] would use means over the whole
prefix (mean_(j<=t), mean_(i<=t)) and sinks i > j in Ô_j: no prefix sum gives that, so the
causal form equals it exactly only where those means do not change along the prefix
(stationary queries and keys: the test checks this), and approximates it otherwise.

The competition softmax over j <= i is a running normaliser: with L_i = logsumexp_(j<=i) Ô_j,
Σ_(j<=i) e^(Ô_j − L_i) φ(k_j) v_jᵀ is the linear recurrence S_i = e^(L_(i−1) − L_i) S_(i−1) +
e^(Ô_i − L_i) φ(k_i) v_iᵀ (every exponent <= 0): the chunked scalar-decay path of
``attn_jax.attention.linear.linear_attention``.

Implementations: ``"reference"`` — the flows summed on the materialised capacity matrix
φ(Q)φ(K)ᵀ ``[B, N, T, S]`` (causal: masked), O(T·S); ``"xla"`` (default) — the factored form:
two matmuls non-causal, cumulative sums plus the chunked scalar-decay linear recurrence
causal, O(T). Packed documents (segment ids) and decoding with a carried state are not
built.
"""

import typing

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from attn_jax.attention import _checks, registry
from attn_jax.attention import linear as linear_lib

IMPLEMENTATIONS = ("reference", "xla")
PAPER = "Flowformer: Linearizing Transformers with Conservation Flows"


def _features(q, k, v):
  """φ(q), φ(k), v in float32 (at least), kv heads repeated to N."""
  dtype = jnp.promote_types(q.dtype, jnp.float32)
  N, K = q.shape[2], k.shape[2]
  fq, fk, v = jax.nn.sigmoid(q.astype(dtype)), jax.nn.sigmoid(k.astype(dtype)), v.astype(dtype)
  if K != N:
    fk, v = jnp.repeat(fk, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
  return fq, fk, v


def _safe(x):
  return jnp.maximum(x, jnp.finfo(x.dtype).tiny)


def _noncausal(fq, fk, v):
  n, m = fq.shape[1], fk.shape[1]
  inc = jnp.einsum("BTNH,BNH->BTN", fq, fk.sum(1))  # I
  out = jnp.einsum("BSNH,BNH->BSN", fk, fq.sum(1))  # O
  inc_hat = jnp.einsum("BTNH,BNH->BTN", fq, (fk / _safe(out)[..., None]).sum(1))  # Î
  out_hat = jnp.einsum("BSNH,BNH->BSN", fk, (fq / _safe(inc)[..., None]).sum(1))  # Ô
  v_hat = v * (m * jax.nn.softmax(out_hat, axis=1))[..., None]
  kv = jnp.einsum("BSNH,BSNV->BNHV", fk, v_hat)
  agg = jnp.einsum("BTNH,BNHV->BTNV", fq / _safe(inc)[..., None], kv)
  return jax.nn.sigmoid(inc_hat * (n / m))[..., None] * agg


def _causal(fq, fk, v, chunk_size: int):
  T = fq.shape[1]
  count = jnp.arange(1, T + 1, dtype=fq.dtype)[None, :, None]  # [1, T, 1]
  inc_bar = jnp.einsum("BTNH,BTNH->BTN", fq, jnp.cumsum(fk, 1)) / count  # Ī
  out_bar = jnp.einsum("BTNH,BTNH->BTN", fk, jnp.cumsum(fq, 1)) / count  # Ō
  inc_hat = jnp.einsum("BTNH,BTNH->BTN", fq, jnp.cumsum(fk / _safe(out_bar)[..., None], 1))
  out_hat = jnp.einsum("BTNH,BTNH->BTN", fk, jnp.cumsum(fq / _safe(inc_bar)[..., None], 1))
  inc_hat, out_hat = inc_hat / count, out_hat / count
  lse = jax.lax.cumlogsumexp(out_hat, axis=1)  # L_i, [B, T, N]
  log_decay = jnp.concatenate([jnp.zeros_like(lse[:, :1]), lse[:, :-1] - lse[:, 1:]], axis=1)
  k_w = fk * jnp.exp(out_hat - lse)[..., None]
  q_w = fq * (1.0 / _safe(inc_bar))[..., None]  # φ(q_i)/(i·Ī_i) · i
  agg = linear_lib.linear_attention(
    q_w, k_w, v, log_decay, scale=1.0, chunk_size=chunk_size, implementation="xla"
  )
  return jax.nn.sigmoid(inc_hat)[..., None] * agg


def materialised(q, k, v, *, causal: bool = False):
  """The flows summed on the capacity matrix A = φ(Q)·φ(K)ᵀ ``[B, N, T, S]`` (the oracle)."""
  fq, fk, v = _features(q, k, v)
  A = jnp.einsum("BTNH,BSNH->BNTS", fq, fk)
  T, S = A.shape[-2:]
  if not causal:
    inc, out = A.sum(-1), A.sum(-2)  # [B, N, T], [B, N, S]
    inc_hat = (A / out[..., None, :]).sum(-1)
    out_hat = (A / inc[..., :, None]).sum(-2)
    comp = S * jax.nn.softmax(out_hat, axis=-1)[..., None, :]  # [B, N, 1, S]
    agg = jnp.einsum("BNTS,BSNV->BTNV", A / inc[..., None] * comp, v)
    return jax.nn.sigmoid(inc_hat * (T / S)).transpose(0, 2, 1)[..., None] * agg
  sees = jnp.tril(jnp.ones((T, S), bool))  # sink i sees source j <= i
  count = jnp.arange(1, T + 1, dtype=A.dtype)
  upper = sees.T  # [i, j]: i <= j, the sinks that count in source j's outgoing flow
  inc_bar = jnp.where(sees, A, 0).sum(-1) / count  # Ī_i
  out_bar = jnp.where(upper, A, 0).sum(-2) / count  # Ō_j
  inc_hat = jnp.where(sees, A / out_bar[..., None, :], 0).sum(-1) / count
  out_hat = jnp.where(upper, A / inc_bar[..., :, None], 0).sum(-2) / count
  logits = jnp.where(sees, out_hat[..., None, :], -jnp.inf)  # [B, N, T, S]
  comp = count[:, None] * jax.nn.softmax(logits, axis=-1)
  weights = jnp.where(sees, A / (count * inc_bar)[..., None], 0) * comp
  agg = jnp.einsum("BNTS,BSNV->BTNV", weights, v)
  return jax.nn.sigmoid(inc_hat).transpose(0, 2, 1)[..., None] * agg


@typing.no_type_check
def flowformer_attention(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K Hv"],
  *,
  causal: bool = False,
  chunk_size: int = 64,
  implementation: str | None = None,
):
  """Flow-Attention (Flowformer: Linearizing Transformers with Conservation Flows); see the
  module docstring.

  Args:
    q, k, v: ``[B, T, N, H]``, ``[B, S, K, H]``, ``[B, S, K, Hv]`` (N % K == 0).
    causal: the prefix-sum form (self-attention: S == T) or the non-causal formula.
    chunk_size: C of the chunked recurrence behind the causal "xla" path.
    implementation: "reference" (flows on the materialised capacity matrix) or "xla"
      (factored, linear in T; default).

  Returns:
    ``out [B, T, N, Hv]`` in q's dtype.
  """
  dims = _checks.check_qkv(q, k, v)
  if not isinstance(causal, bool):
    raise ValueError(f"causal must be a bool; got {causal!r}")
  if causal and dims.S != dims.T:
    raise ValueError(f"causal flowformer is self-attention: needs S == T; got {dims.T=}, {dims.S=}")
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; got {implementation!r}")
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be an int >= 1; got {chunk_size!r}")
  if implementation == "reference":
    out = materialised(q, k, v, causal=causal)
  elif causal:
    out = _causal(*_features(q, k, v), chunk_size)
  else:
    out = _noncausal(*_features(q, k, v))
  return out.astype(q.dtype)


def _build(key, dims, causal):
  del key, dims
  return {"causal": causal, "chunk_size": 8}


registry.register(
  registry.Mechanism(
    id="flowformer",
    family="g",
    paper=PAPER,
    entry_point="attn_jax.attention.flowformer:flowformer_attention",
    implementations=IMPLEMENTATIONS,
    patterns=frozenset((registry.SELF, registry.SELF_CAUSAL, registry.CROSS)),
    decode=False,
    tier=2,
    check="The causal prefix-sum version equals the flows summed on the masked capacity matrix "
    "(forward and gradients), and equals recomputing the non-causal formula on each prefix "
    "wherever the prefix means it uses are exact (stationary queries and keys; in general it "
    "approximates it). The non-causal factored form equals the materialised flows.",
    build=_build,
    module="attn_jax.nn.flowformer:FlowAttention",
  )
)
