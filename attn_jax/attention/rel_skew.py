"""Relative attention with the skew trick (catalog family (a), ``rel_skew``) as a pure JAX
function.

"Music Transformer".

Dimension key: B batch, T length, N heads, K kv heads, H head dim, Hv value head dim,
L relative distances (0 .. L − 1).

Causal self-attention with learned per-head relative embeddings e_r (one per distance r)::

    logits_ij = (q_i · k_j + q_i · e_(i−j)) / sqrt(H)       j <= i

The relative term S_rel[i, j] = q_i · e_(i−j) comes from Q Eᵀ by the skew: with the rows of
E ordered from distance T − 1 down to 0, left-pad one zero column to [T, T + 1], reshape to
[T + 1, T] and drop the first row; entry (i, j <= i) is then q_i · e_(i−j) (entries j > i
are garbage and masked). The skew needs O(T·H) memory beyond Q Eᵀ instead of the O(T²·H)
of gathering e_(i−j) per pair. Distances >= L reuse e_(L−1).

What is built: the skewed relative logits, added as a dense [B, N, T, T] bias to
``dot_product_attention`` ("reference" or the blocked "xla" path, which reads the bias
tile by tile). The in-tile flash form (computing q·e over each tile's distance range
inside the kernel, with no T×T bias) is not built.
"""

import typing

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from attn_jax.attention import _checks, registry
from attn_jax.attention import api as api_lib
from attn_jax.attention import heads as heads_lib
from attn_jax.attention import masks as masks_lib

PAPER = "Music Transformer"
IMPLEMENTATIONS = ("reference", "xla")


def skew(qe_BNTT: Float[Array, "B N T T"]) -> Float[Array, "B N T T"]:
  """The skew: pad one zero column on the left, reshape [T, T+1] -> [T+1, T], drop row 0."""
  B, N, T, _ = qe_BNTT.shape
  padded = jnp.pad(qe_BNTT, ((0, 0), (0, 0), (0, 0), (1, 0)))
  return padded.reshape(B, N, T + 1, T)[:, :, 1:]


def relative_logits(
  q_BTNH: Float[Array, "B T N H"], rel_NLH: Float[Array, "N L H"]
) -> Float[Array, "B N T T"]:
  """S_rel[i, j] = q_i · e_(i−j) for j <= i (0 above the diagonal), by the skew."""
  T = q_BTNH.shape[1]
  L = rel_NLH.shape[1]
  dist = jnp.minimum(jnp.arange(T - 1, -1, -1), L - 1)  # column c holds distance T − 1 − c
  e_NTH = jnp.take(rel_NLH, dist, axis=1)
  qe = jnp.einsum("BTNH,NCH->BNTC", q_BTNH, e_NTH.astype(q_BTNH.dtype))
  return jnp.where(jnp.tril(jnp.ones((T, T), bool)), skew(qe), 0)


@typing.no_type_check
def rel_skew_attention(
  q_BTNH: Float[Array, "B T N H"],
  k_BTKH: Float[Array, "B T K H"],
  v_BTKV: Float[Array, "B T K Hv"],
  rel_NLH: Float[Array, "N L H"],
  *,
  mask: masks_lib.Mask | None = None,
  implementation: str | None = None,
):
  """Causal self-attention with Music Transformer relative logits (see the module
  docstring); ``mask`` adds to the causal mask (e.g. packed documents)."""
  dims = _checks.check_qkv(q_BTNH, k_BTKH, v_BTKV)
  if dims.S != dims.T:
    raise ValueError(f"rel_skew is causal self-attention: needs S == T; got T={dims.T}, S={dims.S}")
  if np.ndim(rel_NLH) != 3 or tuple(np.shape(rel_NLH))[0::2] != (dims.N, dims.H):
    raise ValueError(
      f"rel_NLH must have shape [N={dims.N}, L, H={dims.H}]; got {np.shape(rel_NLH)}"
    )
  impl = implementation or "xla"
  if impl not in IMPLEMENTATIONS:
    if impl in api_lib.IMPLEMENTATIONS:
      raise NotImplementedError(
        f"rel_skew implementation {impl!r} is not built: the in-tile relative score is not in "
        "the flash kernels; use 'xla' or 'reference' (dense relative bias)"
      )
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; got {impl!r}")
  full = masks_lib.CausalMask() if mask is None else masks_lib.CausalMask() & mask
  bias = relative_logits(q_BTNH, rel_NLH) * dims.H**-0.5
  return api_lib.dot_product_attention(
    q_BTNH, k_BTKH, v_BTKV, mask=full, bias=bias, implementation=impl
  )


_BASE = ("w_q", "w_k", "w_v", "w_o")


@typing.no_type_check
def rel_skew(
  params,
  x_BTD: Float[Array, "B T D"],
  *,
  context_BSD=None,
  causal: bool,
  implementation: str | None = None,
  mask=None,
  positions_BT: Int[Array, "B T"] | None = None,
  rope=None,
):
  """The layer: the GQA projections of ``attn_jax.attention.heads`` and ``rel [N, L, H]``;
  causal self-attention only (``context_BSD`` None, ``causal`` True, no rope: the relative
  embeddings carry position)."""
  if context_BSD is not None or causal is not True:
    raise ValueError("rel_skew is causal self-attention: context_BSD=None and causal=True")
  if rope is not None:
    raise ValueError("rel_skew takes no rope: the relative embeddings carry position")
  if not isinstance(params, dict) or set(params) != set(_BASE + ("rel",)):
    got = sorted(params) if isinstance(params, dict) else type(params)
    raise ValueError(f"rel_skew params must hold {sorted(_BASE + ('rel',))}; got {got}")
  base = {k: params[k] for k in _BASE}
  dims = heads_lib.static_dims(base, "gqa")
  call = heads_lib._check_call(dims.D, x_BTD, None, True, mask, positions_BT, None)
  q, k, v = heads_lib._static_qkv(base, x_BTD, x_BTD, call)
  o = rel_skew_attention(q, k, v, params["rel"], mask=mask, implementation=implementation)
  return heads_lib.output_projection(base, o)


def param_specs(
  *,
  d_model: int,
  num_heads: int,
  num_kv_heads: int | None = None,
  head_dim: int | None = None,
  v_head_dim: int | None = None,
  rel_max: int | None = None,
) -> dict:
  """The GQA projections (K default N) and ``rel [N, L, H]`` with L = ``rel_max`` (default
  512) distances, N(0, 1/H) at init."""
  specs = heads_lib.param_specs(
    "head_dims",
    d_model=d_model,
    num_heads=num_heads,
    num_kv_heads=num_kv_heads,
    head_dim=head_dim,
    v_head_dim=v_head_dim,
  )
  (_, N, H) = specs["w_q"][0]
  L = heads_lib._opt("rel_max", rel_max, 512)
  specs["rel"] = ((N, L, H), heads_lib._normal_init(H**-0.5), ("heads", None, None))
  return specs


init_rel_skew = heads_lib.make_init("rel_skew", ("v_head_dim", "rel_max"), param_specs)

registry.register(
  registry.Mechanism(
    id="rel_skew",
    family="a",
    paper=PAPER,
    entry_point="attn_jax.attention.rel_skew:rel_skew",
    implementations=IMPLEMENTATIONS,
    patterns=frozenset((registry.SELF_CAUSAL,)),
    decode=False,
    tier=2,
    check="The skewed S_rel equals an explicit gather of q_i·e_(i−j). Extra memory of the "
    "skew is linear in T. (The in-tile flash form is not built: the relative logits enter as "
    "a dense bias.)",
    build=registry.build_nothing,
    module="attn_jax.nn.rel_skew:RelSkewAttention",
    interface="layer",
    init="attn_jax.attention.rel_skew:init_rel_skew",
  )
)
