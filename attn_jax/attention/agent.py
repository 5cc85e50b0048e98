"""Agent attention (catalog family (g), ``agent_attn``): Agent Attention: On the Integration
of Softmax and Linear Attention.

Dimension key: B batch, T query length, S key/value length, N query heads, K kv heads, H
q/k head dim, Hv value head dim, n agents (``A`` in einsums), P bias anchor points, W the
depthwise-conv width.

Agents are the queries adaptively average-pooled from T to n tokens (agent a averages the
queries [⌊a·T/n⌋, ⌈(a+1)·T/n⌉)). Per head, with scale s = H^-1/2::

    V_A = softmax(A·Kᵀ·s + B1)·V          aggregation: the agents attend to the keys
    O   = softmax(Q·Aᵀ·s + B2)·V_A + DWC(V)     broadcast: the queries attend to the agents

B1 ``[N, n, S]`` and B2 ``[N, T, n]`` are the agent biases (the paper builds them from small
learned position tables interpolated to the image grid; ``interpolate_bias`` does the 1-D
version: a table of P anchors, linearly interpolated to the length). DWC is a depthwise 1-D
convolution over the sequence on V (width W, zero padding, per kv head and channel; the
paper's is a 3×3 conv on the image grid). Our choices where the catalog says "verify".

The same output is a generalised linear attention O = φ_q(Q)·(φ_k(K)ᵀ·V) + DWC(V) with
φ_q(q_i) = softmax_a(q_i·A_aᵀ·s + B2_ia) ∈ R^n and φ_k(k_j)_a = softmax_j(A_a·k_jᵀ·s + B1_aj)
(``agent_features``, ``agent_attention_linear``): no T×S map exists, cost O((T + S)·n·H).

Non-causal only (the agents pool every query). Cross-attention (S != T) is allowed without
DWC. Implementations: ``"reference"`` and ``"xla"`` make the two short softmax-attention
calls with ``dot_product_attention`` of that implementation.
"""

import typing

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from attn_jax.attention import _checks, registry
from attn_jax.attention.api import dot_product_attention

IMPLEMENTATIONS = ("reference", "xla")
PAPER = "Agent Attention: On the Integration of Softmax and Linear Attention"


def pool_matrix(length: int, num_agents: int) -> np.ndarray:
  """``[n, length]`` float32: adaptive average pooling of ``length`` tokens to n agents."""
  P = np.zeros((num_agents, length), np.float32)
  for a in range(num_agents):
    lo, hi = (a * length) // num_agents, -(-((a + 1) * length) // num_agents)
    P[a, lo:hi] = 1.0 / (hi - lo)
  return P


def interpolate_bias(table, length: int):
  """``[..., P]`` anchor values, linearly interpolated (anchors at both ends) to
  ``[..., length]``."""
  P = table.shape[-1]
  x = np.linspace(0.0, P - 1.0, length) if length > 1 else np.zeros((1,))
  hat = np.maximum(0.0, 1.0 - np.abs(x[:, None] - np.arange(P)[None, :]))  # [length, P]
  return jnp.einsum("...P,LP->...L", table, jnp.asarray(hat, table.dtype))


def depthwise_conv(v_BSKV, weight_WKV):
  """Σ_r w_r ⊙ v_(t + r − W//2) over the sequence (zero padding; W odd)."""
  W = weight_WKV.shape[0]
  S = v_BSKV.shape[1]
  pad = jnp.pad(v_BSKV, ((0, 0), (W // 2, W // 2), (0, 0), (0, 0)))
  return sum(pad[:, r : r + S] * weight_WKV[r].astype(v_BSKV.dtype) for r in range(W))


class _Call(typing.NamedTuple):
  agents: Array  # [B, n, N, H]
  bias1: Array | None  # [1, N, n, S]
  bias2: Array | None  # [1, N, T, n]
  dwc: Array | None  # [B, T, N, Hv]
  scale: float


def _prepare(q, k, v, num_agents, agent_bias1, agent_bias2, dwc_weight, scale) -> _Call:
  dims = _checks.check_qkv(q, k, v)
  B, T, S, N, K, H, Hv = dims
  if isinstance(num_agents, bool) or not isinstance(num_agents, int | np.integer):
    raise ValueError(f"num_agents must be an int >= 1; got {num_agents!r}")
  if num_agents < 1:
    raise ValueError(f"num_agents must be >= 1; got {num_agents}")
  n = int(num_agents)
  agents = jnp.einsum("AT,BTNH->BANH", jnp.asarray(pool_matrix(T, n), q.dtype), q)
  biases = []
  for name, b, shape in (
    ("agent_bias1", agent_bias1, (N, n, S)),
    ("agent_bias2", agent_bias2, (N, T, n)),
  ):
    if b is not None:
      b = jnp.asarray(b)
      if b.shape not in (shape, (B,) + shape) or not jnp.issubdtype(b.dtype, jnp.floating):
        raise ValueError(f"{name} must be a float array {shape} or {(B,) + shape}; got {b.shape}")
      b = b if b.ndim == 4 else b[None]
    biases.append(b)
  dwc = None
  if dwc_weight is not None:
    w = jnp.asarray(dwc_weight)
    if w.ndim != 3 or w.shape[1:] != (K, Hv) or w.shape[0] % 2 == 0:
      raise ValueError(f"dwc_weight must be [W, K={K}, Hv={Hv}] with W odd; got {w.shape}")
    if S != T:
      raise ValueError(f"the DWC(V) term needs S == T (self-attention); got {T=}, {S=}")
    dwc = depthwise_conv(v, w)
    dwc = jnp.repeat(dwc, N // K, axis=2) if K != N else dwc
  scale = H**-0.5 if scale is None else float(scale)
  return _Call(agents, biases[0], biases[1], dwc, scale)


@typing.no_type_check
def agent_attention(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K Hv"],
  *,
  num_agents: int = 49,
  agent_bias1=None,
  agent_bias2=None,
  dwc_weight=None,
  scale: float | None = None,
  causal: bool = False,
  implementation: str | None = None,
):
  """Agent attention as two short softmax-attention calls; see the module docstring.

  Args:
    q, k, v: ``[B, T, N, H]``, ``[B, S, K, H]``, ``[B, S, K, Hv]`` (N % K == 0).
    num_agents: n, the number of pooled-query agents.
    agent_bias1: B1 ``[N, n, S]`` (or ``[B, N, n, S]``), added to the agents' logits.
    agent_bias2: B2 ``[N, T, n]`` (or ``[B, N, T, n]``), added to the queries' logits.
    dwc_weight: ``[W, K, Hv]`` depthwise-conv weights on V (W odd; self-attention only), or
      None for no DWC term.
    scale: the logit scale of both calls (default H^-1/2).
    causal: must be False (the agents pool every query).
    implementation: "reference" or "xla" (default), for both attention calls.

  Returns:
    ``out [B, T, N, Hv]`` in q's dtype.
  """
  if causal is not False:
    raise ValueError("agent_attn is non-causal only: its agents pool every query (causal=False)")
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; got {implementation!r}")
  c = _prepare(q, k, v, num_agents, agent_bias1, agent_bias2, dwc_weight, scale)
  impl = implementation or "xla"
  v_agents = dot_product_attention(
    c.agents, k, v, bias=c.bias1, scale=c.scale, implementation=impl
  )  # [B, n, N, Hv]
  out = dot_product_attention(
    q, c.agents, v_agents, bias=c.bias2, scale=c.scale, implementation=impl
  )
  if c.dwc is not None:
    out = out + c.dwc.astype(out.dtype)
  return out.astype(q.dtype)


def agent_features(
  q, k, v, *, num_agents: int = 49, agent_bias1=None, agent_bias2=None, scale=None
):
  """The feature maps of the linear-attention reading: (φ_q(Q) ``[B, T, N, n]``, rows sum to
  1; φ_k(K) ``[B, S, N, n]``, each agent's column sums to 1 over the keys)."""
  c = _prepare(q, k, v, num_agents, agent_bias1, agent_bias2, None, scale)
  dtype = jnp.promote_types(q.dtype, jnp.float32)
  N, K = q.shape[2], k.shape[2]
  kr = jnp.repeat(k, N // K, axis=2) if K != N else k
  agents = c.agents.astype(dtype)
  lq = jnp.einsum("BTNH,BANH->BTNA", q.astype(dtype), agents) * c.scale
  lk = jnp.einsum("BSNH,BANH->BSNA", kr.astype(dtype), agents) * c.scale
  if c.bias2 is not None:
    lq = lq + jnp.moveaxis(c.bias2, 1, 2)  # [B, T, N, n]
  if c.bias1 is not None:
    lk = lk + jnp.moveaxis(c.bias1, (1, 2, 3), (2, 3, 1))  # [B, S, N, n]
  return jax.nn.softmax(lq, axis=-1), jax.nn.softmax(lk, axis=1)


def agent_attention_linear(
  q, k, v, *, num_agents: int = 49, agent_bias1=None, agent_bias2=None, dwc_weight=None, scale=None
):
  """The generalised linear-attention form φ_q(Q)·(φ_k(K)ᵀ·V) + DWC(V) (same arguments as
  ``agent_attention``)."""
  phi_q, phi_k = agent_features(
    q, k, v, num_agents=num_agents, agent_bias1=agent_bias1, agent_bias2=agent_bias2, scale=scale
  )
  c = _prepare(q, k, v, num_agents, None, None, dwc_weight, scale)
  N, K = q.shape[2], k.shape[2]
  vr = jnp.repeat(v, N // K, axis=2) if K != N else v
  kv = jnp.einsum("BSNA,BSNV->BNAV", phi_k, vr.astype(phi_k.dtype))  # [B, N, n, Hv]
  out = jnp.einsum("BTNA,BNAV->BTNV", phi_q, kv)
  if c.dwc is not None:
    out = out + c.dwc.astype(out.dtype)
  return out.astype(q.dtype)


def _build(key, dims, causal):
  del causal
  n = 5
  k1, k2, k3 = jax.random.split(key, 3)
  kwargs = {
    "num_agents": n,
    "agent_bias1": 0.5 * jax.random.normal(k1, (dims.N, n, dims.S), jnp.float32),
    "agent_bias2": 0.5 * jax.random.normal(k2, (dims.N, dims.T, n), jnp.float32),
  }
  if dims.S == dims.T:
    kwargs["dwc_weight"] = jax.random.normal(k3, (3, dims.K, dims.Hv), jnp.float32) / 3
  return kwargs


registry.register(
  registry.Mechanism(
    id="agent_attn",
    family="g",
    paper=PAPER,
    entry_point="attn_jax.attention.agent:agent_attention",
    implementations=IMPLEMENTATIONS,
    patterns=frozenset((registry.SELF, registry.CROSS)),
    decode=False,
    tier=2,
    check="The two-softmax form equals its generalised linear-attention rewrite "
    "φ_q(Q)·(φ_k(K)ᵀ·V) + DWC(V) (rows of φ_q·φ_kᵀ sum to 1). No T×T intermediate exists in "
    "the traced program: cost grows linearly in T for fixed n.",
    build=_build,
    module="attn_jax.nn.agent:AgentAttention",
  )
)
