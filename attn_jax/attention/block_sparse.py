"""Block-sparse attention over per-head run-time block lists, on every implementation.

Dimension key: B batch, T query length, S key/value length, N query heads, K kv heads
(G = N // K), H head dim, Hv value head dim, Hs list heads (1, K or N), nQ / nK list blocks
along T / S of ``block_size = (Lq, Lk)`` tokens, M list width.

The selection functions of the sparse family (BiFormer region routing, NSA / FlexPrefill /
VMoBA block selection, ...) return lists; ``block_sparse_attention`` attends over them:

  * ``kv_count`` int ``[B, Hs, nQ]`` and ``kv_idx`` int ``[B, Hs, nQ, M]`` (the first
    ``kv_count`` entries of a row are distinct kv blocks), optional ``kv_full`` bool
    ``[B, Hs, nQ, M]`` (True: the whole block is visible, the predicate is skipped);
  * ``causal``: the token-level causal predicate (query t at position S − T + t) inside
    listed blocks.

Implementations:
  * ``"pallas_tpu"`` / ``"pallas_gpu"`` / ``"pallas_interpret"``: the block-sparse Pallas
    kernels (``pallas_kernels/block_sparse.py``): unlisted blocks cost no load and no
    compute; per-head lists without repeating K / V.
  * ``"xla"`` (default) / ``"reference"``: the list heads are folded into the batch and the
    lists become a ``BlockSparseMask`` (& ``CausalMask``): the blocked path skips unlisted
    tiles (tiles = the list blocks). Hs = K folds q as ``[B·K, T, G, H]`` against
    ``[B·K, S, 1, H]`` (no repeat); Hs = N with N > K repeats K / V G times on this path.
"""

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from attn_jax.attention import _checks
from attn_jax.attention import api as api_lib
from attn_jax.attention import masks as masks_lib

KERNELS = ("pallas_tpu", "pallas_gpu", "pallas_interpret")
IMPLEMENTATIONS = ("reference", "xla", *KERNELS)


def kernel_backend(implementation: str):
  """(backend, interpret) of a Pallas implementation name: ``pallas_interpret`` is the TPU
  kernel with TPU memory simulated (any host)."""
  if implementation == "pallas_interpret":
    from jax.experimental.pallas import tpu as pltpu

    return "tpu", pltpu.InterpretParams()
  return ("gpu" if implementation == "pallas_gpu" else "tpu"), False


def selected_blocks_attention(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K Hv"],
  selected: Bool[Array, "B Hs T nC"],
  *,
  block: int,
  causal: bool,
  implementation: str,
):
  """Attention of each (query token, head) over its own selection of kv blocks of ``block``
  tokens (Hs = K: one selection per kv head, shared by its query heads; or N). Kernels:
  ``pallas_kernels.block_sparse.selected_blocks_attention`` (unselected blocks never
  loaded); ``xla`` / ``reference``: the blocked path with a per-head chunk-selection mask
  (``longheads.attend_selected_chunks``)."""
  if implementation in KERNELS:
    from pallas_kernels import block_sparse as kernel

    backend, interpret = kernel_backend(implementation)
    return kernel.selected_blocks_attention(
      q, k, v, selected, block_size=block, causal=causal, backend=backend, interpret=interpret
    )
  from attn_jax.attention import longheads as longheads_lib

  N = q.shape[2]
  if selected.shape[1] != N:
    selected = jnp.repeat(selected, N // selected.shape[1], axis=1)
  base = masks_lib.CausalMask() if causal else None
  return longheads_lib.attend_selected_chunks(q, k, v, selected, block, base, implementation)


def block_sparse_attention(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K Hv"],
  kv_count: Int[Array, "B Hs nQ"],
  kv_idx: Int[Array, "B Hs nQ M"],
  *,
  block_size,
  kv_full: Bool[Array, "B Hs nQ M"] | None = None,
  causal: bool = False,
  scale: float | None = None,
  return_lse: bool = False,
  implementation: str | None = None,
):
  """Softmax attention of each (query, head) over the kv blocks its row lists.

  Returns out ``[B, T, N, Hv]`` (rows listing nothing give 0), and lse ``[B, N, T]``
  float32 when ``return_lse`` (-inf for such rows; merge branches with
  ``pallas_kernels.block_sparse.merge_branches``).
  """
  impl = implementation or "xla"
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; got {impl!r}")
  B, T, S, N, K, H, _ = _checks.check_qkv(q, k, v)
  from pallas_kernels import block_sparse as kernel  # list validation, shared with the kernels

  Lq, Lk = kernel.block_pair(block_size)
  if impl in KERNELS:
    backend, interpret = kernel_backend(impl)
    return kernel.block_sparse_attention(
      q,
      k,
      v,
      kv_count,
      kv_idx,
      kv_full=kv_full,
      block_size=(Lq, Lk),
      causal=causal,
      scale=scale,
      return_lse=return_lse,
      backend=backend,
      interpret=interpret,
    )
  nQ, nK = -(-T // Lq), -(-S // Lk)
  kernel.check_lists(kv_count, kv_idx, kv_full, B, N, K, nQ, nK)
  Hs = kv_count.shape[1]
  M = kv_idx.shape[-1]
  idx = jnp.where(jnp.arange(M) < jnp.asarray(kv_count)[..., None], kv_idx, -1).astype(jnp.int32)
  G = N // K
  if Hs == 1:
    qf, kf, vf, idx_f, groups = q, k, v, idx[:, 0], None
  else:
    if Hs == N and G > 1:  # a list per query head: each query head gets its own kv copy
      k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    Kf = k.shape[2]
    Gf = N // Kf
    qf = q.reshape(B, T, Kf, Gf, H).transpose(0, 2, 1, 3, 4).reshape(B * Kf, T, Gf, H)
    kf = k.transpose(0, 2, 1, 3).reshape(B * Kf, S, 1, H)
    vf = v.transpose(0, 2, 1, 3).reshape(B * Kf, S, 1, v.shape[-1])
    idx_f = idx.reshape(B * Kf, nQ, M)
    groups = (Kf, Gf)
  mask = masks_lib.BlockSparseMask(idx_f, (Lq, Lk))
  if causal:
    mask = mask & masks_lib.CausalMask()
  blocks = dict(block_q=Lq, block_kv=Lk) if impl == "xla" else {}
  result = api_lib.dot_product_attention(
    qf, kf, vf, mask=mask, scale=scale, return_lse=return_lse, implementation=impl, **blocks
  )
  out, lse = result if return_lse else (result, None)
  if groups is not None:
    Kf, Gf = groups
    out = out.reshape(B, Kf, T, Gf, -1).transpose(0, 2, 1, 3, 4).reshape(B, T, N, -1)
    if lse is not None:
      lse = lse.reshape(B, Kf, Gf, T).reshape(B, N, T)
  return (out, lse) if return_lse else out
