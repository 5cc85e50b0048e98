"""Landmark attention's grouped softmax (catalog family (f), ``landmark``) as a pure JAX
function.

"Landmark Attention: Random-Access Infinite Context Length for Transformers".

Dimension key: B batch, T length (causal self-attention), N query heads, K kv heads
(G = N // K), H head dim, Hv value head dim, ℓ tokens per block, m = ℓ + 1 positions per
block (ℓ regular tokens, then the block's landmark), nB = ceil(T / m) blocks.

Layout: position p is the landmark of block p // m when (p + 1) % m == 0; every other
position is a regular token of its block. For query i in block c (logits s_ij = q_i·k_j/√H):

    Z_i = Σ_{j regular, j in block c, j <= i} e^{s_ij} + Σ_{b < c} e^{s_{i,L_b}}

    weight of a regular token j <= i of block c:       e^{s_ij} / Z_i
    weight of a regular token j of an earlier block b:  (e^{s_{i,L_b}} / Z_i)
                                                        · e^{s_ij} / Σ_{j' regular in b} e^{s_ij'}

Landmark values are never attended (their keys only gate their block). The weights of a
query sum to 1; a sequence without a landmark (T < m) is plain causal attention.

Implementations:
  * ``"reference"``: the T × T weight matrix built explicitly (float64-friendly oracle).
  * ``"xla"`` (default): memory-lean. A ``lax.scan`` over query blocks (rematerialised in the
    backward with ``jax.checkpoint``): per query block, the logits against all keys
    ``[B, N, m, T]``, the within-block softmax of every earlier block, the landmark
    logits and the own block, combined stably (max-shifted). Live memory O(m·T) per step
    instead of T × T; work ≈ T² (no causal skipping across earlier blocks, whose tokens
    every later query attends through its grouped softmax anyway).

The layer (NNX kind ``landmark``) treats every m-th position as the landmark; inputs with
dedicated landmark tokens are built with ``insert_landmarks``. Retrieval at inference time
(top-k blocks by landmark score) is the catalog's ``landmark_retrieval``: not built.
"""

import typing

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from attn_jax.attention import _checks, registry

PAPER = "Landmark Attention: Random-Access Infinite Context Length for Transformers"
IMPLEMENTATIONS = ("reference", "xla")


def is_landmark(T: int, block: int):
  """bool ``[T]``: which positions are landmarks (block = ℓ regular tokens per block)."""
  return (jnp.arange(T) + 1) % (block + 1) == 0


def insert_landmarks(x_BTD, landmark_D, block: int):
  """Inserts ``landmark_D`` after every ``block`` tokens of ``x [B, T, D]``: ``[B, T', D]``
  with T' = T + floor(T / block), the layout ``landmark_attention`` expects."""
  B, T, D = x_BTD.shape
  nB = T // block
  full = x_BTD[:, : nB * block].reshape(B, nB, block, D)
  lm = jnp.broadcast_to(landmark_D.astype(x_BTD.dtype), (B, nB, 1, D))
  body = jnp.concatenate([full, lm], axis=2).reshape(B, nB * (block + 1), D)
  return jnp.concatenate([body, x_BTD[:, nB * block :]], axis=1)


def _weights_reference(s_BNTT, block):
  """The grouped-softmax weight matrix [B, N, T, T] from the logits (module docstring)."""
  T = s_BNTT.shape[-1]
  m = block + 1
  pos = jnp.arange(T)
  blk = pos // m
  lm = is_landmark(T, block)
  i, j = pos[:, None], pos[None, :]
  own = (blk[j] == blk[i]) & (j <= i) & ~lm[j]  # regular own-block tokens
  earlier = blk[j] < blk[i]
  regular_earlier = earlier & ~lm[j]
  landmark_earlier = earlier & lm[j]
  s = s_BNTT
  top = jnp.max(jnp.where(own | landmark_earlier, s, -jnp.inf), -1, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  e = jnp.exp(s - top)
  Z = jnp.sum(jnp.where(own | landmark_earlier, e, 0.0), -1, keepdims=True)
  Z = jnp.where(Z > 0, Z, 1.0)
  # Inner softmax of each earlier block over its regular tokens, per query.
  nB = -(-T // m)
  onehot = blk[None, :] == jnp.arange(nB)[:, None]  # [nB, T]
  reg = ~lm
  per_block_max = jnp.max(
    jnp.where((onehot & reg)[None, None, None], s[..., None, :], -jnp.inf), -1
  )  # [B, N, T, nB]
  per_block_max = jnp.where(jnp.isfinite(per_block_max), per_block_max, 0.0)
  inner_top = per_block_max[..., blk]  # [B, N, T, T]
  ei = jnp.exp(s - inner_top)
  block_sum = jnp.einsum("BNTS,CS->BNTC", jnp.where(reg, ei, 0.0), onehot.astype(ei.dtype))
  inner = ei / jnp.where(block_sum > 0, block_sum, 1.0)[..., blk]
  # The landmark weight of block b for query i, spread over b's regular tokens.
  lm_weight = jnp.einsum("BNTS,CS->BNTC", jnp.where(lm, e, 0.0), onehot.astype(e.dtype)) / Z
  w = jnp.where(own, e / Z, 0.0) + jnp.where(regular_earlier, lm_weight[..., blk] * inner, 0.0)
  return w


def _blocked(q_BTNH, k_BTKH, v_BTKV, block, scale):
  B, T, N, H = q_BTNH.shape
  K = k_BTKH.shape[2]
  G = N // K
  m = block + 1
  nB = -(-T // m)
  Tp = nB * m
  dtype = jnp.promote_types(q_BTNH.dtype, jnp.float32)
  pad = lambda x: jnp.pad(x.astype(dtype), ((0, 0), (0, Tp - T), (0, 0), (0, 0)))  # noqa: E731
  q, k, v = pad(q_BTNH), pad(k_BTKH), pad(v_BTKV)
  kb = k.reshape(B, nB, m, K, H)
  vb = v.reshape(B, nB, m, K, -1)
  real = (jnp.arange(Tp) < T).reshape(nB, m)
  regular = real & (jnp.arange(m) < block)[None, :]  # [nB, m]: real regular tokens
  has_landmark = real[:, block]  # [nB]: the block's landmark exists

  @jax.checkpoint
  def step(_, c):
    qc = jax.lax.dynamic_slice_in_dim(q, c * m, m, axis=1).reshape(B, m, K, G, H)
    s = jnp.einsum("BMKGH,BCJKH->BKGMCJ", qc, kb) * scale  # [B, K, G, m, nB, m]
    earlier = jnp.arange(nB) < c  # [nB]
    # Inner softmax of each earlier block over its regular tokens.
    s_in = jnp.where(regular[None, None, None, None], s, -jnp.inf)
    top_in = jnp.max(s_in, -1, keepdims=True)
    top_in = jnp.where(jnp.isfinite(top_in), top_in, 0.0)
    e_in = jnp.exp(s_in - top_in)
    o_in = jnp.einsum("BKGMCJ,BCJKV->BKGMCV", e_in, vb) / jnp.maximum(
      e_in.sum(-1)[..., None], jnp.finfo(dtype).tiny
    )
    lm_logit = jnp.where(earlier & has_landmark, s[..., block], -jnp.inf)  # [B,K,G,m,nB]
    # Own block: regular tokens j <= i.
    s_own = jax.lax.dynamic_index_in_dim(s, c, axis=4, keepdims=False)  # [B,K,G,m,m]
    own_ok = (jnp.arange(m)[None, :] <= jnp.arange(m)[:, None]) & regular[c][None, :]
    s_own = jnp.where(own_ok, s_own, -jnp.inf)
    top = jnp.maximum(jnp.max(lm_logit, -1), jnp.max(s_own, -1))[..., None]
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    e_lm = jnp.exp(lm_logit - top)  # [B,K,G,m,nB]
    e_own = jnp.exp(s_own - top)  # [B,K,G,m,m]
    vc = jax.lax.dynamic_index_in_dim(vb, c, axis=1, keepdims=False)  # [B, m, K, V]
    num = jnp.einsum("BKGMC,BKGMCV->BKGMV", e_lm, o_in) + jnp.einsum("BKGMJ,BJKV->BKGMV", e_own, vc)
    Z = e_lm.sum(-1) + e_own.sum(-1)
    out = num / jnp.where(Z > 0, Z, 1.0)[..., None]
    return None, out.transpose(0, 3, 1, 2, 4).reshape(B, m, N, -1)

  _, outs = jax.lax.scan(step, None, jnp.arange(nB))  # [nB, B, m, N, V]
  out = outs.transpose(1, 0, 2, 3, 4).reshape(B, Tp, N, -1)[:, :T]
  return out.astype(q_BTNH.dtype)


@typing.no_type_check
def landmark_attention(
  q_BTNH: Float[Array, "B T N H"],
  k_BTKH: Float[Array, "B T K H"],
  v_BTKV: Float[Array, "B T K Hv"],
  *,
  landmark_block: int = 50,
  scale: float | None = None,
  implementation: str | None = None,
):
  """Landmark grouped-softmax attention (causal self-attention); see the module docstring.

  Args:
    q_BTNH, k_BTKH, v_BTKV: T == S, landmarks at positions p with (p + 1) % (ℓ + 1) == 0.
    landmark_block: ℓ, regular tokens per block (the paper's 50).
    scale: logit scale, default 1/sqrt(H).
    implementation: "xla" (default, blocked and memory-lean) or "reference".
  """
  dims = _checks.check_qkv(q_BTNH, k_BTKH, v_BTKV)
  if dims.S != dims.T:
    raise ValueError(f"landmark attention is causal self-attention: needs S == T; got {dims}")
  _checks.positive_int("landmark_block", landmark_block)
  impl = implementation or "xla"
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; got {impl!r}")
  scale = 1.0 / float(np.sqrt(dims.H)) if scale is None else float(scale)
  if impl == "xla":
    return _blocked(q_BTNH, k_BTKH, v_BTKV, landmark_block, scale)
  G = dims.N // dims.K
  dtype = jnp.promote_types(q_BTNH.dtype, jnp.float32)
  k = jnp.repeat(k_BTKH.astype(dtype), G, axis=2)
  v = jnp.repeat(v_BTKV.astype(dtype), G, axis=2)
  s = jnp.einsum("BTNH,BSNH->BNTS", q_BTNH.astype(dtype), k) * scale
  w = _weights_reference(s, landmark_block)
  return jnp.einsum("BNTS,BSNV->BTNV", w, v).astype(q_BTNH.dtype)


def _build(key, dims, causal):
  del key, dims, causal
  return {"landmark_block": 4}


registry.register(
  registry.Mechanism(
    id="landmark",
    family="f",
    paper=PAPER,
    entry_point="attn_jax.attention.landmark:landmark_attention",
    implementations=IMPLEMENTATIONS,
    patterns=frozenset((registry.SELF_CAUSAL,)),
    decode=False,
    tier=2,
    check="Weights sum to 1 for each query. With a single block it equals causal. The "
    "blocked path equals the explicit grouped-softmax weights.",
    build=_build,
    module=registry.NN_ATTENTION,
  )
)
