"""Native sparse attention (catalog family (f), ``nsa``) as a pure JAX layer function.

"Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse Attention".

Dimension key: B batch, T length, D model dim, N query heads, K kv heads (G = N // K), H head
dim, Hv value head dim, l block length, nB = floor(T / l) complete blocks, nC = ceil(T / l)
blocks, n blocks selected per (query, kv head), w window.

Three attention branches over the same GQA projections, mixed per token and head by
sigmoid gates g = σ(x W_g) ∈ (0, 1)^3:

    o_t = g_cmp · Attn(q_t, K̃, Ṽ) + g_slc · Attn(q_t, K_sel(t), V_sel(t))
          + g_win · Attn(q_t, K_win(t), V_win(t))

  * Compressed: block b of l keys / values (tokens [b·l, (b+1)·l)) is compressed to one key
    k̃_b = φ_k(k_{b·l : (b+1)·l}) (and ṽ_b likewise). The paper's φ is a learned MLP with an
    intra-block position encoding; ours is a learned position-wise linear map,
    k̃_b = Σ_i W_k[i] ⊙ k_{b·l+i} (per position i, kv head and channel; initialised to the
    block mean). Query t sees compressed block b once it is complete: (b + 1)·l − 1 <= t.
  * Selected: block importance from the compressed attention probabilities, summed over the
    G query heads of a kv head (one selection per kv head, shared by its group, as the
    paper's kernel needs): imp_t,b = Σ_g p^cmp_t,b. Selection blocks equal compression
    blocks here (the paper's l' = l = d case). Each (query, kv head) keeps the first block,
    its own (current, possibly incomplete) block and the previous one (the local blocks),
    plus the best remaining past blocks by importance up to ``nsa_top_n`` blocks in all
    (our reading of "the first block and the local blocks are always kept"). Attention over
    the tokens of the selected blocks, causal. The selection is detached (no gradient).
  * Window: causal sliding-window attention over the last w keys.

Fast paths. The selected branch is per token and per kv head: on TPU / GPU it runs on the
block-sparse kernels (``pallas_kernels.block_sparse.selected_blocks_attention`` with the
selection bit-packed per kv head: unselected blocks are never loaded), on CPU through the
blocked path with a chunk-selection mask (``longheads.attend_selected_chunks``, skipping
tiles no query selected). The window branch is one flash / blocked call with a sliding-window
mask (tiles outside the band skipped). The compressed branch is materialised, ``[B, N, T,
nB]`` = T²/l logits (the importance needs those probabilities anyway).

Causal self-attention only; no extra mask (packed documents would need compression that
respects document boundaries: not built).
"""

import typing

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from attn_jax.attention import block_sparse as block_sparse_lib
from attn_jax.attention import heads as heads_lib
from attn_jax.attention import masks as masks_lib
from attn_jax.attention import registry
from attn_jax.attention.api import dot_product_attention

PAPER = "Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse Attention"
_BASE = ("w_q", "w_k", "w_v", "w_o")
_NAMES = _BASE + ("w_cmp_k", "w_cmp_v", "w_gate")


def compress(x_BSKH, w_LKH) -> Float[Array, "B nB K H"]:
  """Block compression φ: per complete block of l tokens, Σ_i W[i] ⊙ x_{b·l+i}."""
  B, S, K, H = x_BSKH.shape
  l = w_LKH.shape[0]
  nB = S // l
  blocks = x_BSKH[:, : nB * l].reshape(B, nB, l, K, H)
  return jnp.einsum("BCLKH,LKH->BCKH", blocks, w_LKH.astype(x_BSKH.dtype))


def compressed_attention(q_BTNH, kc_BCKH, vc_BCKV, block: int):
  """(o ``[B, T, N, Hv]``, p ``[B, N, T, nB]``): softmax over the complete blocks each query
  has passed ((b + 1)·l − 1 <= t); a query that passed none gives o = 0, p = 0."""
  B, T, N, H = q_BTNH.shape
  K = kc_BCKH.shape[2]
  G = N // K
  nB = kc_BCKH.shape[1]
  if nB == 0:  # shorter than one block: no compressed key yet
    return (
      jnp.zeros((B, T, N, vc_BCKV.shape[-1]), q_BTNH.dtype),
      jnp.zeros((B, N, T, 0), jnp.float32),
    )
  dtype = jnp.promote_types(q_BTNH.dtype, jnp.float32)
  q = q_BTNH.astype(dtype).reshape(B, T, K, G, H)
  s = jnp.einsum("BTKGH,BCKH->BKGTC", q, kc_BCKH.astype(dtype)) / float(np.sqrt(H))
  visible = (jnp.arange(nB)[None, :] + 1) * block - 1 <= jnp.arange(T)[:, None]  # [T, nB]
  s = jnp.where(visible, s, -jnp.inf)
  top = jnp.max(s, -1, keepdims=True)
  e = jnp.exp(s - jnp.where(jnp.isfinite(top), top, 0.0))
  total = e.sum(-1, keepdims=True)
  p = e / jnp.where(total > 0, total, 1.0)
  o = jnp.einsum("BKGTC,BCKV->BTKGV", p, vc_BCKV.astype(dtype)).reshape(B, T, N, -1)
  return o.astype(q_BTNH.dtype), p.reshape(B, N, T, nB)


def select_blocks(p_BNTC, num_kv_heads: int, T: int, block: int, top_n: int):
  """Per (kv head, query) the selected blocks, bool ``[B, K, T, nC]`` (module docstring)."""
  B, N, _, nB = p_BNTC.shape
  K = num_kv_heads
  nC = -(-T // block)
  imp = jax.lax.stop_gradient(p_BNTC).reshape(B, K, N // K, T, nB).sum(2)
  imp = jnp.pad(imp, ((0, 0), (0, 0), (0, 0), (0, nC - nB)))  # the incomplete block: 0
  own = jnp.arange(T) // block  # [T]
  c = jnp.arange(nC)
  past = c[None, :] <= own[:, None]  # [T, nC]
  forced = (c[None, :] == 0) | (c[None, :] == own[:, None]) | (c[None, :] == own[:, None] - 1)
  rank = jnp.where(forced & past, jnp.inf, jnp.where(past, imp, -jnp.inf))
  _, idx = jax.lax.top_k(rank, min(top_n, nC))
  picked = jnp.any(idx[..., None] == c, axis=-2)
  return picked & past


@typing.no_type_check
def nsa(
  params,
  x_BTD: Float[Array, "B T D"],
  *,
  context_BSD=None,
  causal: bool = True,
  implementation: str | None = None,
  mask=None,
  positions_BT=None,
  rope=None,
  nsa_top_n: int = 4,
  nsa_window: int = 64,
  return_aux: bool = False,
):
  """Native sparse attention (Native Sparse Attention: Hardware-Aligned and Natively
  Trainable Sparse Attention); see the module docstring.

  Args:
    params: ``init_nsa`` pytree: GQA projections ``w_q, w_k, w_v, w_o`` plus the compression
      maps ``w_cmp_k [l, K, H]``, ``w_cmp_v [l, K, Hv]`` (l = the block length) and the gate
      projection ``w_gate [D, N, 3]`` (compressed, selected, window).
    x_BTD: tokens; causal self-attention only (``context_BSD`` None, ``causal`` True).
    implementation: "xla" (default), "reference", or a Pallas kernel name (the selected and
      window branches run on the kernels).
    positions_BT, rope: RoPE on q and k (all three branches see the rotated q, k).
    nsa_top_n: blocks selected per (query, kv head), the forced ones included (>= 1).
    nsa_window: the window branch's w (>= 1).
    return_aux: also return ``{"gates": [B, T, N, 3], "selected": [B, K, T, nC],
      "branches": (o_cmp, o_slc, o_win)}``.
  """
  if not isinstance(params, dict) or set(params) != set(_NAMES):
    got = sorted(params) if isinstance(params, dict) else type(params)
    raise ValueError(f"nsa params must hold {sorted(_NAMES)}; got {got}")
  if context_BSD is not None or causal is not True:
    raise ValueError("nsa is causal self-attention: pass causal=True and no context_BSD")
  if mask is not None:
    raise NotImplementedError(
      "nsa takes no extra mask (packed documents would need compression that respects "
      "document boundaries); use unpacked sequences"
    )
  for name, value in (("nsa_top_n", nsa_top_n), ("nsa_window", nsa_window)):
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
      raise ValueError(f"{name} must be an int >= 1; got {value!r}")
  base = {k: params[k] for k in _BASE}
  dims = heads_lib.static_dims(base, "gqa")
  l = int(np.shape(params["w_cmp_k"])[0])
  want = {
    "w_cmp_k": (l, dims.Kk, dims.H),
    "w_cmp_v": (l, dims.Kv, dims.Hv),
    "w_gate": (dims.D, dims.N, 3),
  }
  for name, shape in want.items():
    if tuple(np.shape(params[name])) != shape:
      raise ValueError(f"params[{name!r}] must have shape {shape}; got {np.shape(params[name])}")
  impl = implementation or "xla"
  call = heads_lib._check_call(dims.D, x_BTD, None, True, None, positions_BT, rope)
  q, k, v = heads_lib._static_qkv(base, x_BTD, x_BTD, call)
  B, T, N, _ = q.shape
  K = k.shape[2]

  kc = compress(k, params["w_cmp_k"])
  vc = compress(v, params["w_cmp_v"])
  o_cmp, p_cmp = compressed_attention(q, kc, vc, l)
  selected = select_blocks(p_cmp, K, T, l, int(nsa_top_n))  # [B, K, T, nC]
  o_slc = block_sparse_lib.selected_blocks_attention(
    q, k, v, selected, block=l, causal=True, implementation=impl
  )
  o_win = dot_product_attention(
    q, k, v, mask=masks_lib.sliding_window(int(nsa_window)), implementation=impl
  )
  gates = jax.nn.sigmoid(jnp.einsum("BTD,DNC->BTNC", x_BTD, params["w_gate"].astype(x_BTD.dtype)))
  o = (
    gates[..., 0:1] * o_cmp.astype(x_BTD.dtype)
    + gates[..., 1:2] * o_slc.astype(x_BTD.dtype)
    + gates[..., 2:3] * o_win.astype(x_BTD.dtype)
  )
  y = heads_lib.output_projection(base, o)
  aux = {"gates": gates, "selected": selected, "branches": (o_cmp, o_slc, o_win)}
  return heads_lib._finish(y, aux, return_aux)


def param_specs(
  *,
  d_model: int,
  num_heads: int,
  num_kv_heads: int | None = None,
  head_dim: int | None = None,
  v_head_dim: int | None = None,
  nsa_block: int = 16,
) -> dict:
  """GQA projections (K default N/2), compression maps (block mean at init) and the gate
  projection (zero: every gate 1/2 at init)."""
  if isinstance(nsa_block, bool) or not isinstance(nsa_block, int) or nsa_block < 1:
    raise ValueError(f"nsa_block must be an int >= 1; got {nsa_block!r}")
  specs = heads_lib.param_specs(
    "gqa",
    d_model=d_model,
    num_heads=num_heads,
    num_kv_heads=num_kv_heads,
    head_dim=head_dim,
    v_head_dim=v_head_dim,
  )
  (D, N, H), (_, K, Hv) = specs["w_q"][0], specs["w_v"][0]

  def const(value):
    return lambda key, shape, dtype: jnp.full(shape, value, dtype)

  specs["w_cmp_k"] = ((nsa_block, K, H), const(1.0 / nsa_block), (None, "kv_heads", None))
  specs["w_cmp_v"] = ((nsa_block, K, Hv), const(1.0 / nsa_block), (None, "kv_heads", None))
  specs["w_gate"] = ((D, N, 3), const(0.0), ("embed", "heads", None))
  return specs


init_nsa = heads_lib.make_init(
  "nsa",
  ("v_head_dim", "nsa_block", "nsa_top_n", "nsa_window"),
  param_specs,
  call_options=("nsa_top_n", "nsa_window"),
)


def _build(key, dims, causal):
  del key, dims, causal
  return {"nsa_top_n": 2, "nsa_window": 5}


registry.register(
  registry.Mechanism(
    id="nsa",
    family="f",
    paper=PAPER,
    entry_point="attn_jax.attention.nsa:nsa",
    implementations=registry.KERNEL_IMPLEMENTATIONS,
    patterns=frozenset((registry.SELF_CAUSAL,)),
    decode=False,
    tier=2,
    check="Selecting every block, with window >= T, makes the selected and window branches "
    "equal causal attention. All heads of a kv group share one block list; the first, own "
    "and previous blocks are always selected, never a future one.",
    build=_build,
    module="attn_jax.nn.nsa:NSAAttention",
    interface="layer",
    init="attn_jax.attention.nsa:init_nsa",
  )
)
