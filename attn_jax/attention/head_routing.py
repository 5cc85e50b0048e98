"""Routing over attention heads (catalog family (d) besides ``moh``), as pure JAX functions.

Mechanisms (registry ids) and papers:
  * ``moa`` — "Mixture of Attention Heads: Selecting Attention Heads Per Token".
  * ``mae_h1`` — "A Mixture of h-1 Heads is Better than h Heads".

Dimension key: B batch, T query length, S key/value length, D model dim, E attention experts
(MoA) or N heads (MAE), H head dim, Hv value head dim, k experts kept per token.

**moa.** E experts, each with its own query and output projection, share one key and one value
projection (one kv head)::

    p_t = softmax(x_t W_g) ∈ R^E,   w_t,e = p_t,e / Σ_(e'∈topk(p_t)) p_t,e'   for e ∈ topk(p_t)
    y_t = Σ_(e∈topk(p_t)) w_t,e · softmax_s(q_t^e · k_s / sqrt(H)) V · W_O^e,  q_t^e = x_t W_Q^e

Our reading where the accounts differ: the kept probabilities are renormalised over the k
kept experts (a softmax over the top-k logits). Auxiliary losses: load balance
``E Σ_e f_e P_e`` (f_e the fraction of (token, slot) pairs sent to expert e, P_e its mean
router probability; 1 for a uniform router) and the router z-loss ``mean_t (log Σ_e
exp(x_t W_g)_e)²``. What is saved: the k selected queries of every token are gathered into one
MQA call with k query heads against the shared kv head, so attention costs k heads instead of
E; the query and output projections are computed densely over all E experts (a per-token
gather of the expert weights would move more memory than it saves at these sizes).
``moa_dense`` (all E heads, gates zero outside the top-k) is the oracle the gathered path
equals.

**mae_h1.** N heads; expert i is the layer without head i, rescaled by N/(N−1); a gate
g = softmax(W_g · pooled(x)) mixes the experts. Since Σ_i g_i = 1,

    y = Σ_i g_i · (N/(N−1)) Σ_(j≠i) o_j W_O,j = Σ_j (N/(N−1)) (1 − g_j) · o_j W_O,j,

a reweighting of head outputs, computed as one attention call whose per-head outputs are
scaled. ``pooled`` is the mean of the (query-side) tokens over the sequence when
bidirectional; when causal it is the running mean up to t (our choice: a whole-sequence pool
would let every token see the future), which makes the gate per token. The pool spans the
whole row: packed documents share it. The paper trains by block coordinate descent
(alternating gate and expert updates); attn_jax trains gate and experts jointly (not built).
A uniform gate (1/N) gives exactly the plain multi-head layer.

The projections are those of ``attn_jax.attention.heads`` (``w_q [D, E|N, H]``, ``w_k [D, K,
H]``, ``w_v [D, K, Hv]``, ``w_o [E|N, Hv, D]``; MoA has K = 1) plus ``w_gate [D, E|N]``.
"""

import functools
import typing

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from attn_jax.attention import api as api_lib
from attn_jax.attention import heads as heads_lib
from attn_jax.attention import registry

PAPERS = {
  "moa": "Mixture of Attention Heads: Selecting Attention Heads Per Token",
  "mae_h1": "A Mixture of h-1 Heads is Better than h Heads",
}
_BASE = ("w_q", "w_k", "w_v", "w_o")


def _dims(params, kind: str) -> heads_lib.StaticDims:
  want = set(_BASE) | {"w_gate"}
  if not isinstance(params, dict) or set(params) != want:
    got = sorted(params) if isinstance(params, dict) else type(params)
    raise ValueError(f"{kind} params must hold {sorted(want)}; got {got}")
  dims = heads_lib.static_dims({k: params[k] for k in _BASE}, "mqa" if kind == "moa" else "gqa")
  gate = tuple(np.shape(params["w_gate"]))
  if gate != (dims.D, dims.N):
    raise ValueError(f"params['w_gate'] must have shape {(dims.D, dims.N)}; got {gate}")
  if kind == "mae_h1" and dims.N < 2:
    raise ValueError(f"mae_h1 needs at least 2 heads (experts drop one head each); got N={dims.N}")
  return dims


def _base(params) -> dict:
  return {k: params[k] for k in _BASE}


def _float(x):
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# ---------------------------------------------------------------------------------------
# moa
# ---------------------------------------------------------------------------------------


def moa_route(
  params, x_BTD: Float[Array, "B T D"], *, moa_top_k: int | None = None
) -> tuple[Float[Array, "B T k"], Int[Array, "B T k"], dict]:
  """Per-token kept weights ``w [B, T, k]`` (sum 1), expert indices ``[B, T, k]`` and
  ``{"load_balance", "z_loss"}``."""
  dims = _dims(params, "moa")
  E = dims.N
  k = heads_lib._opt("moa_top_k", moa_top_k, max(1, E // 2))
  if k > E:
    raise ValueError(f"moa_top_k must be <= the experts E={E}; got {k}")
  x = _float(x_BTD)
  logits_BTE = x @ params["w_gate"].astype(x.dtype)
  probs_BTE = jax.nn.softmax(logits_BTE, -1)
  top_BTk, idx_BTk = jax.lax.top_k(probs_BTE, k)
  w_BTk = top_BTk / jnp.sum(top_BTk, -1, keepdims=True)
  frac_E = jnp.sum(jax.nn.one_hot(idx_BTk, E, dtype=x.dtype), -2).reshape(-1, E).mean(0) / k
  prob_E = probs_BTE.reshape(-1, E).mean(0)
  aux = {
    "load_balance": E * jnp.sum(frac_E * prob_E),
    "z_loss": jnp.mean(jax.nn.logsumexp(logits_BTE, -1) ** 2),
  }
  return w_BTk, idx_BTk, aux


def moa_gates(w_BTk, idx_BTk, num_experts: int) -> Float[Array, "B T E"]:
  """The dense gates ``[B, T, E]``: w at the kept experts, 0 elsewhere."""
  return jnp.einsum("BTk,BTkE->BTE", w_BTk, jax.nn.one_hot(idx_BTk, num_experts, dtype=w_BTk.dtype))


def _moa_call(params, x_BTD, context_BSD, causal, mask, positions_BT, rope, moa_top_k):
  dims = _dims(params, "moa")
  call = heads_lib._check_call(dims.D, x_BTD, context_BSD, causal, mask, positions_BT, rope)
  w_BTk, idx_BTk, aux = moa_route(params, x_BTD, moa_top_k=moa_top_k)
  return dims, call, w_BTk, idx_BTk, aux


@typing.no_type_check
def moa(
  params,
  x_BTD: Float[Array, "B T D"],
  *,
  context_BSD: Float[Array, "B S D"] | None = None,
  causal: bool,
  implementation: str | None = None,
  mask=None,
  positions_BT: Int[Array, "B T"] | None = None,
  rope=None,
  return_aux: bool = False,
  moa_top_k: int | None = None,
):
  """Mixture of attention heads (Mixture of Attention Heads: Selecting Attention Heads Per
  Token): each token's k routed experts as one MQA call against the shared kv head.

  See the module docstring for the equations. ``return_aux`` adds ``{"load_balance": scalar,
  "z_loss": scalar, "gates": [B, T, E]}``.

  Args:
    params: ``init_moa`` pytree (``w_q [D, E, H]``, ``w_k [D, 1, H]``, ``w_v [D, 1, Hv]``,
      ``w_o [E, Hv, D]``, ``w_gate [D, E]``).
    x_BTD, context_BSD, causal, implementation, mask, positions_BT, rope: as every layer
      function (``attn_jax.attention.heads``).
    moa_top_k: experts kept per token (default -1/None: E // 2, at least 1).
  """
  dims, call, w_BTk, idx_BTk, aux = _moa_call(
    params, x_BTD, context_BSD, causal, mask, positions_BT, rope, moa_top_k
  )
  base = _base(params)
  q_BTEH, k_BS1H, v_BS1V = heads_lib._static_qkv(base, x_BTD, call.src_BSD, call)
  q_BTkH = jnp.take_along_axis(q_BTEH, idx_BTk[..., None], axis=2)
  o_BTkV = api_lib.dot_product_attention(
    q_BTkH, k_BS1H, v_BS1V, mask=call.mask, implementation=implementation
  )
  sel_BTkE = jax.nn.one_hot(idx_BTk, dims.N, dtype=o_BTkV.dtype) * w_BTk[..., None].astype(
    o_BTkV.dtype
  )
  y = heads_lib.output_projection(base, jnp.einsum("BTkE,BTkV->BTEV", sel_BTkE, o_BTkV))
  aux["gates"] = moa_gates(w_BTk, idx_BTk, dims.N)
  return heads_lib._finish(y, aux, return_aux)


@typing.no_type_check
def moa_dense(
  params,
  x_BTD: Float[Array, "B T D"],
  *,
  context_BSD: Float[Array, "B S D"] | None = None,
  causal: bool,
  implementation: str | None = None,
  mask=None,
  positions_BT: Int[Array, "B T"] | None = None,
  rope=None,
  moa_top_k: int | None = None,
) -> Float[Array, "B T D"]:
  """The dense form of ``moa``: all E experts attend, their outputs weighted by the gates
  (zero outside each token's top-k). Equal to ``moa``; E/k times the attention work."""
  dims, call, w_BTk, idx_BTk, _ = _moa_call(
    params, x_BTD, context_BSD, causal, mask, positions_BT, rope, moa_top_k
  )
  gates = moa_gates(w_BTk, idx_BTk, dims.N)
  return heads_lib.gated_heads(_base(params), x_BTD, gates, call, implementation)


# ---------------------------------------------------------------------------------------
# mae_h1
# ---------------------------------------------------------------------------------------


def mae_gate(params, x_BTD: Float[Array, "B T D"], *, causal: bool) -> Float[Array, "B T N"]:
  """The expert gate ``g = softmax(W_g · pooled(x))``, broadcast to ``[B, T, N]`` (per
  sequence when bidirectional; the running mean's gate per token when causal)."""
  dims = _dims(params, "mae_h1")
  heads_lib._check_tokens("x_BTD", x_BTD, dims.D, "[B, T, D]")
  x = _float(x_BTD)
  T = x.shape[1]
  if causal:
    pooled = jnp.cumsum(x, axis=1) / jnp.arange(1, T + 1, dtype=x.dtype)[:, None]
  else:
    pooled = jnp.broadcast_to(jnp.mean(x, axis=1, keepdims=True), x.shape)
  return jax.nn.softmax(pooled @ params["w_gate"].astype(x.dtype), -1)


def mae_head_scales(gate_BTN: Float[Array, "B T N"]) -> Float[Array, "B T N"]:
  """Head j's weight in the mixture of the N leave-one-out experts: (N/(N−1)) (1 − g_j)."""
  N = gate_BTN.shape[-1]
  return (N / (N - 1)) * (1.0 - gate_BTN)


@typing.no_type_check
def mae_h1(
  params,
  x_BTD: Float[Array, "B T D"],
  *,
  context_BSD: Float[Array, "B S D"] | None = None,
  causal: bool,
  implementation: str | None = None,
  mask=None,
  positions_BT: Int[Array, "B T"] | None = None,
  rope=None,
  return_aux: bool = False,
):
  """Mixture of attentive experts (A Mixture of h-1 Heads is Better than h Heads) in its
  reweighting form: one attention call, head j scaled by (N/(N−1)) (1 − g_j).

  ``return_aux`` adds ``{"gate": [B, T, N]}``. Arguments as ``moa`` (params ``init_mae_h1``:
  the GQA projections and ``w_gate [D, N]``).
  """
  dims = _dims(params, "mae_h1")
  call = heads_lib._check_call(dims.D, x_BTD, context_BSD, causal, mask, positions_BT, rope)
  gate = mae_gate(params, x_BTD, causal=causal)
  y = heads_lib.gated_heads(_base(params), x_BTD, mae_head_scales(gate), call, implementation)
  return heads_lib._finish(y, {"gate": gate}, return_aux)


# ---------------------------------------------------------------------------------------
# Parameters and registry entries.
# ---------------------------------------------------------------------------------------


def param_specs(
  kind: str,
  *,
  d_model: int,
  num_heads: int,
  num_kv_heads: int | None = None,
  head_dim: int | None = None,
  v_head_dim: int | None = None,
) -> dict:
  """``{name: (shape, init, logical_axes)}``: moa the MQA projections with E = ``num_heads``
  experts (``num_kv_heads`` must be None/-1/1); mae_h1 the GQA projections (K default N).
  The gate starts near 0 (near-uniform routing)."""
  if kind not in PAPERS:
    raise ValueError(f"kind must be one of {tuple(PAPERS)}; got {kind!r}")
  N = heads_lib._int("num_heads", num_heads, 2 if kind == "mae_h1" else 1)
  if kind == "moa":
    if heads_lib._opt("num_kv_heads", num_kv_heads, 1) != 1:
      raise ValueError(f"moa shares one key and one value head; got num_kv_heads={num_kv_heads}")
    base_kind = "mqa"
  else:
    base_kind = "head_dims"
  specs = heads_lib.param_specs(
    base_kind,
    d_model=d_model,
    num_heads=N,
    num_kv_heads=num_kv_heads,
    head_dim=head_dim,
    v_head_dim=v_head_dim,
  )
  D = specs["w_q"][0][0]
  specs["w_gate"] = ((D, N), heads_lib._normal_init(D**-0.5), ("embed", None))
  return specs


init_moa = heads_lib.make_init(
  "moa", ("v_head_dim", "moa_top_k"), functools.partial(param_specs, "moa"), ("moa_top_k",)
)
init_mae_h1 = heads_lib.make_init(
  "mae_h1", ("v_head_dim",), functools.partial(param_specs, "mae_h1")
)


CHECKS = {
  "moa": "The dense reference (all E experts × gates) equals the gathered top-k path. (Load "
  "balance and router z-loss are returned; the NNX layer sows their sum as aux_loss.)",
  "mae_h1": "A uniform gate (1/N) equals MHA. The mixture form equals the reweighting form. "
  "(Causal: the pool is the running mean. Block coordinate descent training not built.)",
}

for _kind in PAPERS:
  registry.register(
    registry.Mechanism(
      id=_kind,
      family="d",
      paper=PAPERS[_kind],
      entry_point=f"attn_jax.attention.head_routing:{_kind}",
      implementations=registry.KERNEL_IMPLEMENTATIONS,
      patterns=registry.ALL_PATTERNS,
      decode=False,
      tier=2,
      check=CHECKS[_kind],
      build=registry.build_nothing,
      module=f"attn_jax.nn.head_routing:{'MoAAttention' if _kind == 'moa' else 'MAEAttention'}",
      interface="layer",
      init=f"attn_jax.attention.head_routing:init_{_kind}",
    )
  )
