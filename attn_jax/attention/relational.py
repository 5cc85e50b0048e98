"""Relational heads / dual attention (catalog family (e), ``relational_attn``) as a pure JAX
function.

"Disentangling and Integrating Relational and Sensory Information in Transformer
Architectures".

Dimension key: B batch, T query length, S key/value length, D model dim, N = Ns + Nr heads
(sensory + relational), H head dim, Hv value head dim, R relations per relational head,
F relation feature dim, E symbol dim, P symbol library size (positions).

Sensory heads are standard attention. A relational head n attends with its own q/k and
returns relations and symbols instead of values::

    α_ij   = softmax_j(q_i,n · k_j,n / sqrt(H))
    r_ℓ(i, j) = ⟨φ^q_ℓ,n(x_i), φ^k_ℓ,n(x_j)⟩            ℓ = 1..R
    RA_i,n = Σ_j α_ij (r(i, j) W_r,n + s_j W_s,n)

and the N head outputs (sensory values, relational RA) are concatenated into W_O. Our
reading where the accounts differ: the symbols are positional, s_j = Σ[position of j] from a
learned library Σ [P, E] (positions >= P get the zero symbol; the paper also has
position-relative and symbolic-attention symbols: not built).

Fast path: each relational head attends once with stacked values
[φ^k_1(x_j); …; φ^k_R(x_j); s_j] (width R·F + E), then contracts the first R blocks with
φ^q_ℓ(x_i) per query: Σ_j α_ij ⟨φ^q_ℓ(x_i), φ^k_ℓ(x_j)⟩ = ⟨φ^q_ℓ(x_i), Σ_j α_ij φ^k_ℓ(x_j)⟩.
Two ``dot_product_attention`` calls per layer (sensory, relational), any implementation; no
T×S relation tensor is formed.
"""

import typing

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from attn_jax.attention import api as api_lib
from attn_jax.attention import heads as heads_lib
from attn_jax.attention import registry

PAPER = (
  "Disentangling and Integrating Relational and Sensory Information in Transformer Architectures"
)
_SENSORY = ("w_q", "w_k", "w_v")
_RELATIONAL = ("w_qa", "w_ka", "w_fq", "w_fk", "w_r", "w_s", "symbols")
_NAMES = _SENSORY + _RELATIONAL + ("w_o",)


class RelDims(typing.NamedTuple):
  D: int
  Ns: int
  Nr: int
  H: int
  Hv: int
  R: int
  F: int
  E: int
  P: int


def rel_dims(params) -> RelDims:
  if not isinstance(params, dict) or set(params) != set(_NAMES):
    got = sorted(params) if isinstance(params, dict) else type(params)
    raise ValueError(f"relational_attn params must hold {sorted(_NAMES)}; got {got}")
  shapes = {n: tuple(np.shape(params[n])) for n in _NAMES}
  if len(shapes["w_qa"]) != 3 or len(shapes["w_fq"]) != 4 or len(shapes["w_o"]) != 3:
    raise ValueError(
      "params['w_qa'] must be [D, Nr, H], ['w_fq'] [D, Nr, R, F], ['w_o'] [N, Hv, D]; got "
      f"{shapes['w_qa']}, {shapes['w_fq']}, {shapes['w_o']}"
    )
  D, Nr, H = shapes["w_qa"]
  _, _, R, F = shapes["w_fq"]
  N, Hv, _ = shapes["w_o"]
  P, E = shapes["symbols"] if len(shapes["symbols"]) == 2 else (-1, -1)
  Ns = N - Nr
  want = {
    "w_q": (D, Ns, H),
    "w_k": (D, Ns, H),
    "w_v": (D, Ns, Hv),
    "w_ka": (D, Nr, H),
    "w_fk": (D, Nr, R, F),
    "w_r": (Nr, R, Hv),
    "w_s": (Nr, E, Hv),
    "w_o": (N, Hv, D),
  }
  for name, shape in want.items():
    if shapes[name] != shape or Ns < 0 or Nr < 1 or P < 1:
      raise ValueError(f"params[{name!r}] must have shape {shape}; got {shapes[name]}")
  return RelDims(D, Ns, Nr, H, Hv, R, F, E, P)


def relational_heads(
  qa_BTNH: Float[Array, "B T Nr H"],
  ka_BSNH: Float[Array, "B S Nr H"],
  fq_BTNRF: Float[Array, "B T Nr R F"],
  fk_BSNRF: Float[Array, "B S Nr R F"],
  sym_BSE: Float[Array, "B S E"],
  *,
  mask=None,
  implementation: str | None = None,
) -> tuple[Float[Array, "B T Nr R"], Float[Array, "B T Nr E"]]:
  """(Σ_j α_ij r(i, j), Σ_j α_ij s_j) per relational head, by one attention call with
  stacked values."""
  B, S, Nr, R, F = fk_BSNRF.shape
  E = sym_BSE.shape[-1]
  sym = jnp.broadcast_to(sym_BSE[:, :, None, :], (B, S, Nr, E)).astype(fk_BSNRF.dtype)
  v = jnp.concatenate([fk_BSNRF.reshape(B, S, Nr, R * F), sym], -1)
  o = api_lib.dot_product_attention(qa_BTNH, ka_BSNH, v, mask=mask, implementation=implementation)
  T = o.shape[1]
  fk_mean = o[..., : R * F].reshape(B, T, Nr, R, F)
  rel = jnp.einsum("BTNRF,BTNRF->BTNR", fq_BTNRF, fk_mean)
  return rel, o[..., R * F :]


@typing.no_type_check
def relational_attn(
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
  """Dual attention: sensory heads and relational heads concatenated into W_O (Disentangling
  and Integrating Relational and Sensory Information in Transformer Architectures); see the
  module docstring.

  Args:
    params: ``init_relational_attn`` pytree: sensory ``w_q``/``w_k [D, Ns, H]``,
      ``w_v [D, Ns, Hv]``; relational ``w_qa``/``w_ka [D, Nr, H]``, ``w_fq``/``w_fk
      [D, Nr, R, F]``, ``w_r [Nr, R, Hv]``, ``w_s [Nr, E, Hv]``, ``symbols [P, E]``;
      ``w_o [N, Hv, D]`` (sensory heads first).
    x_BTD, context_BSD, causal, implementation, mask, positions_BT, rope: as every layer
      function (``attn_jax.attention.heads``); RoPE rotates the attention q/k of both kinds.
  """
  dims = rel_dims(params)
  call = heads_lib._check_call(dims.D, x_BTD, context_BSD, causal, mask, positions_BT, rope)
  dtype = x_BTD.dtype
  src = call.src_BSD

  def proj(eq, a, name):
    return jnp.einsum(eq, a, params[name].astype(dtype))

  outs = []
  if dims.Ns:
    q = heads_lib._rotate(proj("BTD,DNH->BTNH", x_BTD, "w_q"), call.q_pos_BT, call.rope)
    k = heads_lib._rotate(proj("BSD,DNH->BSNH", src, "w_k"), call.kv_pos_BS, call.rope)
    v = proj("BSD,DNV->BSNV", src, "w_v")
    outs.append(
      api_lib.dot_product_attention(q, k, v, mask=call.mask, implementation=implementation)
    )
  qa = heads_lib._rotate(proj("BTD,DNH->BTNH", x_BTD, "w_qa"), call.q_pos_BT, call.rope)
  ka = heads_lib._rotate(proj("BSD,DNH->BSNH", src, "w_ka"), call.kv_pos_BS, call.rope)
  fq = proj("BTD,DNRF->BTNRF", x_BTD, "w_fq")
  fk = proj("BSD,DNRF->BSNRF", src, "w_fk")
  sym = jnp.take(params["symbols"].astype(dtype), call.kv_pos_BS, axis=0, mode="fill", fill_value=0)
  rel, sym_mean = relational_heads(
    qa, ka, fq, fk, sym, mask=call.mask, implementation=implementation
  )
  ra = proj("BTNR,NRV->BTNV", rel, "w_r") + proj("BTNE,NEV->BTNV", sym_mean, "w_s")
  outs.append(ra)
  return heads_lib.output_projection(params, jnp.concatenate(outs, axis=2))


def param_specs(
  *,
  d_model: int,
  num_heads: int,
  num_kv_heads: int | None = None,
  head_dim: int | None = None,
  v_head_dim: int | None = None,
  rel_heads: int | None = None,
  rel_dim: int | None = None,
  rel_symbols: int | None = None,
) -> dict:
  """Nr = ``rel_heads`` (default max(1, N // 2)) relational heads of N; R = ``rel_dim``
  relations (default 4) of feature dim F = H; symbol dim E = H over a library of
  P = ``rel_symbols`` positions (default 512). ``num_kv_heads`` must be None or N."""
  N = heads_lib._int("num_heads", num_heads, 1)
  if num_kv_heads not in (None, -1, N):
    raise ValueError(f"relational_attn has no kv-head sharing; got num_kv_heads={num_kv_heads}")
  D = heads_lib._int("d_model", d_model, 1)
  H = heads_lib._opt("head_dim", head_dim, D // N)
  Hv = heads_lib._opt("v_head_dim", v_head_dim, H)
  Nr = heads_lib._opt("rel_heads", rel_heads, max(1, N // 2))
  if Nr > N:
    raise ValueError(f"rel_heads must be <= num_heads={N}; got {Nr}")
  R = heads_lib._opt("rel_dim", rel_dim, 4)
  P = heads_lib._opt("rel_symbols", rel_symbols, 512)
  Ns, F, E = N - Nr, H, H
  fan = heads_lib._fan_in
  return {
    "w_q": ((D, Ns, H), fan(D), ("embed", "heads", None)),
    "w_k": ((D, Ns, H), fan(D), ("embed", "heads", None)),
    "w_v": ((D, Ns, Hv), fan(D), ("embed", "heads", None)),
    "w_qa": ((D, Nr, H), fan(D), ("embed", "heads", None)),
    "w_ka": ((D, Nr, H), fan(D), ("embed", "heads", None)),
    "w_fq": ((D, Nr, R, F), fan(D), ("embed", "heads", None, None)),
    "w_fk": ((D, Nr, R, F), fan(D), ("embed", "heads", None, None)),
    "w_r": ((Nr, R, Hv), fan(R), ("heads", None, None)),
    "w_s": ((Nr, E, Hv), fan(E), ("heads", None, None)),
    "symbols": ((P, E), heads_lib._normal_init(1.0), (None, None)),
    "w_o": ((N, Hv, D), fan(N * Hv), ("heads", None, "embed")),
  }


init_relational_attn = heads_lib.make_init(
  "relational_attn", ("v_head_dim", "rel_heads", "rel_dim", "rel_symbols"), param_specs
)

registry.register(
  registry.Mechanism(
    id="relational_attn",
    family="e",
    paper=PAPER,
    entry_point="attn_jax.attention.relational:relational_attn",
    implementations=registry.KERNEL_IMPLEMENTATIONS,
    patterns=registry.ALL_PATTERNS,
    decode=False,
    tier=2,
    check="The stacked-value flash form equals the materialised Σ_j α_ij·r(x_i, x_j) form. "
    "(Positional symbols only.)",
    build=registry.build_nothing,
    module="attn_jax.nn.relational:RelationalAttention",
    interface="layer",
    init="attn_jax.attention.relational:init_relational_attn",
  )
)
