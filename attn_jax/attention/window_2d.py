"""Locally-grouped and global sub-sampled attention (catalog family (f), ``window_2d``), and
DaViT's channel-group attention (``davit``), as pure JAX functions on image tokens.

"Twins: Revisiting the Design of Spatial Attention in Vision Transformers";
"DaViT: Dual Attention Vision Transformers".

Dimension key: B batch, T = Hi·Wi image tokens (row-major), N query heads, K kv heads
(G = N // K), H head dim, Hv value head dim, (wh, ww) window, (rh, rw) sub-sampling window,
nW = T / (wh·ww) windows, nR = T / (rh·rw) sub-sampled tokens.

Twins alternates two layers:
  * LSA (``mode="local"``): attention inside non-overlapping wh × ww windows. The tokens are
    laid out window-major (``biformer.regions_2d``) and the windows become the batch:
    one attention call on ``[B·nW, wh·ww, N, H]`` (flash / blocked, short KV), no mask.
  * GSA (``mode="global"``): every query attends to one key / value per rh × rw window,
    sub-sampled by a strided conv. Ours is a depthwise conv on the projected keys and values
    (a learned weight per window position, kv head and channel, ``[rh·rw, K, H]``; default
    the window mean), where the paper's conv acts on x before the projections (a full
    conv: our depthwise form is its restriction). One attention call with S = nR.
Checks: a window equal to the whole image is global attention; a sub-sampling window of
1 × 1 (weight 1) is global attention.

DaViT alternates spatial window attention (LSA above) with channel-group attention: each
head's H channels are one group, the channels become the tokens,

    A_n = softmax(Q_nᵀ·K_n / √H) ∈ R^(H×H),   out_n = V_n·A_nᵀ ∈ R^(T×H)

(global over all pixels, linear in T; Hv = H). It is standard attention applied to the
transposed token matrices (``[B, H, N, T]``, the T pixels as the head dim) with scale 1/√H,
which is how every implementation computes it.

The NNX kinds cycle the mode by depth (``"local;global"``, ``"spatial;channel"``): layer l
uses entry (l − 1) mod (number of entries).
"""

import typing

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from attn_jax.attention import _checks, registry
from attn_jax.attention.api import dot_product_attention
from attn_jax.attention.biformer import regions_2d, unregions_2d

PAPER_TWINS = "Twins: Revisiting the Design of Spatial Attention in Vision Transformers"
PAPER_DAVIT = "DaViT: Dual Attention Vision Transformers"
IMPLEMENTATIONS = registry.KERNEL_IMPLEMENTATIONS
MODES = ("local", "global")


def _pair(name, value):
  if isinstance(value, int | np.integer) and not isinstance(value, bool):
    value = (value, value)
  if (
    not isinstance(value, tuple | list)
    or len(value) != 2
    or not all(
      isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= 1 for v in value
    )
  ):
    raise ValueError(f"{name} must be a positive int or a pair of them; got {value!r}")
  return int(value[0]), int(value[1])


def _grid(grid, T):
  grid = (T, 1) if grid is None else _pair("grid", grid)
  if grid[0] * grid[1] != T:
    raise ValueError(f"grid {grid} must hold T={T} tokens")
  return grid


def _image(x_BTNH, grid):
  return x_BTNH.reshape(x_BTNH.shape[0], *grid, *x_BTNH.shape[2:])


def local_attention(q, k, v, *, grid, window, implementation=None):
  """LSA: attention inside each window; windows as the batch."""
  B, T, N, H = q.shape
  grid, window = _grid(grid, T), _pair("window", window)
  if grid[0] % window[0] or grid[1] % window[1]:
    raise ValueError(f"image {grid} must split into whole {window} windows")
  n = window[0] * window[1]
  qw, kw, vw = (regions_2d(_image(x, grid), window) for x in (q, k, v))
  fold = lambda x: x.reshape(B * (T // n), n, *x.shape[2:])  # noqa: E731
  out = dot_product_attention(fold(qw), fold(kw), fold(vw), implementation=implementation)
  out = out.reshape(B, T, N, -1)
  return unregions_2d(out, grid, window).reshape(B, T, N, -1)


def subsample(x_BTKH, weight_RKH, *, grid, ratio):
  """GSA's sub-sampled keys or values: per rh × rw window Σ_i w_i ⊙ x_i, ``[B, nR, K, H]``."""
  B, T = x_BTKH.shape[:2]
  ratio = _pair("ratio", ratio)
  if grid[0] % ratio[0] or grid[1] % ratio[1]:
    raise ValueError(f"image {grid} must split into whole {ratio} sub-sampling windows")
  r = ratio[0] * ratio[1]
  xr = regions_2d(_image(x_BTKH, grid), ratio).reshape(B, T // r, r, *x_BTKH.shape[2:])
  if weight_RKH is None:
    return xr.mean(2)
  if tuple(weight_RKH.shape) != (r, *x_BTKH.shape[2:]):
    raise ValueError(
      f"sub-sampling weight must have shape [rh·rw, K, H] = {(r, *x_BTKH.shape[2:])}; got "
      f"{tuple(weight_RKH.shape)}"
    )
  return jnp.einsum("BRIKH,IKH->BRKH", xr, weight_RKH.astype(x_BTKH.dtype))


@typing.no_type_check
def window_2d(
  q_BTNH: Float[Array, "B T N H"],
  k_BTKH: Float[Array, "B T K H"],
  v_BTKV: Float[Array, "B T K Hv"],
  *,
  w2d_grid: tuple[int, int] | None = None,
  w2d_mode: str = "local",
  w2d_window=7,
  w2d_ratio=2,
  gsa_k_weight=None,
  gsa_v_weight=None,
  implementation: str | None = None,
):
  """Twins LSA (``w2d_mode="local"``) or GSA (``"global"``) on image tokens; non-causal.

  Args:
    q_BTNH, k_BTKH, v_BTKV: row-major image tokens (T = Hi·Wi), S == T.
    w2d_grid: (Hi, Wi); None treats the sequence as (T, 1).
    w2d_mode: "local" (windows) or "global" (sub-sampled keys and values).
    w2d_window: LSA window (wh, ww) or one int.
    w2d_ratio: GSA sub-sampling window (rh, rw) or one int.
    gsa_k_weight, gsa_v_weight: GSA depthwise sub-sampling weights ``[rh·rw, K, H|Hv]``;
      None = window mean.
    implementation: passed to ``dot_product_attention``.
  """
  dims = _checks.check_qkv(q_BTNH, k_BTKH, v_BTKV)
  if dims.S != dims.T:
    raise ValueError(f"window_2d is self-attention over one image: needs S == T; got {dims}")
  if w2d_mode not in MODES:
    raise ValueError(f"w2d_mode must be one of {MODES}; got {w2d_mode!r}")
  grid = _grid(w2d_grid, dims.T)
  if w2d_mode == "local":
    return local_attention(
      q_BTNH, k_BTKH, v_BTKV, grid=grid, window=w2d_window, implementation=implementation
    )
  k_sub = subsample(k_BTKH, gsa_k_weight, grid=grid, ratio=w2d_ratio)
  v_sub = subsample(v_BTKV, gsa_v_weight, grid=grid, ratio=w2d_ratio)
  return dot_product_attention(q_BTNH, k_sub, v_sub, implementation=implementation)


def channel_attention(q_BTNH, k_BTKH, v_BTKV, *, implementation: str | None = None):
  """DaViT channel-group attention (module docstring), one group per head; Hv == H."""
  dims = _checks.check_qkv(q_BTNH, k_BTKH, v_BTKV)
  if dims.S != dims.T or dims.Hv != dims.H:
    raise ValueError(f"channel attention needs S == T and Hv == H; got {dims}")
  # Channels become the tokens: [B, T, n, H] -> [B, H, n, T]; one attention call.
  t = lambda x: x.transpose(0, 3, 2, 1)  # noqa: E731
  out = dot_product_attention(
    t(q_BTNH),
    t(k_BTKH),
    t(v_BTKV),
    scale=1.0 / float(np.sqrt(dims.H)),
    implementation=implementation,
  )
  return t(out)


@typing.no_type_check
def davit(
  q_BTNH: Float[Array, "B T N H"],
  k_BTKH: Float[Array, "B T K H"],
  v_BTKV: Float[Array, "B T K Hv"],
  *,
  davit_mode: str = "spatial",
  davit_grid: tuple[int, int] | None = None,
  davit_window=7,
  implementation: str | None = None,
):
  """DaViT's two attentions: ``davit_mode="spatial"`` (window attention, as Twins' LSA) or
  ``"channel"`` (channel-group attention); non-causal."""
  if davit_mode not in ("spatial", "channel"):
    raise ValueError(f"davit_mode must be 'spatial' or 'channel'; got {davit_mode!r}")
  if davit_mode == "channel":
    return channel_attention(q_BTNH, k_BTKH, v_BTKV, implementation=implementation)
  return window_2d(
    q_BTNH,
    k_BTKH,
    v_BTKV,
    w2d_grid=davit_grid,
    w2d_mode="local",
    w2d_window=davit_window,
    implementation=implementation,
  )


def _build_w2d(key, dims, causal):
  del key, causal
  return {"w2d_grid": None, "w2d_mode": "local", "w2d_window": (3, 1) if dims.T % 3 == 0 else 1}


def _build_davit(key, dims, causal):
  del key, causal
  if dims.Hv == dims.H:  # channel attention needs Hv == H
    return {"davit_mode": "channel"}
  return {"davit_mode": "spatial", "davit_window": (3, 1) if dims.T % 3 == 0 else 1}


registry.register(
  registry.Mechanism(
    id="window_2d",
    family="f",
    paper=PAPER_TWINS,
    entry_point="attn_jax.attention.window_2d:window_2d",
    implementations=IMPLEMENTATIONS,
    patterns=frozenset((registry.SELF,)),
    decode=False,
    tier=2,
    check="A window equal to the whole image gives global attention, and so does "
    "sub-sampling ratio 1. LSA equals attention under the block-diagonal window mask.",
    build=_build_w2d,
    module=registry.NN_ATTENTION,
  )
)

registry.register(
  registry.Mechanism(
    id="davit",
    family="f",
    paper=PAPER_DAVIT,
    entry_point="attn_jax.attention.window_2d:davit",
    implementations=("reference", "xla"),
    patterns=frozenset((registry.SELF,)),
    decode=False,
    tier=2,
    check="Channel attention equals standard attention applied to the transposed token "
    "matrix. Spatial mode equals window attention.",
    build=_build_davit,
    module=registry.NN_ATTENTION,
  )
)
