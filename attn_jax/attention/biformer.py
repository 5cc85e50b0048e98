"""Bi-level routing attention (catalog family (f), ``biformer``) as a pure JAX function.

"BiFormer: Vision Transformer with Bi-Level Routing Attention".

Dimension key: B batch, T query length, S key/value length, N query heads, K kv heads
(G = N // K), H head dim, Hv value head dim, r region size (tokens), nQ = ceil(T / r) query
regions, nK = ceil(S / r) key regions, k regions routed per query region, W conv width.

Equations. Tokens are split into regions of r consecutive tokens (an image is first laid
out region-major, e.g. with ``regions_2d``). Region queries and keys are the per-region
means of q and k over all heads' channels, Q^r ``[nQ, N·H]`` and K^r ``[nK, N·H]`` (key
heads repeated to their query heads), and the region affinity is

    A^r = Q^r · (K^r)ᵀ  ∈ R^(nQ × nK),   I^r_i = top-k_j A^r_ij.

Every query of region i then attends, per head, to the union of the tokens of its k routed
regions, with ordinary scaled softmax attention:

    out_t = softmax(q_t·K_{I(t)}ᵀ / √H) · V_{I(t)}.

The paper adds a local context enhancement LCE(V), a depthwise convolution over V (5 × 5 on
the image); here a depthwise 1-D convolution of width W over the token order, per kv head
and channel, "same" padding, added to every query head of that kv head:
``out = attention + LCE(V)``. The routing is a selection: no gradient flows through it.

Fast path: the routes are exactly a per-(example, query region) list of kv blocks, shared
by the heads, so ``block_sparse_attention`` runs them: on TPU / GPU the block-sparse Pallas
kernels (routed blocks flagged FULL: no in-tile mask arithmetic; unrouted blocks never
loaded), on CPU the blocked ``xla`` path skipping unrouted tiles. Work ≈ k / nK of full
attention plus the O(nQ·nK·N·H) routing.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from attn_jax.attention import _checks, registry
from attn_jax.attention import block_sparse as block_sparse_lib

PAPER = "BiFormer: Vision Transformer with Bi-Level Routing Attention"
IMPLEMENTATIONS = block_sparse_lib.IMPLEMENTATIONS


def region_means(x_BTNH: Float[Array, "B T N H"], region: int) -> Float[Array, "B R N H"]:
  """Per-region mean over the real tokens (the last region may be shorter), float32."""
  B, T, N, H = x_BTNH.shape
  R = -(-T // region)
  x = jnp.pad(x_BTNH.astype(jnp.float32), ((0, 0), (0, R * region - T), (0, 0), (0, 0)))
  sizes = jnp.minimum(region, T - region * jnp.arange(R)).astype(jnp.float32)
  return x.reshape(B, R, region, N, H).sum(2) / sizes[None, :, None, None]


def biformer_route(
  q_BTNH: Float[Array, "B T N H"],
  k_BSKH: Float[Array, "B S K H"],
  *,
  region: int,
  top_k: int,
) -> tuple[Int[Array, "B 1 nQ k"], Int[Array, "B 1 nQ"]]:
  """Region routing: per query region the ``min(top_k, nK)`` key regions of highest
  affinity Q^r·K^rᵀ (all heads' channels), as block lists ``(kv_idx [B, 1, nQ, k],
  kv_count [B, 1, nQ])`` shared by the heads. Indices are distinct; no gradient."""
  N, K = q_BTNH.shape[2], k_BSKH.shape[2]
  qr = region_means(jax.lax.stop_gradient(q_BTNH), region)  # [B, nQ, N, H]
  kr = region_means(jax.lax.stop_gradient(k_BSKH), region)  # [B, nK, K, H]
  kr = jnp.repeat(kr, N // K, axis=2)
  affinity = jnp.einsum("BQNH,BCNH->BQC", qr, kr)
  top = min(top_k, affinity.shape[-1])
  _, idx = jax.lax.top_k(affinity, top)
  idx = idx.astype(jnp.int32)[:, None]
  return idx, jnp.full(idx.shape[:3], top, jnp.int32)


def local_context(v_BSKV: Float[Array, "B S K Hv"], weight_WKV) -> Float[Array, "B S K Hv"]:
  """LCE: depthwise 1-D convolution of width W over the token order, "same" padding."""
  W = weight_WKV.shape[0]
  left = (W - 1) // 2
  S = v_BSKV.shape[1]
  v = jnp.pad(v_BSKV, ((0, 0), (left, W - 1 - left), (0, 0), (0, 0)))
  w = weight_WKV.astype(v_BSKV.dtype)
  return sum(v[:, i : i + S] * w[i] for i in range(W))


def biformer(
  q_BTNH: Float[Array, "B T N H"],
  k_BSKH: Float[Array, "B S K H"],
  v_BSKV: Float[Array, "B S K Hv"],
  *,
  biformer_region: int,
  biformer_top_k: int,
  lce_weight=None,
  scale: float | None = None,
  return_routes: bool = False,
  implementation: str | None = None,
):
  """Bi-level routing attention (non-causal).

  Args:
    q_BTNH, k_BSKH, v_BSKV: queries, keys, values; N % K == 0.
    biformer_region: r, tokens per region (query and key regions alike).
    biformer_top_k: k, key regions routed to each query region (clipped to nK).
    lce_weight: float ``[W, K, Hv]`` depthwise LCE kernel over V, or None (no LCE).
    scale: logit scale, default 1/sqrt(H).
    return_routes: also return the routes ``kv_idx [B, 1, nQ, k]``.
    implementation: "xla" (default), "reference", or a Pallas kernel name.

  Returns:
    ``[B, T, N, Hv]`` (and the routes).
  """
  dims = _checks.check_qkv(q_BTNH, k_BSKH, v_BSKV)
  region = _checks.positive_int("biformer_region", biformer_region)
  top_k = _checks.positive_int("biformer_top_k", biformer_top_k)
  if lce_weight is not None:
    if getattr(lce_weight, "ndim", None) != 3 or lce_weight.shape[1:] != (dims.K, dims.Hv):
      raise ValueError(
        f"lce_weight must have shape [W, K, Hv] = [W, {dims.K}, {dims.Hv}]; got "
        f"{getattr(lce_weight, 'shape', lce_weight)}"
      )
    if dims.S != dims.T:
      raise ValueError(f"LCE adds a conv of V to the output, so it needs S == T; got {dims}")
  idx, count = biformer_route(q_BTNH, k_BSKH, region=region, top_k=top_k)
  out = block_sparse_lib.block_sparse_attention(
    q_BTNH,
    k_BSKH,
    v_BSKV,
    count,
    idx,
    block_size=region,
    kv_full=jnp.ones(idx.shape, bool),
    scale=scale,
    implementation=implementation,
  )
  if lce_weight is not None:
    lce = jnp.repeat(local_context(v_BSKV, lce_weight), dims.N // dims.K, axis=2)
    out = out + lce.astype(out.dtype)
  return (out, idx) if return_routes else out


def regions_2d(x_BHWC, region: tuple[int, int]):
  """Lays an image ``[B, Hi, Wi, ...]`` out region-major: ``[B, Hi·Wi, ...]`` where each run
  of ``rh·rw`` tokens is one ``rh × rw`` region (Hi % rh == Wi % rw == 0)."""
  B, Hi, Wi = x_BHWC.shape[:3]
  rh, rw = region
  if Hi % rh or Wi % rw:
    raise ValueError(f"image {Hi}x{Wi} must split into whole {rh}x{rw} regions")
  rest = x_BHWC.shape[3:]
  x = x_BHWC.reshape(B, Hi // rh, rh, Wi // rw, rw, *rest)
  x = jnp.moveaxis(x, 3, 2)  # [B, Hi/rh, Wi/rw, rh, rw, ...]
  return x.reshape(B, Hi * Wi, *rest)


def unregions_2d(x_BTC, image: tuple[int, int], region: tuple[int, int]):
  """The inverse of ``regions_2d``: region-major ``[B, Hi·Wi, ...]`` to ``[B, Hi, Wi, ...]``."""
  B = x_BTC.shape[0]
  Hi, Wi = image
  rh, rw = region
  rest = x_BTC.shape[2:]
  x = x_BTC.reshape(B, Hi // rh, Wi // rw, rh, rw, *rest)
  x = jnp.moveaxis(x, 3, 2)  # [B, Hi/rh, rh, Wi/rw, rw, ...]
  return x.reshape(B, Hi, Wi, *rest)


def _build(key, dims, causal):
  del causal
  lce = 0.1 * jax.random.normal(key, (5, dims.K, dims.Hv), jnp.float32)
  return {
    "biformer_region": 4,
    "biformer_top_k": 2,
    "lce_weight": lce if dims.S == dims.T else None,
  }


registry.register(
  registry.Mechanism(
    id="biformer",
    family="f",
    paper=PAPER,
    entry_point="attn_jax.attention.biformer:biformer",
    implementations=IMPLEMENTATIONS,
    patterns=frozenset((registry.SELF, registry.CROSS)),
    decode=False,
    tier=2,
    check="k = the number of regions equals full attention plus the LCE term. The output "
    "equals a dense masked reference built from the same routes; routes are distinct and "
    "the routed blocks are the top-k region affinities.",
    build=_build,
    module=registry.NN_ATTENTION,
  )
)
