"""Per-head window sizes (catalog family (f), ``mw_mha``) as a pure JAX function.

"Masked Autoencoders with Multi-Window Local-Global Attention Are Better Audio Learners".

Dimension key: B batch, T = S length, N query heads, K kv heads (G = N // K), H head dim,
Hv value head dim.

In one layer each head n attends inside non-overlapping windows of its own size w_n (block
diagonal: query and key in the same block of w_n positions); w_n = 0 makes the head global.
With every w_n >= T (or 0) the layer is MHA. Fast path: the heads are grouped by window size
and each group is one ``dot_product_attention`` call with a block-diagonal mask (causal
within a window for the causal pattern), so the blocked paths and the flash kernels skip the
off-window tiles; the groups' outputs are put back in head order.
"""

import typing

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from attn_jax.attention import _checks, registry
from attn_jax.attention import api as api_lib
from attn_jax.attention import masks as masks_lib

PAPER = "Masked Autoencoders with Multi-Window Local-Global Attention Are Better Audio Learners"


def head_mask(window: int, causal: bool, extra=None):
  """The mask of one head: block-diagonal windows (0: global), causal inside if asked."""
  mask = masks_lib.window_blocks(window) if window else None
  if causal:
    mask = masks_lib.CausalMask() if mask is None else mask & masks_lib.CausalMask()
  if extra is not None:
    mask = extra if mask is None else mask & extra
  return mask


@typing.no_type_check
def mw_mha(
  q_BTNH: Float[Array, "B T N H"],
  k_BTKH: Float[Array, "B T K H"],
  v_BTKV: Float[Array, "B T K Hv"],
  *,
  windows,
  causal: bool = False,
  mask=None,
  implementation: str | None = None,
):
  """Multi-window attention: head n sees the block of ``windows[n]`` positions holding its
  query (0: every position). ``mask``: an extra mask (e.g. packed documents)."""
  dims = _checks.check_qkv(q_BTNH, k_BTKH, v_BTKV)
  if dims.S != dims.T:
    raise ValueError(f"mw_mha is self-attention: needs S == T; got T={dims.T}, S={dims.S}")
  windows = tuple(windows)
  if len(windows) != dims.N or any(
    isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 0 for w in windows
  ):
    raise ValueError(f"windows must hold one int >= 0 per query head (N={dims.N}); got {windows!r}")
  G = dims.N // dims.K
  out = [None] * dims.N
  for w in sorted(set(windows)):
    heads = np.array([n for n, wn in enumerate(windows) if wn == w])
    o = api_lib.dot_product_attention(
      q_BTNH[:, :, heads],
      k_BTKH[:, :, heads // G],
      v_BTKV[:, :, heads // G],
      mask=head_mask(int(w), causal, mask),
      implementation=implementation,
    )
    for i, n in enumerate(heads):
      out[n] = o[:, :, i]
  return jnp.stack(out, axis=2)


def default_windows(num_heads: int, window: int) -> tuple[int, ...]:
  """Heads alternate between ``window`` and global (0), starting with a windowed head."""
  return tuple(window if n % 2 == 0 else 0 for n in range(num_heads))


def _build(key, dims, causal):
  del key
  return {"windows": tuple([4, 8, 0, 5][n % 4] for n in range(dims.N)), "causal": causal}


registry.register(
  registry.Mechanism(
    id="mw_mha",
    family="f",
    paper=PAPER,
    entry_point="attn_jax.attention.multi_window:mw_mha",
    implementations=registry.KERNEL_IMPLEMENTATIONS,
    patterns=frozenset((registry.SELF, registry.SELF_CAUSAL)),
    decode=False,
    tier=2,
    check="If every head uses the full window, the layer equals MHA. Each head's output equals "
    "its windowed attention run separately.",
    build=_build,
    module=registry.NN_ATTENTION,
  )
)
