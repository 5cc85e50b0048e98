"""Attention with fewer projections (catalog family (e), tier 3): ``minimal_attn`` and the
Optimised / Efficient forms of ``pay_better``, as pure JAX layer functions.

"Reducing the Transformer Architecture to a Minimum" (``minimal_attn``) and "You Need to Pay
Better Attention" (``pay_better``).

Dimension key: B batch, T query length, S key/value length, D model dim, N heads,
h = D / N the head slice, r the rank of a symmetric score matrix.

Head n works on the n-th channel slice ``x^(n)`` (h = D / N channels) of its input:

* ``minimal_attn``: one score matrix W_n [h, h] per head in place of W_Q W_Kᵀ, values the
  input slices, no output projection: ``y^(n) = softmax(x^(n) W_n x^(n)ᵀ / √h) x^(n)``.
  ``minimal_symmetric=True`` makes W_n = A_nᵀ A_n (A_n [r, h]), so the logit matrix is
  symmetric before masking; it runs as q = k = x^(n) A_nᵀ.
* ``pay_better`` ``"optimised"``: standard W_Q, W_K [D, N, h] but no W_V (values are the head
  slices), W_V folded into W_O [N, h, D]. It equals MHA whose value projection is
  block-diagonal per head, with W_O^(n)' = W_V^(n) W_O^(n).
* ``pay_better`` ``"efficient"``: also the keys are the slices and one fused W_n [h, h]
  replaces W_Q W_Kᵀ (``minimal_attn`` plus the output projection). The paper's "Super" form
  (a learned ℓ×ℓ alignment matrix on the values, fixed length) is not built.

Every form is one ``dot_product_attention`` call (every implementation): the fused matrix
goes on the query side, keys and values are the input slices. Cross-attention takes keys and
values from the context's slices.
"""

import math
import typing

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from attn_jax.attention import api as api_lib
from attn_jax.attention import heads as heads_lib
from attn_jax.attention import registry

MINIMAL_PAPER = "Reducing the Transformer Architecture to a Minimum"
PAY_BETTER_PAPER = "You Need to Pay Better Attention"
PAY_BETTER_VARIANTS = ("optimised", "efficient")


def _slices(x_BLD, N):
  B, L, D = x_BLD.shape
  return x_BLD.reshape(B, L, N, D // N)


def _shape(params, name):
  return tuple(np.shape(params[name]))


def _check(params, names, kind):
  if not isinstance(params, dict) or set(params) != set(names):
    got = sorted(params) if isinstance(params, dict) else type(params).__name__
    raise ValueError(f"{kind} params must hold {sorted(names)}; got {got}")


def _call(D, x_BTD, context_BSD, causal, mask, positions_BT, rope):
  if rope is not None:
    raise ValueError("these layers take no rope (keys are raw input slices): use learned/none")
  return heads_lib._check_call(D, x_BTD, context_BSD, causal, mask, positions_BT, None)


def _minimal_kind(params) -> bool:
  """True for the symmetric form (``w_a``), False for ``w_q``; validates the shapes."""
  if not isinstance(params, dict) or set(params) not in ({"w_q"}, {"w_a"}):
    got = sorted(params) if isinstance(params, dict) else type(params).__name__
    raise ValueError(f"minimal_attn params must hold ['w_q'] or ['w_a']; got {got}")
  if "w_q" in params:
    shape = _shape(params, "w_q")
    if len(shape) != 3 or shape[1] != shape[2]:
      raise ValueError(f"minimal_attn w_q must be [N, h, h]; got {shape}")
    return False
  if len(_shape(params, "w_a")) != 3:
    raise ValueError(f"minimal_attn w_a must be [N, r, h]; got {_shape(params, 'w_a')}")
  return True


def _scores_q(params, xq_BTNh, symmetric: bool):
  """The query side of the fused score matrix: x W_n (or x A_nᵀ when symmetric)."""
  if symmetric:
    return jnp.einsum("BTNh,Nrh->BTNr", xq_BTNh, params["w_a"].astype(xq_BTNh.dtype))
  return jnp.einsum("BTNh,Nhg->BTNg", xq_BTNh, params["w_q"].astype(xq_BTNh.dtype))


@typing.no_type_check
def minimal_attn(
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
  """Minimal attention (Reducing the Transformer Architecture to a Minimum); see the module
  docstring. ``params``: ``{"w_q": [N, h, h]}`` (W_n) or, for the symmetric variant,
  ``{"w_a": [N, r, h]}`` (A_n, W_n = A_nᵀ A_n)."""
  symmetric = _minimal_kind(params)
  N, _, h = _shape(params, "w_a" if symmetric else "w_q")
  call = _call(N * h, x_BTD, context_BSD, causal, mask, positions_BT, rope)
  xq, src = _slices(x_BTD, N), _slices(call.src_BSD, N)
  if symmetric:
    q = _scores_q(params, xq, True)
    k = q if context_BSD is None else _scores_q(params, src, True)
  else:
    q, k = _scores_q(params, xq, False), src
  o = api_lib.dot_product_attention(
    q, k, src, mask=call.mask, scale=1 / math.sqrt(h), implementation=implementation
  )
  return o.reshape(x_BTD.shape[:2] + (N * h,))


def minimal_logits(params, x_BTD):
  """The materialised logits ``[B, N, T, T]`` before masking (for inspection and tests)."""
  symmetric = _minimal_kind(params)
  N, _, h = _shape(params, "w_a" if symmetric else "w_q")
  xs = _slices(x_BTD, N)
  q = _scores_q(params, xs, symmetric)
  k = q if symmetric else xs
  return jnp.einsum("BTNh,BSNh->BNTS", q, k) / math.sqrt(h)


@typing.no_type_check
def pay_better(
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
  """Optimised / Efficient attention (You Need to Pay Better Attention); see the module
  docstring. ``params``: ``w_q [D, N, h]``, ``w_k [D, N, h]``, ``w_o [N, h, D]``
  (optimised) or ``w_q [N, h, h]``, ``w_o [N, h, D]`` (efficient: no ``w_k``)."""
  efficient = isinstance(params, dict) and "w_k" not in params
  _check(params, ("w_q", "w_o") if efficient else ("w_q", "w_k", "w_o"), "pay_better")
  N, h, D = _shape(params, "w_o")
  if N * h != D:
    raise ValueError(f"pay_better needs N·h = D (values are head slices); got w_o {(N, h, D)}")
  call = _call(D, x_BTD, context_BSD, causal, mask, positions_BT, rope)
  dtype = x_BTD.dtype
  src = _slices(call.src_BSD, N)
  if efficient:
    q, k = _scores_q(params, _slices(x_BTD, N), False), src
  else:
    q = jnp.einsum("BTD,DNh->BTNh", x_BTD, params["w_q"].astype(dtype))
    k = jnp.einsum("BSD,DNh->BSNh", call.src_BSD, params["w_k"].astype(dtype))
  o = api_lib.dot_product_attention(
    q, k, src, mask=call.mask, scale=1 / math.sqrt(h), implementation=implementation
  )
  return jnp.einsum("BTNh,NhD->BTD", o, params["w_o"].astype(dtype))


def minimal_specs(
  *,
  d_model: int,
  num_heads: int,
  num_kv_heads: int | None = None,
  head_dim: int | None = None,
  v_head_dim: int | None = None,
  minimal_symmetric: bool = False,
  minimal_rank: int = -1,
) -> dict:
  """``w_q``: W_n = I + N(0, 1/h) noise [N, h, h] (close to plain dot-product attention of
  the slices), or A_n [N, r, h] with r = ``minimal_rank`` (default h) when symmetric."""
  D, N = heads_lib._int("d_model", d_model, 1), heads_lib._int("num_heads", num_heads, 1)
  if D % N:
    raise ValueError(f"minimal_attn splits D into heads: num_heads={N} must divide D={D}")
  for name, value in (("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
    if value not in (None, N if name == "num_kv_heads" else D // N):
      raise ValueError(f"minimal_attn has no separate {name} (heads are slices); got {value}")
  if v_head_dim not in (None, D // N):
    raise ValueError(f"minimal_attn's values are the head slices; got v_head_dim={v_head_dim}")
  h = D // N
  r = heads_lib._opt("minimal_rank", minimal_rank, h)
  noise = heads_lib._normal_init(h**-0.5)
  if minimal_symmetric:
    return {"w_a": ((N, r, h), noise, ("heads", None, None))}

  def near_identity(key, shape, dtype):
    return jnp.eye(h, dtype=dtype)[None] + 0.5 * noise(key, shape, dtype)

  return {"w_q": ((N, h, h), near_identity, ("heads", None, None))}


def pay_better_specs(
  *,
  d_model: int,
  num_heads: int,
  num_kv_heads: int | None = None,
  head_dim: int | None = None,
  v_head_dim: int | None = None,
  pay_better_variant: str = "optimised",
) -> dict:
  if pay_better_variant not in PAY_BETTER_VARIANTS:
    raise ValueError(
      f"pay_better_variant must be one of {PAY_BETTER_VARIANTS}; got {pay_better_variant!r}"
    )
  specs = minimal_specs(
    d_model=d_model,
    num_heads=num_heads,
    num_kv_heads=num_kv_heads,
    head_dim=head_dim,
    v_head_dim=v_head_dim,
  )
  D, N = d_model, num_heads
  h = D // N
  if pay_better_variant == "optimised":
    full = heads_lib.param_specs("head_dims", d_model=D, num_heads=N)
    specs = {"w_q": full["w_q"], "w_k": full["w_k"]}
  specs["w_o"] = ((N, h, D), heads_lib._fan_in(D), ("heads", None, "embed"))
  return specs


init_minimal_attn = heads_lib.make_init(
  "minimal_attn", ("minimal_symmetric", "minimal_rank"), minimal_specs
)
init_pay_better = heads_lib.make_init("pay_better", ("pay_better_variant",), pay_better_specs)


def fold_mha(params) -> dict[str, Array]:
  """``pay_better`` "optimised" parameters from MHA ones whose value projection is
  block-diagonal per head (``w_v [D, N, h]`` reading only slice n for head n):
  ``w_o'^(n) = W_V^(n) W_O^(n)`` with W_V^(n) the [h, h] block."""
  N, h = _shape(params, "w_v")[1:]
  blocks = jnp.stack([params["w_v"][n * h : (n + 1) * h, n] for n in range(N)])  # [N, h, h]
  return {
    "w_q": params["w_q"],
    "w_k": params["w_k"],
    "w_o": jnp.einsum("Nhg,NgD->NhD", blocks, params["w_o"]),
  }


registry.register(
  registry.Mechanism(
    id="minimal_attn",
    family="e",
    paper=MINIMAL_PAPER,
    entry_point="attn_jax.attention.minimal:minimal_attn",
    implementations=registry.KERNEL_IMPLEMENTATIONS,
    patterns=registry.ALL_PATTERNS,
    decode=False,
    tier=3,
    check="The symmetric variant gives a symmetric logit matrix before masking.",
    build=registry.build_nothing,
    module="attn_jax.nn.minimal:MinimalAttention",
    interface="layer",
    init="attn_jax.attention.minimal:init_minimal_attn",
  )
)
registry.register(
  registry.Mechanism(
    id="pay_better",
    family="e",
    paper=PAY_BETTER_PAPER,
    entry_point="attn_jax.attention.minimal:pay_better",
    implementations=registry.KERNEL_IMPLEMENTATIONS,
    patterns=registry.ALL_PATTERNS,
    decode=False,
    tier=3,
    check="Optimised equals standard attention reparameterised with W_V = I and "
    "W_O' = W_V·W_O. (Super, with its fixed-length alignment matrix, is not built.)",
    build=registry.build_nothing,
    module="attn_jax.nn.minimal:PayBetterAttention",
    interface="layer",
    init="attn_jax.attention.minimal:init_pay_better",
  )
)
