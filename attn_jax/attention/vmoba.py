"""Video mixture of block attention (catalog family (f), ``vmoba``) as a pure JAX function.

"VMoBA: Mixture-of-Block Attention for Video Diffusion Models".

Dimension key: B batch, T = F·Hi·Wi video tokens (frames × height × width, frame-major),
N query heads, K kv heads (G = N // K), H head dim, Hv value head dim, (bt, bh, bw) block
shape, b = bt·bh·bw tokens per block, nC = T / b blocks.

Non-causal MoBA for video diffusion transformers, with three changes:

  * Partition: the tokens are permuted so that each block of the partition is contiguous:
    1-D blocks (bt, Hi, Wi) (temporal: whole frames), 2-D blocks (1, bh, bw) (spatial
    tiles of one frame) or 3-D blocks (bt, bh, bw) (spatio-temporal cubes). The paper
    cycles 1-D → 2-D → 3-D across layers; here the partition is the ``vmoba_block`` of the
    call, and the NNX kind cycles it by depth (option ``vmoba_block="bt,Hi,Wi;1,bh,bw;..."``:
    layer l uses entry l − 1 modulo their number). The permutation round-trips exactly
    (``partition_order`` / its inverse).
  * Global selection (our reading): per query token and head the MoBA gate
    s_t,j = q_t · mean(K_j) (float32) is normalised over the key blocks,
    p_t,j = softmax_j(s_t,j / √H), and the (query, block) pairs of the whole head are ranked
    together by p: the head keeps the smallest set of pairs, largest first, whose mass
    reaches τ·T (each query row has mass 1, so τ is the share of the head's total gate mass).
    Salient queries thus keep many blocks and flat ones few.
  * Threshold: that τ replaces MoBA's fixed top-k. Every query also keeps its own block.

τ = 1 keeps every pair: full attention. The selection is detached (no gradient).

Fast paths: the selection is per (query token, head), which is what the block-sparse
kernels' token-level selection takes (``pallas_kernels.block_sparse.
selected_blocks_attention``, non-causal: unselected blocks never loaded); on CPU the blocked
path with a chunk-selection mask skips tiles no query selected.
"""

import functools
import typing

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from attn_jax.attention import _checks, registry
from attn_jax.attention import block_sparse as block_sparse_lib

PAPER = "VMoBA: Mixture-of-Block Attention for Video Diffusion Models"
IMPLEMENTATIONS = block_sparse_lib.IMPLEMENTATIONS


def _triple(name, value):
  if (
    not isinstance(value, tuple | list)
    or len(value) != 3
    or not all(
      isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= 1 for v in value
    )
  ):
    raise ValueError(f"{name} must be three positive ints; got {value!r}")
  return tuple(int(v) for v in value)


@functools.lru_cache(maxsize=64)
def partition_order(grid, block) -> np.ndarray:
  """int ``[T]``: position p of the block-major order holds frame-major token order[p]."""
  F, Hi, Wi = grid
  bt, bh, bw = block
  if F % bt or Hi % bh or Wi % bw:
    raise ValueError(f"video grid {grid} must split into whole {block} blocks")
  idx = np.arange(F * Hi * Wi).reshape(F // bt, bt, Hi // bh, bh, Wi // bw, bw)
  return idx.transpose(0, 2, 4, 1, 3, 5).reshape(-1)


def to_blocks(x_BT, grid, block):
  """Frame-major tokens (axis 1) → block-major (each block contiguous)."""
  return jnp.take(x_BT, jnp.asarray(partition_order(grid, block)), axis=1)


def from_blocks(x_BT, grid, block):
  """Block-major → frame-major: the exact inverse of ``to_blocks``."""
  inverse = np.argsort(partition_order(grid, block))
  return jnp.take(x_BT, jnp.asarray(inverse), axis=1)


def vmoba_select(
  q_BTNH: Float[Array, "B T N H"], k_BTKH: Float[Array, "B T K H"], *, block: int, tau: float
) -> Bool[Array, "B N T nC"]:
  """Global threshold selection per head on block-major tokens (module docstring)."""
  B, T, N, H = q_BTNH.shape
  K = k_BTKH.shape[2]
  nC = T // block
  q = jax.lax.stop_gradient(q_BTNH).astype(jnp.float32)
  kmean = jax.lax.stop_gradient(k_BTKH).astype(jnp.float32).reshape(B, nC, block, K, H).mean(2)
  kmean = jnp.repeat(kmean, N // K, axis=2)
  p = jax.nn.softmax(jnp.einsum("BTNH,BCNH->BNTC", q, kmean) / float(np.sqrt(H)), axis=-1)
  own = (jnp.arange(T) // block)[:, None] == jnp.arange(nC)[None, :]  # [T, nC]
  if tau >= 1:
    return jnp.ones((B, N, T, nC), bool)
  flat = p.reshape(B, N, T * nC)
  order = jnp.argsort(-flat, axis=-1)
  sorted_p = jnp.take_along_axis(flat, order, axis=-1)
  before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
  keep_sorted = before < tau * T
  keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
  return keep.reshape(B, N, T, nC) | own


@typing.no_type_check
def vmoba(
  q_BTNH: Float[Array, "B T N H"],
  k_BTKH: Float[Array, "B T K H"],
  v_BTKV: Float[Array, "B T K Hv"],
  *,
  vmoba_grid: tuple[int, int, int] | None = None,
  vmoba_block: tuple[int, int, int] = (1, 1, 1),
  vmoba_tau: float = 0.5,
  return_selection: bool = False,
  implementation: str | None = None,
):
  """VMoBA (non-causal self-attention over video tokens); see the module docstring.

  Args:
    q_BTNH, k_BTKH, v_BTKV: frame-major video tokens (T = F·Hi·Wi), S == T.
    vmoba_grid: (F, Hi, Wi); None treats the sequence as (T, 1, 1) (1-D blocks of bt tokens).
    vmoba_block: (bt, bh, bw), dividing the grid: (bt, Hi, Wi) 1-D, (1, bh, bw) 2-D, or 3-D.
    vmoba_tau: τ in (0, 1], the share of each head's gate mass to keep (1: full attention).
    return_selection: also return the selection, bool ``[B, N, T, nC]`` in block-major order.
    implementation: "xla" (default), "reference" or a Pallas kernel name.
  """
  dims = _checks.check_qkv(q_BTNH, k_BTKH, v_BTKV)
  if dims.S != dims.T:
    raise ValueError(f"vmoba is self-attention over one video: needs S == T; got {dims}")
  grid = (dims.T, 1, 1) if vmoba_grid is None else _triple("vmoba_grid", vmoba_grid)
  block = _triple("vmoba_block", vmoba_block)
  if grid[0] * grid[1] * grid[2] != dims.T:
    raise ValueError(f"vmoba_grid {grid} must hold T={dims.T} tokens")
  if not 0 < float(vmoba_tau) <= 1:
    raise ValueError(f"vmoba_tau must be in (0, 1]; got {vmoba_tau!r}")
  impl = implementation or "xla"
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; got {impl!r}")
  b = block[0] * block[1] * block[2]
  q, k, v = (to_blocks(x, grid, block) for x in (q_BTNH, k_BTKH, v_BTKV))
  selected = vmoba_select(q, k, block=b, tau=float(vmoba_tau))
  out = block_sparse_lib.selected_blocks_attention(
    q, k, v, selected, block=b, causal=False, implementation=impl
  )
  out = from_blocks(out, grid, block)
  return (out, selected) if return_selection else out


def _build(key, dims, causal):
  del key, causal
  return {"vmoba_grid": None, "vmoba_block": (3, 1, 1) if dims.T % 3 == 0 else (1, 1, 1)}


registry.register(
  registry.Mechanism(
    id="vmoba",
    family="f",
    paper=PAPER,
    entry_point="attn_jax.attention.vmoba:vmoba",
    implementations=IMPLEMENTATIONS,
    patterns=frozenset((registry.SELF,)),
    decode=False,
    tier=2,
    check="τ = 1 equals full attention. Each partition is a token permutation that "
    "round-trips exactly. The output equals a dense masked reference of the same selection; "
    "every query keeps its own block; the kept gate mass of a head reaches τ·T.",
    build=_build,
    module=registry.NN_ATTENTION,
  )
)
