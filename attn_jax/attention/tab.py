"""Transformer attention bottleneck (catalog family (e), ``tab``) as pure JAX functions.

"TAB: Transformer Attention Bottlenecks enable User Intervention and Debugging in
Vision-Language Models".

Dimension key: B batch, T query length, S key/value length (e.g. image patches), D model
dim, H head dim, Hv value head dim.

A one-head attention (N heads, each with its own null slot, generalise it; N = 1 is the
paper's layer) whose total attention over the keys lies in [0, 1]: a null slot with a
learned logit σ and a zero value joins every row's softmax (``sinks`` of
``dot_product_attention``)::

    a_ij = exp(s_ij) / (exp(σ) + Σ_j' exp(s_ij')),    y_i = (Σ_j a_ij v_j) W_O

so Σ_j a_ij = 1 − (the null slot's share) ∈ [0, 1], and a row whose mass goes to the null
slot passes no key information on. Our reading of the paper's choice: the null-slot softmax
(a sigmoid gate × softmax is the other form the catalog names; not built). ``tab_map``
exposes the map and ``tab_from_map`` recomputes the output from an edited map (user
intervention). Fast path: one flash call with the sink logit (every implementation).
"""

import typing

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from attn_jax.attention import api as api_lib
from attn_jax.attention import heads as heads_lib
from attn_jax.attention import reference, registry

PAPER = (
  "TAB: Transformer Attention Bottlenecks enable User Intervention and Debugging in "
  "Vision-Language Models"
)
_NAMES = ("w_q", "w_k", "w_v", "w_o", "null_logit")


def _setup(params, x_BTD, context_BSD, causal, mask, positions_BT, rope):
  if not isinstance(params, dict) or set(params) != set(_NAMES):
    got = sorted(params) if isinstance(params, dict) else type(params)
    raise ValueError(f"tab params must hold {sorted(_NAMES)}; got {got}")
  base = {k: params[k] for k in _NAMES[:4]}
  dims = heads_lib.static_dims(base, "gqa")
  if tuple(np.shape(params["null_logit"])) != (dims.N,):
    raise ValueError(
      f"params['null_logit'] must have shape ({dims.N},); got {np.shape(params['null_logit'])}"
    )
  call = heads_lib._check_call(dims.D, x_BTD, context_BSD, causal, mask, positions_BT, rope)
  q, k, v = heads_lib._static_qkv(base, x_BTD, call.src_BSD, call)
  return base, call, q, k, v


@typing.no_type_check
def tab(
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
  """The attention bottleneck (TAB: Transformer Attention Bottlenecks enable User
  Intervention and Debugging in Vision-Language Models); see the module docstring.

  Args:
    params: ``init_tab`` pytree: ``w_q [D, N, H]``, ``w_k [D, K, H]``, ``w_v [D, K, Hv]``,
      ``w_o [N, Hv, D]``, ``null_logit [N]`` (N = K = 1 in the paper).
    Other arguments as every layer function (``attn_jax.attention.heads``); the keys are
    typically the image tokens (``context_BSD``).
  """
  base, call, q, k, v = _setup(params, x_BTD, context_BSD, causal, mask, positions_BT, rope)
  o = api_lib.dot_product_attention(
    q, k, v, mask=call.mask, sinks=params["null_logit"], implementation=implementation
  )
  return heads_lib.output_projection(base, o)


def tab_map(
  params,
  x_BTD: Float[Array, "B T D"],
  *,
  context_BSD: Float[Array, "B S D"] | None = None,
  causal: bool,
  mask=None,
  positions_BT: Int[Array, "B T"] | None = None,
  rope=None,
) -> Float[Array, "B N T S"]:
  """The bottleneck's map ``[B, N, T, S]`` (rows sum to at most 1; materialised)."""
  _, call, q, k, v = _setup(params, x_BTD, context_BSD, causal, mask, positions_BT, rope)
  _, probs = reference.attention_reference(
    q, k, v, mask=call.mask, sinks=params["null_logit"], return_probs=True
  )
  return probs


def tab_from_map(
  params,
  map_BNTS: Float[Array, "B N T S"],
  x_BTD: Float[Array, "B T D"],
  *,
  context_BSD: Float[Array, "B S D"] | None = None,
) -> Float[Array, "B T D"]:
  """The output for a given (e.g. user-edited) map: ``Σ_n (map_n · v) W_O,n``."""
  base, call, q, _, v = _setup(params, x_BTD, context_BSD, False, None, None, None)
  B, T, N = q.shape[:3]
  S, K = v.shape[1], v.shape[2]
  if tuple(np.shape(map_BNTS)) != (B, N, T, S):
    raise ValueError(f"map_BNTS must have shape {(B, N, T, S)}; got {np.shape(map_BNTS)}")
  v_rep = jnp.repeat(v, N // K, axis=2)
  o = jnp.einsum("BNTS,BSNV->BTNV", map_BNTS.astype(v.dtype), v_rep)
  return heads_lib.output_projection(base, o)


def param_specs(
  *,
  d_model: int,
  num_heads: int = 1,
  num_kv_heads: int | None = None,
  head_dim: int | None = None,
  v_head_dim: int | None = None,
) -> dict:
  """The GQA projections (the paper: N = 1, H = D) and one null logit per head, at 0."""
  specs = heads_lib.param_specs(
    "head_dims",
    d_model=d_model,
    num_heads=num_heads,
    num_kv_heads=num_kv_heads,
    head_dim=head_dim,
    v_head_dim=v_head_dim,
  )
  N = specs["w_q"][0][1]
  specs["null_logit"] = ((N,), lambda key, shape, dtype: jnp.zeros(shape, dtype), ("heads",))
  return specs


init_tab = heads_lib.make_init("tab", ("v_head_dim",), param_specs)


registry.register(
  registry.Mechanism(
    id="tab",
    family="e",
    paper=PAPER,
    entry_point="attn_jax.attention.tab:tab",
    implementations=registry.KERNEL_IMPLEMENTATIONS,
    patterns=registry.ALL_PATTERNS,
    decode=False,
    tier=2,
    check="Row sums lie in [0, 1]. Editing a map to all zeros makes the output independent of "
    "the image.",
    build=registry.build_nothing,
    module="attn_jax.nn.tab:TABAttention",
    interface="layer",
    init="attn_jax.attention.tab:init_tab",
  )
)
