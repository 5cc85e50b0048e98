"""Context-aware sparse prefill (catalog family (f), ``flexprefill``) as a pure JAX function.

"FlexPrefill: A Context-Aware Sparse Attention Mechanism for Efficient Long-Sequence
Inference".

Dimension key: B batch, T length (self-attention, causal), N query heads, K kv heads
(G = N // K), H head dim, Hv value head dim, L block size, nQ = nK = ceil(T / L) blocks.

A training-free, per-head choice of sparse pattern for causal prefill, made from the
queries of the last block q̂ (the last L queries):

  1. True block mass of the last block: a = softmax(q̂·Kᵀ/√H) (causal), averaged over the
     rows and summed over each key block: â ∈ Δ^nK. Estimate from pooled vectors:
     ā = softmax(mean(q̂)·mean(K_j)ᵀ/√H) over the key blocks j. If the Jensen–Shannon
     divergence √JS(â, ā) < τ the estimate is trusted: **query-aware** pattern; otherwise
     **vertical-slash**.
  2. Query-aware: per query block i, the estimated block distribution
     ā_i = softmax(mean(Q_i)·mean(K_j)ᵀ/√H) over the visible blocks j <= i; keep the
     smallest set of blocks (by decreasing ā_i) whose mass reaches γ.
  3. Vertical-slash: from the last block's true attention a, the column mass (per key) and
     the diagonal mass (per offset i − j), each normalised; keep the smallest set of
     columns and the smallest set of diagonals reaching γ; a block (i, j) is kept when it
     holds a kept column or a kept diagonal.
  4. Minimum budget (our reading): the diagonal block (i, i) and the first block (i, 0) are
     always kept, so no row is empty and the attention sink is present.

γ >= 1 keeps every visible block: dense causal attention. The selected estimated mass of a
query-aware row is >= γ by construction. Selection is detached (no gradient); attention over
the selected blocks is ``block_sparse_attention`` with per-query-head lists (Pallas
block-sparse kernels on TPU / GPU, the blocked ``xla`` path skipping unselected tiles on
CPU), causal inside the diagonal block.
"""

import typing

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from attn_jax.attention import _checks, registry
from attn_jax.attention import block_sparse as block_sparse_lib
from pallas_kernels import _blocks

PAPER = (
  "FlexPrefill: A Context-Aware Sparse Attention Mechanism for Efficient Long-Sequence Inference"
)
IMPLEMENTATIONS = block_sparse_lib.IMPLEMENTATIONS


def _keep_mass(p, gamma):
  """Bool mask of the smallest set of entries (largest first, last axis) whose mass
  reaches ``gamma`` (entries before the threshold is reached, plus the one reaching it)."""
  order = jnp.argsort(-p, axis=-1)
  sorted_p = jnp.take_along_axis(p, order, axis=-1)
  before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
  keep_sorted = before < gamma
  return jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)


def _pool_blocks(x_BTNH, L):
  B, T, N, H = x_BTNH.shape
  n = -(-T // L)
  x = jnp.pad(x_BTNH.astype(jnp.float32), ((0, 0), (0, n * L - T), (0, 0), (0, 0)))
  sizes = jnp.minimum(L, T - L * jnp.arange(n)).astype(jnp.float32)
  return x.reshape(B, n, L, N, H).sum(2) / sizes[None, :, None, None]


def _js(p, q):
  m = 0.5 * (p + q)
  kl = lambda a, b: jnp.sum(jnp.where(a > 0, a * (jnp.log(a) - jnp.log(b)), 0.0), -1)  # noqa: E731
  return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def flexprefill_select(
  q_BTNH: Float[Array, "B T N H"],
  k_BTKH: Float[Array, "B T K H"],
  *,
  block: int,
  gamma: float,
  tau: float,
) -> tuple[Bool[Array, "B N nQ nK"], Bool[Array, "B N"]]:
  """(selected blocks per query head and q block, query-aware flag per head)."""
  B, T, N, H = q_BTNH.shape
  K = k_BTKH.shape[2]
  L = block
  n = -(-T // L)
  q = jax.lax.stop_gradient(q_BTNH).astype(jnp.float32)
  k = jnp.repeat(jax.lax.stop_gradient(k_BTKH).astype(jnp.float32), N // K, axis=2)
  scale = 1.0 / float(np.sqrt(H))
  visible_blocks = jnp.arange(n)[None, :] <= jnp.arange(n)[:, None]  # [nQ, nK]
  # 1. The last block's true attention and its pooled estimate.
  start = (n - 1) * L
  q_last = q[:, start:]  # [B, Lq, N, H]
  rows = jnp.arange(start, T)
  s = jnp.einsum("BLNH,BSNH->BNLS", q_last, k) * scale
  s = jnp.where(jnp.arange(T)[None, :] <= rows[:, None], s, -jnp.inf)
  a = jax.nn.softmax(s, axis=-1)  # [B, N, Lq, T]
  a_pad = jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, n * L - T)))
  a_hat = a_pad.reshape(B, N, -1, n, L).sum(-1).mean(2)  # [B, N, nK]
  qp, kp = _pool_blocks(q, L), _pool_blocks(k, L)  # [B, n, N, H]
  est = jnp.einsum("BNH,BCNH->BNC", qp[:, -1], kp) * scale
  a_bar = jax.nn.softmax(est, axis=-1)  # the last block sees every block
  query_aware = jnp.sqrt(jnp.maximum(_js(a_hat, a_bar), 0.0)) < tau  # [B, N]
  # 2. Query-aware: per query block, the estimated mass over visible blocks.
  est_all = jnp.einsum("BQNH,BCNH->BNQC", qp, kp) * scale
  est_all = jnp.where(visible_blocks, est_all, -jnp.inf)
  qa = _keep_mass(jax.nn.softmax(est_all, axis=-1), gamma) & visible_blocks
  # 3. Vertical-slash from the last block's attention.
  col = a.sum(2)  # [B, N, T]
  col = col / col.sum(-1, keepdims=True)
  offsets = rows[:, None] - jnp.arange(T)[None, :]  # [Lq, T], i − j
  diag = (
    jnp.zeros((B, N, T), jnp.float32)
    .at[:, :, jnp.clip(offsets, 0, T - 1)]
    .add(jnp.where(offsets >= 0, a, 0.0))
  )
  diag = diag / diag.sum(-1, keepdims=True)
  keep_col = _keep_mass(col, gamma)  # [B, N, T] key positions
  keep_diag = _keep_mass(diag, gamma)  # [B, N, T] offsets 0..T-1
  col_blocks = jnp.pad(keep_col, ((0, 0), (0, 0), (0, n * L - T))).reshape(B, N, n, L).any(-1)
  # Block (i, j) holds offsets d with i·L − d < (j+1)·L and (i+1)·L − 1 − d >= j·L, i.e.
  # d in ((i − j − 1)·L, (i − j + 1)·L − 1]; prefix sums over the kept offsets test that.
  csum = jnp.pad(jnp.cumsum(keep_diag.astype(jnp.int32), -1), ((0, 0), (0, 0), (1, 0)))
  rel = jnp.arange(n)[:, None] - jnp.arange(n)[None, :]  # i − j
  lo = jnp.clip((rel - 1) * L + 1, 0, T)  # smallest offset inside, inclusive
  hi = jnp.clip((rel + 1) * L - 1, 0, T - 1)  # largest offset inside, inclusive
  diag_blocks = (csum[..., hi + 1] - csum[..., lo]) > 0  # [B, N, nQ, nK]
  vs = (col_blocks[:, :, None, :] | diag_blocks) & visible_blocks
  selected = jnp.where(query_aware[..., None, None], qa, vs)
  # 4. Minimum budget; γ >= 1: everything visible.
  forced = (jnp.arange(n)[:, None] == jnp.arange(n)[None, :]) | (jnp.arange(n)[None, :] == 0)
  selected = (selected | forced) & visible_blocks
  if gamma >= 1:
    selected = jnp.broadcast_to(visible_blocks, selected.shape)
  return selected, query_aware


def blocks_to_lists(selected_BNQC):
  """Per (example, head, q block) the selected kv blocks as (count, index) lists."""
  kinds = jnp.where(selected_BNQC, _blocks.PARTIAL, _blocks.EMPTY).astype(jnp.int8)
  count, index, _ = _blocks.compact(kinds)
  return count, index


@typing.no_type_check
def flexprefill(
  q_BTNH: Float[Array, "B T N H"],
  k_BTKH: Float[Array, "B T K H"],
  v_BTKV: Float[Array, "B T K Hv"],
  *,
  flex_block: int = 64,
  flex_gamma: float = 0.9,
  flex_tau: float = 0.1,
  return_aux: bool = False,
  implementation: str | None = None,
):
  """FlexPrefill causal prefill attention; see the module docstring.

  Args:
    q_BTNH, k_BTKH, v_BTKV: causal self-attention inputs (T = S).
    flex_block: L, the block size (also the sparse kernel's block).
    flex_gamma: γ in (0, 1], the cumulative mass to reach (>= 1: dense causal).
    flex_tau: τ >= 0, the JS-divergence threshold of the query-aware pattern.
    return_aux: also return ``{"selected": [B, N, nQ, nK], "query_aware": [B, N]}``.
    implementation: "xla" (default), "reference" or a Pallas kernel name.
  """
  dims = _checks.check_qkv(q_BTNH, k_BTKH, v_BTKV)
  if dims.S != dims.T:
    raise ValueError(f"flexprefill is causal self-attention (prefill): needs S == T; got {dims}")
  _checks.positive_int("flex_block", flex_block)
  if not 0 < float(flex_gamma) <= 1:
    raise ValueError(f"flex_gamma must be in (0, 1]; got {flex_gamma!r}")
  if not float(flex_tau) >= 0:
    raise ValueError(f"flex_tau must be >= 0; got {flex_tau!r}")
  selected, query_aware = flexprefill_select(
    q_BTNH, k_BTKH, block=flex_block, gamma=float(flex_gamma), tau=float(flex_tau)
  )
  count, index = blocks_to_lists(selected)
  out = block_sparse_lib.block_sparse_attention(
    q_BTNH,
    k_BTKH,
    v_BTKV,
    count,
    index,
    block_size=flex_block,
    causal=True,
    implementation=implementation,
  )
  if return_aux:
    return out, {"selected": selected, "query_aware": query_aware}
  return out


def _build(key, dims, causal):
  del key, dims, causal
  return {"flex_block": 4, "flex_gamma": 0.8, "flex_tau": 0.1}


registry.register(
  registry.Mechanism(
    id="flexprefill",
    family="f",
    paper=PAPER,
    entry_point="attn_jax.attention.flexprefill:flexprefill",
    implementations=IMPLEMENTATIONS,
    patterns=frozenset((registry.SELF_CAUSAL,)),
    decode=False,
    tier=2,
    check="γ = 1 equals dense causal attention. The selected estimated mass of a query-aware "
    "row is >= γ; the diagonal and first blocks are always kept, never a future block.",
    build=_build,
    module=registry.NN_ATTENTION,
  )
)
