"""Mixture of block attention (catalog family (f), ``moba``) as a pure JAX function.

"MoBA: Mixture of Block Attention for Long-Context LLMs".

Dimension key: B batch, T query length, S key/value length, N query heads, K kv heads
(G = N // K), H head dim, Hv value head dim, b block size, nC = ceil(S / b) blocks, k blocks
attended per query and head.

Causal and parameter-free. The keys are split into blocks of b tokens; per (query, head) the
gate scores every block by s_c = q · mean(K_c) in float32 (the last block averaging its real
keys). Blocks after the query's own block are excluded; the own block is always selected and
attended causally; the best k − 1 earlier blocks by the gate complete the selection (our
reading of the top-k convention: k counts the own block). With k >= nC every visible block
is selected and MoBA is causal attention; with k = 1 it is block-diagonal causal attention
(run as a ``ChunkedCausalMask`` on the xla / reference paths). The gate is a selection, not
a weighting: no gradient flows through it.

Selection is separate from attention (DESIGN.md): ``moba_select`` returns the selected
blocks ``[B, N, T, nC]`` per query token (so a decode step equals the last row of a full
call), and ``moba`` attends over them: one ``dot_product_attention`` call with a
``ChunkSelectionMask`` & causal mask over (example, head) pairs folded into the batch, the
blocked ``xla`` path skipping every (q block, kv block) tile that no query of the tile
selected (``longheads.attend_selected_chunks``).

On TPU / GPU (``pallas_tpu`` / ``pallas_gpu``; ``pallas_interpret`` simulates the TPU
kernel) the block-sparse kernels run the exact per-token selection
(``pallas_kernels.block_sparse.selected_blocks_attention``): per (query head, q tile) the
kernel walks the union of its queries' blocks, loading no other block; inside a tile the
predicate reads each query's selection (bit-packed per-head q operands) and the causal
order; a block every query of the tile chose, wholly in the past, runs without mask
arithmetic. Blocks must suit the kernel tiles (TPU: a multiple of 128; GPU: a power-of-two
divisor >= 16). The kernel path takes no extra ``mask``.
"""

import typing

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from attn_jax.attention import _checks, registry
from attn_jax.attention import api as api_lib
from attn_jax.attention import block_sparse as block_sparse_lib
from attn_jax.attention import longheads as longheads_lib
from attn_jax.attention import masks as masks_lib

PAPER = "MoBA: Mixture of Block Attention for Long-Context LLMs"
IMPLEMENTATIONS = block_sparse_lib.IMPLEMENTATIONS


def moba_select(
  q_BTNH: Float[Array, "B T N H"],
  k_BSKH: Float[Array, "B S K H"],
  *,
  block: int,
  top_k: int,
) -> Bool[Array, "B N T nC"]:
  """The blocks each (query, head) attends: its own block plus the best ``top_k − 1``
  earlier blocks by q · mean(K_c) (float32); never a future block. Query t sits at position
  S − T + t (bottom-right aligned, as the masks)."""
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  nC = -(-S // block)
  own_T = jnp.clip((S - T + jnp.arange(T)) // block, 0, nC - 1)
  c = jnp.arange(nC)
  own_TC = c[None, :] == own_T[:, None]
  if top_k == 1:  # the own block alone: the gate has nothing to choose
    return jnp.broadcast_to(own_TC, (B, N, T, nC))
  r_BCNH = jnp.repeat(longheads_lib.chunk_keys(k_BSKH, block), N // K, axis=2)
  gate_BNTC = jnp.einsum("BTNH,BCNH->BNTC", q_BTNH.astype(jnp.float32), r_BCNH.astype(jnp.float32))
  earlier_TC = c[None, :] < own_T[:, None]
  rank = jnp.where(own_TC, jnp.inf, jnp.where(earlier_TC, gate_BNTC, -jnp.inf))
  _, idx = jax.lax.top_k(jax.lax.stop_gradient(rank), min(top_k, nC))
  picked = jnp.any(idx[..., None] == c, axis=-2)
  return picked & (earlier_TC | own_TC)


@typing.no_type_check
def moba(
  q_BTNH: Float[Array, "B T N H"],
  k_BSKH: Float[Array, "B S K H"],
  v_BSKV: Float[Array, "B S K Hv"],
  *,
  moba_block: int = 64,
  moba_top_k: int = 3,
  mask: masks_lib.Mask | None = None,
  implementation: str | None = None,
  return_selection: bool = False,
):
  """MoBA (MoBA: Mixture of Block Attention for Long-Context LLMs); causal. See the module
  docstring for the rule.

  Args:
    q_BTNH, k_BSKH, v_BSKV: queries, keys, values (already rotated).
    moba_block: block size b.
    moba_top_k: blocks per query and head, the own block included (>= 1).
    mask: an extra mask (e.g. packed documents), combined with the selection and causality.
    implementation: "reference", "xla" (default) or a Pallas kernel name (see above).
    return_selection: also return the selection, bool ``[B, N, T, nC]``.
  """
  dims = _checks.check_qkv(q_BTNH, k_BSKH, v_BSKV)
  _checks.positive_int("moba_block", moba_block)
  _checks.positive_int("moba_top_k", moba_top_k)
  if mask is not None and not isinstance(mask, masks_lib.Mask):
    raise ValueError(f"mask must be an attn_jax.attention.masks.Mask or None; got {type(mask)}")
  impl = implementation or "xla"
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; got {impl!r}")
  if impl in block_sparse_lib.KERNELS:
    if mask is not None:
      raise NotImplementedError(
        f"moba implementation {impl!r} takes no extra mask (the kernel's predicate holds the "
        "selection); use 'xla' or 'reference' with a mask"
      )
    selected = moba_select(q_BTNH, k_BSKH, block=moba_block, top_k=moba_top_k)
    out = block_sparse_lib.selected_blocks_attention(
      q_BTNH, k_BSKH, v_BSKV, selected, block=moba_block, causal=True, implementation=impl
    )
    return (out, selected) if return_selection else out
  if mask is not None:
    mask.check_shapes(dims.B, dims.T, dims.S)
  selected = moba_select(q_BTNH, k_BSKH, block=moba_block, top_k=moba_top_k)
  if moba_top_k == 1:
    # The own block alone, causally: a static block-diagonal causal mask, whose tile lists
    # are host constants (no per-head selection to read in the tiles). Measured on one
    # pinned core, 4 heads, T = 4096, block 128, forward: 13.3 vs 15.1 ms (medians of 60).
    own = masks_lib.ChunkedCausalMask(moba_block)
    tiles = {}
    if impl == "xla":
      tile = longheads_lib.selection_tile(moba_block)
      tiles = {"block_q": tile, "block_kv": tile}
    out = api_lib.dot_product_attention(
      q_BTNH,
      k_BSKH,
      v_BSKV,
      mask=own if mask is None else own & mask,
      implementation=impl,
      **tiles,
    )
    return (out, selected) if return_selection else out
  base = masks_lib.CausalMask() if mask is None else masks_lib.CausalMask() & mask
  out = longheads_lib.attend_selected_chunks(
    q_BTNH, k_BSKH, v_BSKV, selected, moba_block, base, impl, moba_top_k
  )
  return (out, selected) if return_selection else out


def selection_mask_dense(selected_BNTC, block: int, S: int) -> Bool[Array, "B N T S"]:
  """The dense [B, N, T, S] visibility of a selection with causality (bottom-right aligned):
  the masked reference the fast path is compared with."""
  B, N, T, nC = selected_BNTC.shape
  keys = jnp.repeat(selected_BNTC, block, axis=-1)[..., :S]
  causal = jnp.arange(S)[None, :] <= (S - T + jnp.arange(T))[:, None]
  return keys & causal


def _build(key, dims, causal):
  del key, dims, causal
  return {"moba_block": 4, "moba_top_k": 2}


registry.register(
  registry.Mechanism(
    id="moba",
    family="f",
    paper=PAPER,
    entry_point="attn_jax.attention.moba:moba",
    implementations=IMPLEMENTATIONS,
    patterns=registry.CAUSAL_PATTERNS,
    decode=True,
    tier=1,
    check="k >= the number of blocks equals causal. The block-sparse output equals a dense "
    "masked reference built from the same selection. The own block is always selected and "
    "never a future one.",
    build=_build,
    module=registry.NN_ATTENTION,
  )
)
