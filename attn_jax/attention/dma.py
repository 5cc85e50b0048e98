"""Dynamic mask attention (catalog family (f), ``dma``) as a pure JAX function.

"Trainable Dynamic Mask Sparse Attention" (and "Wonderful Matrices: Combining for a More
Efficient and Effective Foundation Model Architecture").

Dimension key: B batch, T query length, S key/value length, N query heads, K kv heads
(G = N // K), H head dim, Hv value head dim, w keys kept per query.

Per kv head a key score from the values alone (independent of the query),

    δ_j = A_k · softplus(v_j · W_k)        (W ``[K, Hv]``, A ``[K]``),

enters the logits as a bias (the paper's exp(A·softplus(·)) weight in log space) and
selects the keys: each query keeps its w causally visible keys of highest δ (ties broken
towards the more recent key, so equal scores — e.g. at initialisation, W = 0 — give a
sliding window of w keys). The selection is detached; gradients reach δ through the bias.

Exact sparse form. A key j, once out of a query's top w, never returns for a later query
(later queries only add competitors), so key j is kept exactly by the queries
i ∈ [j, e_j): e_j is the first position at which w keys that outrank j are visible (j
itself never kept when w keys before it already outrank it). ``key_expiry`` computes e
blockwise (no T × S array); the attention then runs with a ``KeyIntervalMask``
(visible iff j <= i < e_j) and δ as a dense [.., 1, 1, S] bias: one ``dot_product_attention``
call with the kv heads folded into the batch, on every implementation (the Pallas kernels
read e as a per-key operand in-tile); tiles where no key is kept are skipped by the mask's
block map.

Checks: w >= T with A = 0 equals causal attention; equals the dense masked reference.
"""

import typing

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from attn_jax.attention import _checks, registry
from attn_jax.attention import masks as masks_lib
from attn_jax.attention.api import dot_product_attention

PAPER = "Trainable Dynamic Mask Sparse Attention"
IMPLEMENTATIONS = registry.KERNEL_IMPLEMENTATIONS


@jax.tree_util.register_pytree_node_class
class KeyIntervalMask(masks_lib.Mask):
  """Each key j is visible to the queries at positions p with j <= p < end[b, j] (positions
  bottom-right aligned, p = i + S − T). ``end`` int ``[B, S]``."""

  batched = True

  def __init__(self, end_BS):
    if getattr(end_BS, "ndim", None) != 2 or not jnp.issubdtype(end_BS.dtype, jnp.integer):
      raise ValueError(f"KeyIntervalMask end must be an int [B, S] array; got {end_BS!r}")
    self.end = end_BS

  def _batch_size(self):
    return jnp.shape(self.end)[0]

  def check_shapes(self, batch, q_len, kv_len):
    if tuple(jnp.shape(self.end)) != (batch, kv_len):
      raise ValueError(f"KeyIntervalMask end has shape {jnp.shape(self.end)}; needs [B, S]")

  def _visible(self, q_idx, kv_idx, q_offset, b):
    end = self.end if b is None else jnp.take(self.end, b, axis=0)
    e = jnp.take(end, kv_idx, axis=-1, mode="clip")
    pos = q_idx + q_offset
    return (kv_idx <= pos) & (pos < e)

  def _any_all(self, q_lo, q_hi, kv_lo, kv_hi, q_offset, xp):
    e_min, e_max = masks_lib._block_range(self.end, kv_lo[0], kv_hi[0])  # [B, nK]
    e_min, e_max = e_min[:, None, :], e_max[:, None, :]
    any_ = (kv_lo <= q_hi + q_offset) & (e_max > q_lo + q_offset)
    all_ = (kv_hi <= q_lo + q_offset) & (e_min > q_hi + q_offset)
    return any_, all_

  def lower_for_kernel(self, builder, q_offset):
    """The Pallas kernels' in-tile predicate, reading end as a per-key operand."""
    ik = builder.add_kv(self.end)
    return lambda qi, ki, qv, kv: (ki <= qi + q_offset) & (qi + q_offset < kv[ik])

  def tree_flatten(self):
    return (self.end,), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    obj = object.__new__(cls)
    (obj.end,) = children
    return obj

  def __repr__(self):
    return f"KeyIntervalMask(end={jnp.shape(self.end)})"


def key_scores(v_BSKV, dma_w, dma_a) -> Float[Array, "B S K"]:
  """δ = A · softplus(v · W) per key and kv head, float32."""
  v = v_BSKV.astype(jnp.float32)
  return dma_a.astype(jnp.float32) * jax.nn.softplus(
    jnp.einsum("BSKV,KV->BSK", v, dma_w.astype(jnp.float32))
  )


def key_expiry(delta_BKS, window: int, block: int = 256) -> Int[Array, "B K S"]:
  """e_j per key (module docstring): keys j kept by positions [j, e_j). Blockwise over the
  keys, ``[B, K, block, S]`` at a time."""
  B, K, S = delta_BKS.shape
  bk = min(block, S)
  nb = -(-S // bk)
  d = jnp.pad(delta_BKS, ((0, 0), (0, 0), (0, nb * bk - S)), constant_values=-jnp.inf)
  idx = jnp.arange(S)

  def one(j0):
    dj = jax.lax.dynamic_slice_in_dim(d, j0, bk, axis=2)[..., None]  # [B, K, bk, 1]
    jj = (j0 + jnp.arange(bk))[:, None]  # [bk, 1]
    dl = delta_BKS[:, :, None, :]  # [B, K, 1, S]
    before = (idx < jj) & (dl > dj)  # earlier keys outranking j (ties go to the recent key)
    after = (idx > jj) & (dl >= dj)
    c = before.sum(-1)  # [B, K, bk]
    need = window - c
    reached = jnp.cumsum(after, axis=-1) >= need[..., None]
    first = jnp.where(reached.any(-1), jnp.argmax(reached, axis=-1), S)
    return jnp.where(need <= 0, jj[:, 0], first).astype(jnp.int32)

  ends = jax.lax.map(one, jnp.arange(nb) * bk)  # [nb, B, K, bk]
  return jnp.moveaxis(ends, 0, 2).reshape(B, K, nb * bk)[..., :S]


@typing.no_type_check
def dma(
  q_BTNH: Float[Array, "B T N H"],
  k_BSKH: Float[Array, "B S K H"],
  v_BSKV: Float[Array, "B S K Hv"],
  *,
  dma_w,
  dma_a,
  dma_window: int,
  return_expiry: bool = False,
  implementation: str | None = None,
):
  """Dynamic mask attention (causal); see the module docstring.

  Args:
    q_BTNH, k_BSKH, v_BSKV: queries, keys, values (bottom-right aligned when T < S).
    dma_w: ``[K, Hv]`` value-to-score projection. dma_a: ``[K]`` score scale A.
    dma_window: w, keys kept per query (>= 1).
    return_expiry: also return e ``[B, K, S]`` (key j kept by positions [j, e_j)).
    implementation: passed to ``dot_product_attention``.
  """
  dims = _checks.check_qkv(q_BTNH, k_BSKH, v_BSKV)
  if isinstance(dma_window, bool) or not isinstance(dma_window, int | np.integer) or dma_window < 1:
    raise ValueError(f"dma_window must be an int >= 1; got {dma_window!r}")
  if tuple(np.shape(dma_w)) != (dims.K, dims.Hv) or tuple(np.shape(dma_a)) != (dims.K,):
    raise ValueError(
      f"dma_w must be [K, Hv] = {(dims.K, dims.Hv)} and dma_a [K] = ({dims.K},); got "
      f"{np.shape(dma_w)} and {np.shape(dma_a)}"
    )
  B, T, N, H = q_BTNH.shape
  S, K = dims.S, dims.K
  G = N // K
  delta_BSK = key_scores(v_BSKV, dma_w, dma_a)
  delta_BKS = delta_BSK.transpose(0, 2, 1)
  end_BKS = key_expiry(jax.lax.stop_gradient(delta_BKS), int(dma_window))
  fold_q = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B * K, T, G, H)
  fold_kv = lambda x: x.transpose(0, 2, 1, 3).reshape(B * K, S, 1, x.shape[-1])  # noqa: E731
  mask = KeyIntervalMask(end_BKS.reshape(B * K, S))
  bias = delta_BKS.reshape(B * K, 1, 1, S).astype(q_BTNH.dtype)
  out = dot_product_attention(
    fold_q, fold_kv(k_BSKH), fold_kv(v_BSKV), mask=mask, bias=bias, implementation=implementation
  )
  out = out.reshape(B, K, T, G, -1).transpose(0, 2, 1, 3, 4).reshape(B, T, N, -1)
  return (out, end_BKS) if return_expiry else out


def _build(key, dims, causal):
  del causal
  kw, ka = jax.random.split(key)
  return {
    "dma_w": 0.5 * jax.random.normal(kw, (dims.K, dims.Hv), jnp.float32),
    "dma_a": jax.random.uniform(ka, (dims.K,), jnp.float32, 0.5, 1.5),
    "dma_window": 5,
  }


registry.register(
  registry.Mechanism(
    id="dma",
    family="f",
    paper=PAPER,
    entry_point="attn_jax.attention.dma:dma",
    implementations=IMPLEMENTATIONS,
    patterns=registry.CAUSAL_PATTERNS,
    decode=True,
    tier=2,
    check="w >= T with A = 0 equals causal. The sparse path equals a dense masked "
    "reference of the per-query top-w keys by δ (with δ as a bias).",
    build=_build,
    module=registry.NN_ATTENTION,
  )
)
