"""Transformer-XL relative scores with a depthwise convolution (catalog family (a), tier 3,
``rel_xl``) as a pure JAX layer, run as ONE flash call with no T×S tensor.

"RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling".

Dimension key: B batch, T query length, S key/value length, D model dim, N query heads,
K kv heads, H head dim, Hv value head dim, R the sinusoid width (even), C conv width.

The score of query i (at position p_i) and key j (at p_j), per head::

    s_ij = (q_i + u)·k_j + (q_i + w)·(W_R r_(p_i − p_j)),    scaled by 1/√H

(the four terms q·k + q·W_R r + u·k + w·W_R r of the paper, grouped), with the sinusoid
r_d = [sin(d ω_m) ; cos(d ω_m)], ω_m = 10000^(−2m/R), learned global vectors u, w [N, H] and
W_R [N, R, H]. Q, K and V are computed from the input after a causal depthwise convolution
over time (one kernel [C, D] shared by the three; identity at init). Our reading where the
catalog says "verify": the convolution is causal and shared, the sinusoid is the
Transformer-XL one.

Fast path: the relative term is separable. With α_i = (q_i + w) W_Rᵀ = [α^s ; α^c] ∈ R^R,
α_i·r_(p_i − p_j) = Σ_m cos(p_j ω_m)(α^s_m sin p_i ω_m + α^c_m cos p_i ω_m)
                 + sin(p_j ω_m)(α^c_m sin p_i ω_m − α^s_m cos p_i ω_m),
so ``q̃_i = [q_i + u ; the two bracketed R/2-vectors]`` and ``k̃_j = [k_j ; cos p_j ω ; sin
p_j ω]`` give s_ij = q̃_i·k̃_j exactly: one ``dot_product_attention`` call with head dim
H + R, on every implementation (the flash kernels included), and the relative positions
never materialise. ``implementation="reference"`` builds the [B, N, T, S] relative bias
explicitly (the oracle path).

Packed documents: the stacks pass a ``SegmentMask``; the convolution then only mixes taps of
the same document. Other extra masks are refused when the convolution is wider than 1.
"""

import math
import typing

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from attn_jax.attention import api as api_lib
from attn_jax.attention import heads as heads_lib
from attn_jax.attention import masks as masks_lib
from attn_jax.attention import registry

PAPER = "RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling"
_NAMES = ("w_q", "w_k", "w_v", "w_o", "w_r", "u", "w", "conv")


def frequencies(R: int) -> np.ndarray:
  """ω_m = 10000^(−2m/R), m = 0 .. R/2 − 1."""
  return 10000.0 ** (-2.0 * np.arange(R // 2) / R)


def sinusoid(d, R: int):
  """r_d = [sin(d ω) ; cos(d ω)] ``[..., R]`` for (integer or float) distances d."""
  ang = jnp.asarray(d, jnp.float32)[..., None] * frequencies(R)
  return jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1)


def depthwise_conv(x_BTD, conv_CD, segment_ids_BT=None):
  """Causal depthwise convolution: y_t = Σ_c conv[c] ⊙ x_(t − (C − 1 − c)); taps outside the
  sequence, or (with ``segment_ids_BT``) in another document, contribute 0."""
  C = conv_CD.shape[0]
  y = jnp.zeros_like(x_BTD)
  for c in range(C):
    shift = C - 1 - c
    xs = jnp.pad(x_BTD, ((0, 0), (shift, 0), (0, 0)))[:, : x_BTD.shape[1]]
    if segment_ids_BT is not None and shift:
      ids = jnp.pad(segment_ids_BT, ((0, 0), (shift, 0)), constant_values=-1)
      same = ids[:, : x_BTD.shape[1]] == segment_ids_BT
      xs = jnp.where(same[..., None], xs, 0)
    y = y + xs * conv_CD[c].astype(x_BTD.dtype)
  return y


def _segments(mask, C):
  """The segment ids the convolution must respect (None if no mask)."""
  if mask is None or C == 1:
    return None
  if isinstance(mask, masks_lib.SegmentMask):  # the documents of the (self-attention) input
    return mask.q_segment_ids
  raise ValueError(
    "rel_xl with a convolution wider than 1 takes only a SegmentMask (packed documents) as an "
    f"extra mask; got {type(mask).__name__}"
  )


@typing.no_type_check
def rel_xl(
  params,
  x_BTD: Float[Array, "B T D"],
  *,
  context_BSD: Float[Array, "B S D"] | None = None,
  causal: bool,
  implementation: str | None = None,
  mask=None,
  positions_BT: Int[Array, "B T"] | None = None,
  rope=None,
):
  """The layer (see the module docstring). ``params``: the GQA projections ``w_q [D, N, H]``,
  ``w_k``, ``w_v``, ``w_o`` of ``attn_jax.attention.heads``, ``w_r [N, R, H]``,
  ``u [N, H]``, ``w [N, H]``, ``conv [C, D]``. Positions: ``positions_BT`` for the queries
  (default as every layer function), keys at ``arange(S)``; ``rope`` must be None."""
  if not isinstance(params, dict) or set(params) != set(_NAMES):
    got = sorted(params) if isinstance(params, dict) else type(params).__name__
    raise ValueError(f"rel_xl params must hold {sorted(_NAMES)}; got {got}")
  if rope is not None:
    raise ValueError("rel_xl takes no rope: the relative sinusoids carry position")
  base = {k: params[k] for k in ("w_q", "w_k", "w_v", "w_o")}
  dims = heads_lib.static_dims(base, "gqa")
  N, H = dims.N, dims.H
  R = np.shape(params["w_r"])[1]
  C = np.shape(params["conv"])[0]
  want = {"w_r": (N, R, H), "u": (N, H), "w": (N, H), "conv": (C, dims.D)}
  for name, shape in want.items():
    if tuple(np.shape(params[name])) != shape:
      raise ValueError(f"params[{name!r}] must have shape {shape}; got {np.shape(params[name])}")
  if R % 2:
    raise ValueError(f"the sinusoid width R must be even; got w_r {np.shape(params['w_r'])}")
  call = heads_lib._check_call(dims.D, x_BTD, context_BSD, causal, mask, positions_BT, None)
  seg = _segments(mask, C)
  xc = depthwise_conv(x_BTD, params["conv"], seg)
  src = xc if context_BSD is None else depthwise_conv(call.src_BSD, params["conv"])
  q, k, v = heads_lib._static_qkv(base, xc, src, call)
  dtype = q.dtype
  qu = q + params["u"].astype(dtype)
  alpha = jnp.einsum("BTNH,NRH->BTNR", q + params["w"].astype(dtype), params["w_r"].astype(dtype))
  scale = 1 / math.sqrt(H)
  if implementation == "reference":
    rel = call.q_pos_BT[:, :, None] - call.kv_pos_BS[:, None, :]  # [B, T, S]
    bias = jnp.einsum("BTNR,BTSR->BNTS", alpha, sinusoid(rel, R).astype(dtype)) * scale
    o = api_lib.dot_product_attention(
      qu, k, v, mask=call.mask, bias=bias, scale=scale, implementation="reference"
    )
    return heads_lib.output_projection(base, o)
  a_s, a_c = alpha[..., : R // 2], alpha[..., R // 2 :]
  ang_q = call.q_pos_BT.astype(jnp.float32)[..., None] * frequencies(R)  # [B, T, R/2]
  sin_q, cos_q = (f(ang_q)[:, :, None, :].astype(dtype) for f in (jnp.sin, jnp.cos))
  q_aug = jnp.concatenate([qu, a_s * sin_q + a_c * cos_q, a_c * sin_q - a_s * cos_q], axis=-1)
  ang_k = call.kv_pos_BS.astype(jnp.float32)[..., None] * frequencies(R)  # [B, S, R/2]
  K = k.shape[2]
  trig_k = jnp.concatenate([jnp.cos(ang_k), jnp.sin(ang_k)], axis=-1).astype(dtype)
  k_aug = jnp.concatenate([k, jnp.broadcast_to(trig_k[:, :, None], k.shape[:2] + (K, R))], -1)
  o = api_lib.dot_product_attention(
    q_aug, k_aug, v, mask=call.mask, scale=scale, implementation=implementation
  )
  return heads_lib.output_projection(base, o)


def param_specs(
  *,
  d_model: int,
  num_heads: int,
  num_kv_heads: int | None = None,
  head_dim: int | None = None,
  v_head_dim: int | None = None,
  rel_xl_dim: int = -1,
  rel_xl_conv: int = 3,
) -> dict:
  """The GQA projections (K default N), ``w_r [N, R, H]`` (R = ``rel_xl_dim``, default H
  rounded up to even; N(0, 1/R)), ``u``, ``w`` = 0 and ``conv [C, D]`` = identity (the last
  tap 1, C = ``rel_xl_conv``)."""
  specs = heads_lib.param_specs(
    "head_dims",
    d_model=d_model,
    num_heads=num_heads,
    num_kv_heads=num_kv_heads,
    head_dim=head_dim,
    v_head_dim=v_head_dim,
  )
  D, N, H = specs["w_q"][0]
  R = heads_lib._opt("rel_xl_dim", rel_xl_dim, H + H % 2, minimum=2)
  if R % 2:
    raise ValueError(f"rel_xl_dim must be even (sin and cos pairs); got {R}")
  C = heads_lib._opt("rel_xl_conv", rel_xl_conv, 3)

  def identity_conv(key, shape, dtype):
    return jnp.zeros(shape, dtype).at[-1].set(1)

  specs["w_r"] = ((N, R, H), heads_lib._normal_init(R**-0.5), ("heads", None, None))
  specs["u"] = ((N, H), jax.nn.initializers.zeros, ("heads", None))
  specs["w"] = ((N, H), jax.nn.initializers.zeros, ("heads", None))
  specs["conv"] = ((C, D), identity_conv, (None, "embed"))
  return specs


init_rel_xl = heads_lib.make_init(
  "rel_xl", ("v_head_dim", "rel_xl_dim", "rel_xl_conv"), param_specs
)

registry.register(
  registry.Mechanism(
    id="rel_xl",
    family="a",
    paper=PAPER,
    entry_point="attn_jax.attention.rel_xl:rel_xl",
    implementations=registry.KERNEL_IMPLEMENTATIONS,
    patterns=registry.ALL_PATTERNS,
    decode=False,
    tier=3,
    check="W_R = 0, u = w = 0 and an identity convolution give MHA. The one-call form "
    "(position-augmented q and k) equals the explicit relative bias.",
    build=registry.build_nothing,
    module="attn_jax.nn.rel_xl:RelXLAttention",
    interface="layer",
    init="attn_jax.attention.rel_xl:init_rel_xl",
  )
)
