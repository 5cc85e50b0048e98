"""Head-wise chunk selection (catalog family (d), ``longheads``) as a pure JAX function.

"LongHeads: Multi-Head Attention is Secretly a Long Context Processor".

Dimension key: B batch, T query length, S key/value length, N query heads, K kv heads
(G = N // K), H head dim, Hv value head dim, C chunk size, nC = ceil(S / C) chunks, k chunks
kept per query and head.

Training-free: the keys are split into chunks of C tokens, each represented by its mean key
(our reading of the chunk representation: r_c = mean_(s ∈ c) k_s, the last chunk averaging
its real keys). For every query token t (at position p = S − T + t, bottom-right aligned as
the masks) and head n, the chunks are scored by q_t,n · r_c,n//G; the head keeps the first
chunk, the local chunk (the one holding p) and the best k − 2 others among the chunks it may
see (causal: chunks up to the local one), then attends with softmax over the kept chunks'
keys only (and causality inside the local chunk). The attended length of every head is at
most k·C tokens; together the heads cover the whole context. With k >= nC every chunk is
kept and the function is full attention.

Not built: the paper remaps positions so that the kept chunks sit inside the pre-trained
window; here q and k arrive already rotated, so positions are the original ones.

Fast path: selection is per query token (so a decode step equals the last row of a full
call). The kept chunks become a ``ChunkSelectionMask`` per head and each head is one
``dot_product_attention`` call (heads vmapped; K/V read per query head). The blocked ``xla``
path skips a (q block, kv block) tile only when no query of the tile kept a chunk in it, so
the saving grows with the agreement of neighbouring queries; the Pallas kernels do not take
per-query masks: not built.
"""

import functools
import typing

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from attn_jax.attention import _checks, registry
from attn_jax.attention import api as api_lib
from attn_jax.attention import masks as masks_lib
from attn_jax.attention import xla as xla_lib

PAPER = "LongHeads: Multi-Head Attention is Secretly a Long Context Processor"
IMPLEMENTATIONS = ("reference", "xla")
DEFAULT_CHUNK = 64
DEFAULT_TOP_K = 4


def chunk_keys(k_BSKH: Float[Array, "B S K H"], chunk: int) -> Float[Array, "B nC K H"]:
  """Mean key of every chunk of ``chunk`` tokens (the last chunk over its real keys)."""
  B, S, K, H = k_BSKH.shape
  nC = -(-S // chunk)
  x = k_BSKH.astype(jnp.promote_types(k_BSKH.dtype, jnp.float32))
  x = jnp.pad(x, ((0, 0), (0, nC * chunk - S), (0, 0), (0, 0)))
  sums = x.reshape(B, nC, chunk, K, H).sum(2)
  counts = jnp.minimum(chunk, S - chunk * jnp.arange(nC)).astype(x.dtype)
  return sums / counts[None, :, None, None]


def select_chunks(
  q_BTNH: Float[Array, "B T N H"],
  k_BSKH: Float[Array, "B S K H"],
  *,
  causal: bool,
  chunk: int,
  top_k: int,
) -> Bool[Array, "B N T nC"]:
  """The chunks each (query, head) keeps: first, local, and the best ``top_k − 2`` others
  by q · r_c among the visible chunks (all visible ones when fewer)."""
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  nC = -(-S // chunk)
  r_BCNH = jnp.repeat(chunk_keys(k_BSKH, chunk), N // K, axis=2)
  q = q_BTNH.astype(r_BCNH.dtype)
  score_BNTC = jnp.einsum("BTNH,BCNH->BNTC", q, jax.lax.stop_gradient(r_BCNH))
  local_T = jnp.clip((S - T + jnp.arange(T)) // chunk, 0, nC - 1)
  c = jnp.arange(nC)
  visible_TC = c[None, :] <= local_T[:, None] if causal else jnp.ones((T, nC), bool)
  forced_TC = (c[None, :] == 0) | (c[None, :] == local_T[:, None])
  rank = jnp.where(forced_TC, jnp.inf, jnp.where(visible_TC, score_BNTC, -jnp.inf))
  _, idx = jax.lax.top_k(jax.lax.stop_gradient(rank), min(top_k, nC))
  kept = jnp.any(idx[..., None] == c, axis=-2)
  return kept & visible_TC


@typing.no_type_check
def longheads(
  q_BTNH: Float[Array, "B T N H"],
  k_BSKH: Float[Array, "B S K H"],
  v_BSKV: Float[Array, "B S K Hv"],
  *,
  causal: bool,
  longheads_chunk: int = DEFAULT_CHUNK,
  longheads_top_k: int = DEFAULT_TOP_K,
  mask: masks_lib.Mask | None = None,
  implementation: str | None = None,
  return_selection: bool = False,
):
  """LongHeads chunk selection (LongHeads: Multi-Head Attention is Secretly a Long Context
  Processor); see the module docstring for the rule.

  Args:
    q_BTNH, k_BSKH, v_BSKV: queries, keys, values (already rotated).
    causal: causal (bottom-right aligned) or not.
    longheads_chunk: chunk size C (default 64).
    longheads_top_k: chunks kept per query and head, first and local included (>= 2 unless
      there is a single chunk; default 4).
    mask: an extra mask (e.g. packed documents), combined with the selection.
    implementation: "reference" or "xla" (default: "xla").
    return_selection: also return the kept chunks, bool ``[B, N, T, nC]``.

  Returns:
    ``[B, T, N, Hv]`` (and the selection).
  """
  dims = _checks.check_qkv(q_BTNH, k_BSKH, v_BSKV)
  if not isinstance(causal, bool):
    raise ValueError(f"causal must be a bool; got {causal!r}")
  chunk = _checks.positive_int("longheads_chunk", longheads_chunk)
  top_k = _checks.positive_int("longheads_top_k", longheads_top_k)
  if top_k < 2 and -(-dims.S // chunk) > 1:
    raise ValueError(
      f"longheads_top_k must be >= 2 (the first and the local chunk are always kept); got {top_k}"
    )
  if mask is not None and not isinstance(mask, masks_lib.Mask):
    raise ValueError(f"mask must be an attn_jax.attention.masks.Mask or None; got {type(mask)}")
  impl = implementation or "xla"
  if impl not in IMPLEMENTATIONS:
    if impl in api_lib.IMPLEMENTATIONS:
      raise NotImplementedError(
        f"longheads implementation {impl!r} is not built: the flash kernels take block-level "
        "masks, not the per-query chunk selection; use 'xla' or 'reference'"
      )
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; got {impl!r}")
  if mask is not None:
    mask.check_shapes(dims.B, dims.T, dims.S)
  selected = select_chunks(q_BTNH, k_BSKH, causal=causal, chunk=chunk, top_k=top_k)
  base = masks_lib.CausalMask() if causal else None
  if mask is not None:
    base = mask if base is None else base & mask
  out = attend_selected_chunks(q_BTNH, k_BSKH, v_BSKV, selected, chunk, base, impl, top_k)
  return (out, selected) if return_selection else out


def selection_tile(chunk: int, smallest: int = 64, largest: int = 512) -> int:
  """The blocked path's tile for chunk selections: the chunk itself (so an unselected chunk
  is a skipped tile), rounded up to a multiple of the chunk of at least ``smallest`` tokens
  (tiny tiles cost more in loop overhead than they save), and at most ``largest``."""
  return min(largest, chunk * max(1, -(-smallest // chunk)))


def selection_xla_tile(chunk: int, num_chunks: int, top_k: int | None) -> int | None:
  """The xla path's tile for a chunk selection, or None for its default tiles.

  * A very sparse selection (``top_k``, chunks per query, at most 1/32 of ``num_chunks``):
    ``selection_tile(chunk)``, so unselected chunks are skipped tiles. Measured on one 2-core
    device (bench_sparse.py, T = 4096, chunk 128, forward+backward vs dense causal): top_k =
    1 of 32 chunks 2.7x -> 5.0x with chunk tiles.
  * Otherwise, on a device with at most one core (``xla.cpu_cores_per_device``): chunk tiles
    of at least 128 tokens. Measured on one pinned core, 4 heads, T = 4096 / 8192, MoBA-style
    selections of 2..32 of 32..64 chunks: 128-token tiles vs the default 512 forward
    196-219 vs 242-263 ms (T = 4096, chunk 128) and 835 vs 1128 ms (T = 8192, top 8 of 64);
    chunk 64: 128-token tiles 247-263 vs 311-328 ms forward, 638 vs 759 ms forward+backward.
  * Otherwise the default tiles: on a multi-core device the union of the picks of a tile's
    queries covers most chunks anyway, and there chunk tiles measured 2x slower (top_k =
    2..16 of 32: 0.4x vs 0.85x of dense causal)."""
  if top_k is not None and 32 * top_k <= num_chunks:
    return selection_tile(chunk)
  if xla_lib.cpu_cores_per_device() <= 1:
    return selection_tile(chunk, smallest=128)
  return None


def attend_selected_chunks(
  q_BTNH, k_BSKH, v_BSKV, selected_BNTC, chunk: int, base_mask, implementation, top_k=None
) -> Float[Array, "B T N Hv"]:
  """Attention of each (query, head) over the key chunks it selected (``selected_BNTC``),
  combined with ``base_mask`` (causality, packing): one ``dot_product_attention`` call with
  a ``ChunkSelectionMask`` over (example, head) pairs folded into the batch (heads vmapped
  instead when ``base_mask`` holds per-example arrays; K/V read per query head), so the
  blocked path skips the tiles no query of a tile selected.

  The xla path's tiles (``selection_xla_tile``): chunk-granular when the selection is very
  sparse or a device has at most one core, else the default tiles."""

  def attend(q, k, v, sel_BTC, fold_heads):
    m = masks_lib.ChunkSelectionMask(sel_BTC, chunk)
    m = m if base_mask is None else m & base_mask
    impl = implementation or api_lib.default_implementation(mask=m)
    tiles = {}
    tile = selection_xla_tile(chunk, sel_BTC.shape[-1], top_k) if impl == "xla" else None
    if tile is not None:
      tiles = {"block_q": tile, "block_kv": tile}
    if fold_heads:
      return api_lib.heads_folded_attention(q, k, v, mask=m, implementation=impl, **tiles)
    out = api_lib.dot_product_attention(
      q[:, :, None], k[:, :, None], v[:, :, None], mask=m, implementation=impl, **tiles
    )
    return out[:, :, 0]

  if base_mask is not None and base_mask.batched:  # its arrays are per example: vmap heads
    G = q_BTNH.shape[2] // k_BSKH.shape[2]
    k_rep = jnp.repeat(k_BSKH, G, axis=2) if G > 1 else k_BSKH
    v_rep = jnp.repeat(v_BSKV, G, axis=2) if G > 1 else v_BSKV
    one_head = functools.partial(attend, fold_heads=False)
    return jax.vmap(one_head, in_axes=(2, 2, 2, 1), out_axes=2)(q_BTNH, k_rep, v_rep, selected_BNTC)
  # Heads folded into the batch: one call whose tile lists are per (example, head).
  B, N = q_BTNH.shape[0], q_BTNH.shape[2]
  sel = selected_BNTC.reshape(B * N, *selected_BNTC.shape[2:])
  return attend(q_BTNH, k_BSKH, v_BSKV, sel, fold_heads=True)


def _build(key, dims, causal):
  del key, dims
  return {"causal": causal, "longheads_chunk": 4, "longheads_top_k": 3}


registry.register(
  registry.Mechanism(
    id="longheads",
    family="d",
    paper=PAPER,
    entry_point="attn_jax.attention.longheads:longheads",
    implementations=IMPLEMENTATIONS,
    patterns=registry.ALL_PATTERNS,
    decode=True,
    tier=2,
    check="k >= the number of chunks, with no remapping, equals full attention. A head's "
    "attended length never exceeds the budget k·C. (Position remapping not built: q/k arrive "
    "rotated.)",
    build=_build,
    module=registry.NN_ATTENTION,
  )
)
