"""Positional attention (catalog family (e), ``positional_attn``) as a pure JAX function.

"Positional Attention: Expressivity and Learnability of Algorithmic Computation".

Dimension key: B batch, T query length, S key/value length, D model dim, P positional
encoding dim, N heads, K kv heads, H q/k head dim, Hv value head dim.

The attention weights depend only on the positional encodings, the values on the input::

    A = softmax((P_q W_Q)(P_k W_K)ᵀ / sqrt(H)),   y = Σ_n A_n (x W_V,n) W_O,n

with P_q, P_k the encodings of the query and key positions: one-hot (the paper's choice;
P = the largest position + 1, a position >= P gets the zero encoding) or sinusoidal of
width P. A does not depend on x, so for a fixed length it is the same for every input (our
reading: it is recomputed per call here, inside the flash kernel, rather than cached).
Fast path: q/k come from the encodings (a row gather for one-hot) and the attention is one
``dot_product_attention`` call on any implementation.
"""

import typing

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from attn_jax.attention import api as api_lib
from attn_jax.attention import heads as heads_lib
from attn_jax.attention import reference, registry

PAPER = "Positional Attention: Expressivity and Learnability of Algorithmic Computation"
ENCODINGS = ("onehot", "sinusoidal")
_NAMES = ("w_q", "w_k", "w_v", "w_o")


def encode_positions(positions_BL: Int[Array, "B L"], dim: int, encoding: str):
  """``[B, L, dim]`` encodings of integer positions (float32)."""
  if encoding == "onehot":
    return jax.nn.one_hot(positions_BL, dim, dtype=jnp.float32)
  if encoding == "sinusoidal":
    half = dim // 2
    freq = 10000.0 ** (-jnp.arange(half, dtype=jnp.float32) / max(half, 1))
    angle = positions_BL.astype(jnp.float32)[..., None] * freq
    enc = jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], -1)
    return jnp.pad(enc, [(0, 0)] * (enc.ndim - 1) + [(0, dim - 2 * half)])
  raise ValueError(f"positional_encoding must be one of {ENCODINGS}; got {encoding!r}")


class PosDims(typing.NamedTuple):
  D: int
  P: int
  N: int
  K: int
  H: int
  Hv: int


def pos_dims(params) -> PosDims:
  if not isinstance(params, dict) or set(params) != set(_NAMES):
    got = sorted(params) if isinstance(params, dict) else type(params)
    raise ValueError(f"positional_attn params must hold {sorted(_NAMES)}; got {got}")
  shapes = {n: tuple(np.shape(params[n])) for n in _NAMES}
  if any(len(s) != 3 for s in shapes.values()):
    raise ValueError(f"positional_attn params must all have rank 3; got {shapes}")
  P, N, H = shapes["w_q"]
  K = shapes["w_k"][1]
  D, _, Hv = shapes["w_v"]
  want = {"w_k": (P, K, H), "w_v": (D, K, Hv), "w_o": (N, Hv, D)}
  for name, shape in want.items():
    if shapes[name] != shape:
      raise ValueError(f"params[{name!r}] must have shape {shape}; got {shapes[name]}")
  if N % K:
    raise ValueError(f"kv heads K={K} must divide the heads N={N}")
  return PosDims(D, P, N, K, H, Hv)


def _qk(params, dims, call, encoding, dtype):
  pq = encode_positions(call.q_pos_BT, dims.P, encoding).astype(dtype)
  pk = encode_positions(call.kv_pos_BS, dims.P, encoding).astype(dtype)
  q = jnp.einsum("BTP,PNH->BTNH", pq, params["w_q"].astype(dtype))
  k = jnp.einsum("BSP,PKH->BSKH", pk, params["w_k"].astype(dtype))
  return q, k


def _setup(params, x_BTD, context_BSD, causal, mask, positions_BT, rope, encoding):
  dims = pos_dims(params)
  if rope is not None:
    raise ValueError("positional_attn takes no rope: q and k come from the positional encodings")
  if encoding not in ENCODINGS:
    raise ValueError(f"positional_encoding must be one of {ENCODINGS}; got {encoding!r}")
  call = heads_lib._check_call(dims.D, x_BTD, context_BSD, causal, mask, positions_BT, None)
  return dims, call


@typing.no_type_check
def positional_attn(
  params,
  x_BTD: Float[Array, "B T D"],
  *,
  context_BSD: Float[Array, "B S D"] | None = None,
  causal: bool,
  implementation: str | None = None,
  mask=None,
  positions_BT: Int[Array, "B T"] | None = None,
  rope=None,
  positional_encoding: str = "onehot",
):
  """Positional attention (Positional Attention: Expressivity and Learnability of Algorithmic
  Computation): weights from positions only, values from ``x`` (or ``context_BSD``).

  Args:
    params: ``init_positional_attn`` pytree: ``w_q [P, N, H]``, ``w_k [P, K, H]``,
      ``w_v [D, K, Hv]``, ``w_o [N, Hv, D]``.
    x_BTD, context_BSD, causal, implementation, mask, positions_BT: as every layer function
      (``attn_jax.attention.heads``); keys sit at ``arange(S)``.
    rope: must be None.
    positional_encoding: "onehot" (default) or "sinusoidal".
  """
  dims, call = _setup(
    params, x_BTD, context_BSD, causal, mask, positions_BT, rope, positional_encoding
  )
  q, k = _qk(params, dims, call, positional_encoding, x_BTD.dtype)
  v = jnp.einsum("BSD,DKV->BSKV", call.src_BSD, params["w_v"].astype(x_BTD.dtype))
  o = api_lib.dot_product_attention(q, k, v, mask=call.mask, implementation=implementation)
  return heads_lib.output_projection(params, o)


def positional_probs(
  params,
  x_BTD: Float[Array, "B T D"],
  *,
  context_BSD: Float[Array, "B S D"] | None = None,
  causal: bool,
  mask=None,
  positions_BT: Int[Array, "B T"] | None = None,
  positional_encoding: str = "onehot",
) -> Float[Array, "B N T S"]:
  """The attention weights ``[B, N, T, S]`` (materialised; for inspection and tests). ``x``
  only supplies shapes: the weights do not depend on its values."""
  dims, call = _setup(
    params, x_BTD, context_BSD, causal, mask, positions_BT, None, positional_encoding
  )
  q, k = _qk(params, dims, call, positional_encoding, x_BTD.dtype)
  v = jnp.zeros(k.shape[:3] + (1,), x_BTD.dtype)
  _, probs = reference.attention_reference(q, k, v, mask=call.mask, return_probs=True)
  return probs


def param_specs(
  *,
  d_model: int,
  num_heads: int,
  num_kv_heads: int | None = None,
  head_dim: int | None = None,
  v_head_dim: int | None = None,
  positional_dim: int | None = None,
) -> dict:
  """``{name: (shape, init, logical_axes)}``; P = ``positional_dim`` (default 512: one-hot
  positions 0..511), K default N, H = D // N."""
  specs = heads_lib.param_specs(
    "head_dims",
    d_model=d_model,
    num_heads=num_heads,
    num_kv_heads=num_kv_heads,
    head_dim=head_dim,
    v_head_dim=v_head_dim,
  )
  P = heads_lib._opt("positional_dim", positional_dim, 512)
  (_, N, H), (_, K, _) = specs["w_q"][0], specs["w_k"][0]
  # One-hot rows have norm 1, so the projections start at unit scale, not 1/sqrt(P).
  specs["w_q"] = ((P, N, H), heads_lib._normal_init(1.0), (None, "heads", None))
  specs["w_k"] = ((P, K, H), heads_lib._normal_init(1.0), (None, "kv_heads", None))
  return specs


init_positional_attn = heads_lib.make_init(
  "positional_attn",
  ("v_head_dim", "positional_dim", "positional_encoding"),
  param_specs,
  ("positional_encoding",),
)


registry.register(
  registry.Mechanism(
    id="positional_attn",
    family="e",
    paper=PAPER,
    entry_point="attn_jax.attention.positional:positional_attn",
    implementations=registry.KERNEL_IMPLEMENTATIONS,
    patterns=registry.ALL_PATTERNS,
    decode=False,
    tier=1,
    check="A is unchanged when the input values change. It equals MHA with the q/k inputs "
    "replaced by P.",
    build=registry.build_nothing,
    module="attn_jax.nn.positional:PositionalAttention",
    interface="layer",
    init="attn_jax.attention.positional:init_positional_attn",
  )
)
