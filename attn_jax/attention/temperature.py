"""Query and value temperature (catalog family (a), ``query_temperature``) as a pure JAX
function.

"Selective Attention: Enhancing Transformer through Principled Context Control".

Dimension key: B batch, T query length, S key/value length, D model dim, N query heads,
K kv heads, H head dim, Hv value head dim.

Each query is scaled by a temperature that depends on its token and its position, each value
by a token-dependent temperature, before an unchanged attention call::

    τ_q(i, n) = 1 + tanh(⟨u_n, q_i,n⟩) + softplus(a_n) · log(1 + p_i)    q̃_i,n = τ_q(i, n) q_i,n
    τ_v(j, k) = 1 + tanh(⟨w_k, v_j,k⟩)                                    ṽ_j,k = τ_v(j, k) v_j,k

Our reading where the paper's exact form is not restated: the token terms are bounded
(tanh of a projection of the head's own q or v, so they reuse W_Q / W_V and add N·H + K·Hv
parameters), the position term grows with log of the query position p_i (countering the
dilution of softmax over longer contexts), and u = w = 0, a = −∞ would be MHA; parameters
start at u = w = 0 and a = −4 (softplus ≈ 0.018), i.e. close to MHA. Every implementation
(flash kernels included) runs unchanged on q̃ and ṽ.
"""

import typing

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from attn_jax.attention import heads as heads_lib
from attn_jax.attention import registry

PAPER = "Selective Attention: Enhancing Transformer through Principled Context Control"
_BASE = ("w_q", "w_k", "w_v", "w_o")
_NAMES = _BASE + ("u_q", "a_pos", "u_v")


def temperatures(
  params, q_BTNH, v_BSKV, q_pos_BT
) -> tuple[Float[Array, "B T N"], Float[Array, "B S K"]]:
  """(τ_q, τ_v) of the module docstring."""
  dtype = jnp.promote_types(q_BTNH.dtype, jnp.float32)
  token_q = jnp.tanh(jnp.einsum("BTNH,NH->BTN", q_BTNH.astype(dtype), params["u_q"].astype(dtype)))
  pos = jnp.log1p(jnp.maximum(q_pos_BT, 0).astype(dtype))[..., None]
  tau_q = 1 + token_q + jax.nn.softplus(params["a_pos"].astype(dtype)) * pos
  tau_v = 1 + jnp.tanh(
    jnp.einsum("BSKV,KV->BSK", v_BSKV.astype(dtype), params["u_v"].astype(dtype))
  )
  return tau_q, tau_v


@typing.no_type_check
def query_temperature(
  params,
  x_BTD: Float[Array, "B T D"],
  *,
  context_BSD: Float[Array, "B S D"] | None = None,
  causal: bool,
  implementation: str | None = None,
  mask=None,
  positions_BT: Int[Array, "B T"] | None = None,
  rope=None,
  return_aux: bool = False,
):
  """Selective attention's query/value temperatures (Selective Attention: Enhancing
  Transformer through Principled Context Control); see the module docstring.

  Args:
    params: ``init_query_temperature`` pytree: the GQA projections of
      ``attn_jax.attention.heads`` plus ``u_q [N, H]``, ``a_pos [N]``, ``u_v [K, Hv]``.
    x_BTD, context_BSD, causal, implementation, mask, positions_BT, rope: as every layer
      function (``attn_jax.attention.heads``); the position term uses the query positions.
    return_aux: also return ``{"tau_q": [B, T, N], "tau_v": [B, S, K]}``.
  """
  if not isinstance(params, dict) or set(params) != set(_NAMES):
    got = sorted(params) if isinstance(params, dict) else type(params)
    raise ValueError(f"query_temperature params must hold {sorted(_NAMES)}; got {got}")
  base = {k: params[k] for k in _BASE}
  dims = heads_lib.static_dims(base, "gqa")
  want = {"u_q": (dims.N, dims.H), "a_pos": (dims.N,), "u_v": (dims.Kv, dims.Hv)}
  for name, shape in want.items():
    if tuple(np.shape(params[name])) != shape:
      raise ValueError(f"params[{name!r}] must have shape {shape}; got {np.shape(params[name])}")
  call = heads_lib._check_call(dims.D, x_BTD, context_BSD, causal, mask, positions_BT, rope)
  q, k, v = heads_lib._static_qkv(base, x_BTD, call.src_BSD, call)
  tau_q, tau_v = temperatures(params, q, v, call.q_pos_BT)
  q = (q * tau_q[..., None].astype(q.dtype)).astype(q.dtype)
  v = (v * tau_v[..., None].astype(v.dtype)).astype(v.dtype)
  o = heads_lib.attend_kv_heads(q, k, v, mask=call.mask, implementation=implementation)
  y = heads_lib.output_projection(base, o)
  return heads_lib._finish(y, {"tau_q": tau_q, "tau_v": tau_v}, return_aux)


def param_specs(
  *,
  d_model: int,
  num_heads: int,
  num_kv_heads: int | None = None,
  head_dim: int | None = None,
  v_head_dim: int | None = None,
) -> dict:
  """The GQA projections (K default N) and the temperature parameters (u = 0, a = −4)."""
  specs = heads_lib.param_specs(
    "head_dims",
    d_model=d_model,
    num_heads=num_heads,
    num_kv_heads=num_kv_heads,
    head_dim=head_dim,
    v_head_dim=v_head_dim,
  )
  (_, N, H), (_, K, Hv) = specs["w_q"][0], specs["w_v"][0]

  def const(value):
    return lambda key, shape, dtype: jnp.full(shape, value, dtype)

  specs["u_q"] = ((N, H), const(0.0), ("heads", None))
  specs["a_pos"] = ((N,), const(-4.0), ("heads",))
  specs["u_v"] = ((K, Hv), const(0.0), ("kv_heads", None))
  return specs


init_query_temperature = heads_lib.make_init("query_temperature", ("v_head_dim",), param_specs)

registry.register(
  registry.Mechanism(
    id="query_temperature",
    family="a",
    paper=PAPER,
    entry_point="attn_jax.attention.temperature:query_temperature",
    implementations=registry.KERNEL_IMPLEMENTATIONS,
    patterns=registry.ALL_PATTERNS,
    decode=False,
    tier=2,
    check="τ ≡ 1 equals MHA. Very large τ makes each row approach one-hot on its argmax.",
    build=registry.build_nothing,
    module="attn_jax.nn.temperature:TemperatureAttention",
    interface="layer",
    init="attn_jax.attention.temperature:init_query_temperature",
  )
)
