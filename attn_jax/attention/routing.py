"""Routing attention with online k-means (catalog family (f), ``routing_transformer``) as a
pure JAX function.

"Efficient Content-Based Sparse Attention with Routing Transformers".

Dimension key: B batch, T length (causal self-attention, T = S), N query heads, K kv heads
(G = N // K), H head dim, Hv value head dim, C clusters (≈ √T), w = T // C members per
cluster.

Queries and keys are layer-normalised (per vector, no parameters) for routing only, and
scored against C centroids μ ``[N, C, H]`` per head. Balanced clusters: each centroid takes
its w nearest queries and its w nearest keys (top-w of μ_c · x̂). Inside a cluster the w
queries attend to the cluster's w keys with ordinary scaled softmax attention, causal by
original position (key position <= query position). A query routed to several clusters
merges its per-cluster results by their log-sum-exps (as one softmax over the union of
their keys, a key present in two of them counted twice); a query routed nowhere gets 0.
Routing is a selection: no gradient flows through the assignment.

Causality caveat: the causal mask holds inside each cluster, but the balanced top-w
membership is chosen over the whole sequence, so WHICH earlier keys a query sees depends
on later tokens (on random inputs, replacing the tokens after position t changed outputs at
positions <= t by up to 1.5). Training with it is therefore not equivalent to generating
token by token (the registry marks it decode=False).

``routing_mode="nearest"`` is the strictly causal variant: every query and key goes to its
nearest centroid on its own (argmax μ_c · x̂), and query i sees key j iff both went to the
same centroid and j <= i, optionally also the last ``routing_window`` keys (a local window
in the same head; the paper mixes local and routing heads instead). Nothing a query sees
depends on later tokens. Clusters are unbalanced: a query whose cluster holds no earlier
key (and no window) gets 0. It runs as one masked ``dot_product_attention`` call with a
``GroupMask`` (cluster ids, identity table) over (example, head) pairs folded into the
batch: O(T²) work on the blocked path, which skips only tiles whose queries and keys share
no cluster (tokens are not sorted by cluster).

Centroids follow the queries and keys assigned to them. The paper updates them by an
exponential moving average (``ema_update``: μ ← λ μ + (1 − λ) · mean of the assigned
normalised queries and keys); the NNX kind instead learns μ by gradient on the same k-means
objective, ``kmeans_loss`` (the mean squared distance of each assigned normalised vector to
its centroid, with the vectors detached so only μ moves), sown as an auxiliary loss the
trainer adds with ``aux_loss_weight`` (the trainer has no non-gradient state updates).

Implementations: ``"xla"`` gathers the clusters (``[B, N, C, w, H]``) and attends densely
inside each: O(T·w) = O(T^1.5) work and memory; ``"reference"`` builds the T × S mask of every
cluster (O(C·T²)) and merges the same way: the oracle.

Checks: a single cluster (C = 1) is causal attention (both modes); gathering and scattering
back round-trips exactly; in nearest mode, changing later tokens leaves earlier outputs
unchanged.
"""

import typing

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from attn_jax.attention import _checks, registry
from attn_jax.attention import api as api_lib
from attn_jax.attention import masks as masks_lib

PAPER = "Efficient Content-Based Sparse Attention with Routing Transformers"
IMPLEMENTATIONS = ("reference", "xla")
MODES = ("balanced", "nearest")


def normalize(x):
  """Per-vector layer norm without parameters (float32)."""
  x = x.astype(jnp.float32)
  x = x - x.mean(-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)


def _scores(x_BTnH, centroids_NCH) -> Float[Array, "B N T C"]:
  """μ_c · x̂ per head (detached): x has N heads (queries) or K heads (repeated to N)."""
  N = centroids_NCH.shape[0]
  xn = normalize(jax.lax.stop_gradient(x_BTnH))
  xn = jnp.repeat(xn, N // xn.shape[2], axis=2)
  mu = jax.lax.stop_gradient(centroids_NCH).astype(xn.dtype)
  return jnp.einsum("BTNH,NCH->BNTC", xn, mu)


def route(x_BTnH, centroids_NCH, w: int) -> Int[Array, "B N C w"]:
  """Per head and centroid the positions of its w nearest vectors (sorted by position)."""
  _, idx = jax.lax.top_k(_scores(x_BTnH, centroids_NCH).swapaxes(-1, -2), w)
  return jnp.sort(idx, axis=-1).astype(jnp.int32)


def assign(x_BTnH, centroids_NCH) -> Int[Array, "B N T"]:
  """Per head, each vector's nearest centroid (largest μ_c · x̂), chosen on its own."""
  return jnp.argmax(_scores(x_BTnH, centroids_NCH), axis=-1).astype(jnp.int32)


def _merge(outs_BNCwV, lses_BNCw, q_idx_BNCw, T):
  """Scatters per-cluster results back to positions, merged by log-sum-exp."""
  B, N, C, w, V = outs_BNCwV.shape
  flat_idx = q_idx_BNCw.reshape(B, N, C * w)
  lse = lses_BNCw.reshape(B, N, C * w)
  top = (
    jnp.full((B, N, T), -jnp.inf)
    .at[jnp.arange(B)[:, None, None], jnp.arange(N)[None, :, None], flat_idx]
    .max(lse)
  )
  top_safe = jnp.where(jnp.isfinite(top), top, 0.0)
  wgt = jnp.exp(lse - jnp.take_along_axis(top_safe, flat_idx, axis=-1))  # [B, N, C·w]
  bi, ni = jnp.arange(B)[:, None, None], jnp.arange(N)[None, :, None]
  den = jnp.zeros((B, N, T)).at[bi, ni, flat_idx].add(wgt)
  num = (
    jnp.zeros((B, N, T, V))
    .at[bi, ni, flat_idx]
    .add(wgt[..., None] * outs_BNCwV.reshape(B, N, C * w, V))
  )
  return num / jnp.where(den > 0, den, 1.0)[..., None]


@typing.no_type_check
def routing_attention(
  q_BTNH: Float[Array, "B T N H"],
  k_BTKH: Float[Array, "B T K H"],
  v_BTKV: Float[Array, "B T K Hv"],
  *,
  centroids: Float[Array, "N C H"],
  routing_mode: str = "balanced",
  routing_window: int = 0,
  return_routes: bool = False,
  implementation: str | None = None,
):
  """Routing attention (causal self-attention); see the module docstring.

  Args:
    q_BTNH, k_BTKH, v_BTKV: T == S.
    centroids: μ ``[N, C, H]``; balanced mode: w = T // C members per cluster (C <= T).
    routing_mode: "balanced" (top-w per centroid over the sequence; not causal in what a
      query sees) or "nearest" (each token to its nearest centroid; strictly causal).
    routing_window: nearest mode only: also see the last ``routing_window`` keys (0: none).
    return_routes: also return ``(q_routes, k_routes)``: balanced, int ``[B, N, C, w]``
      positions per centroid; nearest, int ``[B, N, T]`` centroid per position.
    implementation: "xla" (default: gathered clusters, or the blocked path under a group
      mask in nearest mode) or "reference" (dense masks).
  """
  dims = _checks.check_qkv(q_BTNH, k_BTKH, v_BTKV)
  if dims.S != dims.T:
    raise ValueError(f"routing attention is causal self-attention: needs S == T; got {dims}")
  if getattr(centroids, "ndim", None) != 3 or centroids.shape[0] != dims.N:
    raise ValueError(
      f"centroids must be [N, C, H] with N={dims.N}, H={dims.H}; got "
      f"{getattr(centroids, 'shape', centroids)}"
    )
  if centroids.shape[2] != dims.H or not 1 <= centroids.shape[1] <= dims.T:
    raise ValueError(f"centroids must be [N, C, H] with 1 <= C <= T={dims.T}, H={dims.H}")
  impl = implementation or "xla"
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; got {impl!r}")
  if routing_mode not in MODES:
    raise ValueError(f"routing_mode must be one of {MODES}; got {routing_mode!r}")
  if isinstance(routing_window, bool) or not isinstance(routing_window, (int, np.integer)):
    raise ValueError(f"routing_window must be an int >= 0; got {routing_window!r}")
  if routing_window < 0:
    raise ValueError(f"routing_window must be >= 0; got {routing_window}")
  if routing_window and routing_mode != "nearest":
    raise ValueError(
      "routing_window applies to routing_mode='nearest' only (balanced clusters are "
      f"attended as gathered blocks); got routing_window={routing_window} with "
      f"routing_mode={routing_mode!r}"
    )
  if routing_mode == "nearest":
    return _nearest(q_BTNH, k_BTKH, v_BTKV, centroids, int(routing_window), return_routes, impl)
  B, T, N, H = q_BTNH.shape
  G = N // dims.K
  C = centroids.shape[1]
  w = T // C
  q_routes = route(q_BTNH, centroids, w)
  k_routes = route(k_BTKH, centroids, w)
  dtype = jnp.promote_types(q_BTNH.dtype, jnp.float32)
  scale = 1.0 / float(np.sqrt(H))
  k_rep = jnp.repeat(k_BTKH.astype(dtype), G, axis=2)
  v_rep = jnp.repeat(v_BTKV.astype(dtype), G, axis=2)
  q = q_BTNH.astype(dtype)
  if impl == "xla":
    take = lambda x, r: jnp.take_along_axis(  # noqa: E731
      x.transpose(0, 2, 1, 3)[:, :, None], r[..., None], axis=3
    )  # [B, N, 1, T, X] gathered -> [B, N, C, w, X]
    qc, kc, vc = take(q, q_routes), take(k_rep, k_routes), take(v_rep, k_routes)
    s = jnp.einsum("BNCQH,BNCKH->BNCQK", qc, kc) * scale
    s = jnp.where(k_routes[..., None, :] <= q_routes[..., :, None], s, -jnp.inf)
    top = jnp.max(s, -1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    e = jnp.exp(s - top)
    total = e.sum(-1, keepdims=True)
    lse = jnp.where(
      total[..., 0] > 0, top[..., 0] + jnp.log(jnp.maximum(total[..., 0], 1e-30)), -jnp.inf
    )
    o = jnp.einsum("BNCQK,BNCKV->BNCQV", e / jnp.where(total > 0, total, 1.0), vc)
    out = _merge(o, lse, q_routes, T)
  else:
    pos = jnp.arange(T)
    in_q = (q_routes[..., None] == pos).any(-2)  # [B, N, C, T]
    in_k = (k_routes[..., None] == pos).any(-2)
    vis = in_q[..., :, None] & in_k[..., None, :] & (pos[None, :] <= pos[:, None])
    s = jnp.einsum("BTNH,BSNH->BNTS", q, k_rep)[:, :, None] * scale  # [B, N, 1, T, S]
    s = jnp.where(vis, s, -jnp.inf)
    lse_c = jax.nn.logsumexp(s, axis=-1)  # [B, N, C, T] (-inf where not routed / empty)
    lse = jax.nn.logsumexp(lse_c, axis=2)  # [B, N, T]
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    p = jnp.exp(s - lse_safe[:, :, None, :, None])  # merged weights, duplicates counted
    out = jnp.einsum("BNCTS,BSNV->BNTV", p, v_rep)
  out = out.transpose(0, 2, 1, 3).astype(q_BTNH.dtype)
  return (out, (q_routes, k_routes)) if return_routes else out


def _nearest(q_BTNH, k_BTKH, v_BTKV, centroids_NCH, window, return_routes, impl):
  """Nearest-centroid routing: same-cluster causal attention (plus a local window)."""
  B, T, N, _ = q_BTNH.shape
  C = centroids_NCH.shape[1]
  q_assign, k_assign = assign(q_BTNH, centroids_NCH), assign(k_BTKH, centroids_NCH)
  # (example, head) pairs folded into the batch: the cluster ids differ per head.
  mask = (
    masks_lib.GroupMask(
      q_assign.reshape(B * N, T), k_assign.reshape(B * N, T), table=jnp.eye(C, dtype=bool)
    )
    & masks_lib.CausalMask()
  )
  if window:
    mask = mask | masks_lib.sliding_window(window)
  out = api_lib.heads_folded_attention(q_BTNH, k_BTKH, v_BTKV, mask=mask, implementation=impl)
  return (out, (q_assign, k_assign)) if return_routes else out


def _routed_and_centre(x, r, centroids_NCH):
  """(normalised detached vectors routed by ``r``, the centroid each was routed to), same
  shape: ``r`` int [B, N, C, w] (balanced members) or [B, N, T] (nearest assignments)."""
  N = centroids_NCH.shape[0]
  xn = jax.lax.stop_gradient(normalize(x))
  xn = jnp.repeat(xn, N // x.shape[2], axis=2).transpose(0, 2, 1, 3)  # [B, N, T, H]
  if r.ndim == 4:
    members = jnp.take_along_axis(xn[:, :, None], r[..., None], axis=3)  # [B, N, C, w, H]
    return members, jnp.broadcast_to(centroids_NCH[None, :, :, None], members.shape)
  return xn, centroids_NCH[jnp.arange(N)[None, :, None], r]  # [B, N, T, H] both


def kmeans_loss(q_BTNH, k_BTKH, centroids_NCH, routes) -> Float[Array, ""]:
  """Mean squared distance of the routed (normalised, detached) queries and keys to their
  centroid; its gradient moves only the centroids. ``routes`` as returned by
  ``routing_attention(..., return_routes=True)`` in either mode."""
  total = 0.0
  for x, r in zip((q_BTNH, k_BTKH), routes, strict=True):
    members, centre = _routed_and_centre(x, r, centroids_NCH)
    total = total + jnp.mean(jnp.sum((members - centre) ** 2, -1))
  return total / 2


def ema_update(q_BTNH, k_BTKH, centroids_NCH, routes, decay: float = 0.999):
  """The paper's update: μ ← λ μ + (1 − λ) · mean of the routed normalised q and k (a
  non-gradient update). In nearest mode a centroid with no member keeps its value."""
  C = centroids_NCH.shape[1]
  total, count = 0.0, 0.0
  for x, r in zip((q_BTNH, k_BTKH), routes, strict=True):
    members, _ = _routed_and_centre(x, r, centroids_NCH)
    if r.ndim == 4:  # balanced: w members per centroid, q and k weighted equally
      total = total + members.mean((0, 3))  # [N, C, H]
      count = count + 1.0
    else:
      one_hot = jax.nn.one_hot(r, C, dtype=members.dtype)  # [B, N, T, C]
      total = total + jnp.einsum("BNTC,BNTH->NCH", one_hot, members)
      count = count + one_hot.sum((0, 2))[..., None]  # [N, C, 1]
  count = jnp.broadcast_to(count, centroids_NCH.shape[:2] + (1,))
  target = jnp.where(count > 0, total / jnp.maximum(count, 1.0), centroids_NCH)
  return decay * centroids_NCH + (1 - decay) * target.astype(centroids_NCH.dtype)


def _build(key, dims, causal):
  del causal
  C = 3 if dims.T >= 3 else 1
  return {"centroids": jax.random.normal(key, (dims.N, C, dims.H), jnp.float32)}


registry.register(
  registry.Mechanism(
    id="routing_transformer",
    family="f",
    paper=PAPER,
    entry_point="attn_jax.attention.routing:routing_attention",
    implementations=IMPLEMENTATIONS,
    patterns=frozenset((registry.SELF_CAUSAL,)),
    decode=False,
    tier=2,
    check="A single cluster equals causal. Gathering and scattering round-trip exactly; the "
    "gathered clusters equal the dense per-cluster masks merged by log-sum-exp. Nearest mode "
    "(routing_mode='nearest'): later tokens leave earlier outputs unchanged.",
    build=_build,
    module=registry.NN_ATTENTION,
  )
)
