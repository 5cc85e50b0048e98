"""Mixture of Gaussian keys (catalog family (e), ``mgk``) as a pure JAX function.

"Improving Transformers with Probabilistic Attention Keys".

Dimension key: B batch, T query length, S key/value length, D model dim, N query heads,
K kv heads, M keys per position, H head dim, Hv value head dim.

Each key position j holds M keys k_(j,r) with priors π_(j,r) and widths σ_r::

    w_ij = Σ_r π_(j,r) exp(−‖q_i − k_(j,r)‖² / (2σ_r²)),    o_i = Σ_j w_ij v_j / Σ_j w_ij

Our reading where the accounts differ: π_(j,·) = softmax(x_j W_π) per position and kv head,
σ_r learned per kv head and key (``log_sigma [K, M]``). Each mixture component is a softmax
logit that is an ordinary dot product of augmented vectors (scale 1)::

    q̂_i = [q_i, ‖q_i‖², 1]
    k̂_(j,r) = [k_(j,r)/σ_r², −1/(2σ_r²), −‖k_(j,r)‖²/(2σ_r²) + log π_(j,r)]

so component r is one ``dot_product_attention`` call (any mask, any implementation,
flash kernels included) returning its output and log-sum-exp, and the M outputs merge
exactly by their log-sum-exps. With equal σ the ‖q‖² term cancels across a row; with M = 1
the layer is softmax attention with the key bias −‖k‖²/(2σ²) (and σ² scale). Nothing of
size T×S is formed.
"""

import typing

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from attn_jax.attention import api as api_lib
from attn_jax.attention import heads as heads_lib
from attn_jax.attention import registry

PAPER = "Improving Transformers with Probabilistic Attention Keys"
_NAMES = ("w_q", "w_k", "w_v", "w_o", "w_pi", "log_sigma")


def mgk_dims(params) -> tuple[int, int, int, int, int, int]:
  """(D, N, K, M, H, Hv) of ``params``, every array checked."""
  if not isinstance(params, dict) or set(params) != set(_NAMES):
    got = sorted(params) if isinstance(params, dict) else type(params)
    raise ValueError(f"mgk params must hold {sorted(_NAMES)}; got {got}")
  shapes = {n: tuple(np.shape(params[n])) for n in _NAMES}
  if len(shapes["w_q"]) != 3 or len(shapes["w_k"]) != 4:
    raise ValueError(
      f"params['w_q'] must be [D, N, H] and ['w_k'] [D, K, M, H]; got {shapes['w_q']}, "
      f"{shapes['w_k']}"
    )
  D, N, H = shapes["w_q"]
  _, K, M, _ = shapes["w_k"]
  Hv = shapes["w_v"][-1] if len(shapes["w_v"]) == 3 else -1
  want = {
    "w_k": (D, K, M, H),
    "w_v": (D, K, Hv),
    "w_o": (N, Hv, D),
    "w_pi": (D, K, M),
    "log_sigma": (K, M),
  }
  for name, shape in want.items():
    if shapes[name] != shape or Hv < 1:
      raise ValueError(f"params[{name!r}] must have shape {shape}; got {shapes[name]}")
  if N % K:
    raise ValueError(f"kv heads K={K} must divide the heads N={N}")
  return D, N, K, M, H, Hv


def mixture_attention(
  q_BTNH: Float[Array, "B T N H"],
  k_BSKMH: Float[Array, "B S K M H"],
  v_BSKV: Float[Array, "B S K Hv"],
  log_pi_BSKM: Float[Array, "B S K M"],
  log_sigma_KM: Float[Array, "K M"],
  *,
  mask=None,
  implementation: str | None = None,
) -> Float[Array, "B T N Hv"]:
  """Gaussian-mixture-key attention: one attention call per component, merged by lse."""
  dtype = jnp.promote_types(q_BTNH.dtype, jnp.float32)
  q = q_BTNH.astype(dtype)
  q_aug = jnp.concatenate([q, jnp.sum(q * q, -1, keepdims=True), jnp.ones_like(q[..., :1])], -1)
  inv_var = jnp.exp(-2 * log_sigma_KM.astype(dtype))  # [K, M]
  outs, lses = [], []
  for r in range(k_BSKMH.shape[3]):
    k = k_BSKMH[:, :, :, r].astype(dtype)
    iv = inv_var[:, r][None, None, :, None]  # [1, 1, K, 1]
    bias = -0.5 * jnp.sum(k * k, -1, keepdims=True) * iv + log_pi_BSKM[..., r : r + 1].astype(dtype)
    k_aug = jnp.concatenate([k * iv, jnp.broadcast_to(-0.5 * iv, k[..., :1].shape), bias], -1)
    out, lse = api_lib.dot_product_attention(
      q_aug,
      k_aug,
      v_BSKV.astype(dtype),
      mask=mask,
      scale=1.0,
      implementation=implementation,
      return_lse=True,
    )
    outs.append(out)
    lses.append(lse)
  lse_RBNT = jnp.stack(lses)
  # Fully masked rows have lse = -inf in every component: merge finite stand-ins (so no NaN
  # reaches the gradients) and zero their weights.
  finite = jnp.isfinite(lse_RBNT)
  safe = jnp.where(finite, lse_RBNT, -1e30)
  weight = jnp.where(finite, jnp.exp(safe - jax.nn.logsumexp(safe, axis=0)), 0)  # [M, B, N, T]
  out = sum(
    o * jnp.swapaxes(w, 1, 2)[..., None].astype(o.dtype) for o, w in zip(outs, weight, strict=True)
  )
  return out.astype(q_BTNH.dtype)


@typing.no_type_check
def mgk(
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
  """Mixture-of-Gaussian-keys attention (Improving Transformers with Probabilistic Attention
  Keys); see the module docstring.

  Args:
    params: ``init_mgk`` pytree: ``w_q [D, N, H]``, ``w_k [D, K, M, H]``, ``w_v [D, K, Hv]``,
      ``w_o [N, Hv, D]``, ``w_pi [D, K, M]``, ``log_sigma [K, M]``.
    x_BTD, context_BSD, causal, implementation, mask, positions_BT, rope: as every layer
      function (``attn_jax.attention.heads``); RoPE rotates q and every key.
  """
  D, N, K, M, H, Hv = mgk_dims(params)
  call = heads_lib._check_call(D, x_BTD, context_BSD, causal, mask, positions_BT, rope)
  dtype = x_BTD.dtype
  src = call.src_BSD
  q = heads_lib._rotate(
    jnp.einsum("BTD,DNH->BTNH", x_BTD, params["w_q"].astype(dtype)), call.q_pos_BT, call.rope
  )
  k = jnp.einsum("BSD,DKMH->BSKMH", src, params["w_k"].astype(dtype))
  B, S = src.shape[:2]
  k = heads_lib._rotate(k.reshape(B, S, K * M, H), call.kv_pos_BS, call.rope).reshape(B, S, K, M, H)
  v = jnp.einsum("BSD,DKV->BSKV", src, params["w_v"].astype(dtype))
  pi_logits = jnp.einsum("BSD,DKM->BSKM", src, params["w_pi"].astype(dtype))
  log_pi = jax.nn.log_softmax(pi_logits.astype(jnp.promote_types(dtype, jnp.float32)), -1)
  o = mixture_attention(
    q, k, v, log_pi, params["log_sigma"], mask=call.mask, implementation=implementation
  )
  return heads_lib.output_projection(params, o)


def param_specs(
  *,
  d_model: int,
  num_heads: int,
  num_kv_heads: int | None = None,
  head_dim: int | None = None,
  v_head_dim: int | None = None,
  mgk_keys: int | None = None,
) -> dict:
  """The GQA projections with M = ``mgk_keys`` (default 2) keys per position, ``w_pi`` near 0
  (uniform priors) and σ_r² = sqrt(H) (so the q·k term starts at the usual 1/sqrt(H)
  scale)."""
  specs = heads_lib.param_specs(
    "head_dims",
    d_model=d_model,
    num_heads=num_heads,
    num_kv_heads=num_kv_heads,
    head_dim=head_dim,
    v_head_dim=v_head_dim,
  )
  M = heads_lib._opt("mgk_keys", mgk_keys, 2)
  D, K, H = specs["w_k"][0]
  specs["w_k"] = ((D, K, M, H), heads_lib._fan_in(D), ("embed", "kv_heads", None, None))
  specs["w_pi"] = ((D, K, M), heads_lib._normal_init(0.02), ("embed", "kv_heads", None))
  log_sigma0 = 0.25 * float(np.log(H))

  def sigma_init(key, shape, dtype):
    del key
    return jnp.full(shape, log_sigma0, dtype)

  specs["log_sigma"] = ((K, M), sigma_init, ("kv_heads", None))
  return specs


init_mgk = heads_lib.make_init("mgk", ("v_head_dim", "mgk_keys"), param_specs)


registry.register(
  registry.Mechanism(
    id="mgk",
    family="e",
    paper=PAPER,
    entry_point="attn_jax.attention.mgk:mgk",
    implementations=registry.KERNEL_IMPLEMENTATIONS,
    patterns=registry.ALL_PATTERNS,
    decode=False,
    tier=2,
    check="The per-component flash form equals the materialised mixture. M = 1 equals "
    "softmax with key bias −‖k‖²/(2σ²). (Linear-attention variant not built.)",
    build=registry.build_nothing,
    module="attn_jax.nn.mgk:MGKAttention",
    interface="layer",
    init="attn_jax.attention.mgk:init_mgk",
  )
)
