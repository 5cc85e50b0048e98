"""Collinear constrained attention (catalog family (a), ``coca``) as a pure JAX function.

"Cure the headache of Transformers via Collinear Constrained Attention".

Dimension key: B batch, T query length, S key/value length, N query heads, K kv heads,
H head dim (even), R = H / 2 rotary planes (the "half" layout: plane j is dims (j, j + R)).

In every rotary plane j the key is constrained to be collinear with the query, keeping only
a non-negative magnitude, so the logit becomes

    score(m, n) = Σ_j ‖q_m^(j)‖ · t_n^(j) · cos((m − n) θ_j),     θ_j = base^(−2j/H)

computed as the ordinary dot product of q̂_m^(j) = ‖q_m^(j)‖ (cos mθ_j, sin mθ_j) and
k̂_n^(j) = t_n^(j) (cos nθ_j, sin nθ_j). Our reading where the accounts differ: the magnitude
is the key plane's norm, t_n^(j) = ‖k_n^(j)‖ (non-negative by construction). The transformed
q̂/k̂ go to an unchanged ``dot_product_attention`` (every implementation, flash kernels
included). At distance 0 every plane contributes ‖q^(j)‖ t^(j) >= 0.
"""

import typing

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from attn_jax.attention import _checks, registry
from attn_jax.attention import api as api_lib
from attn_jax.attention import rope as rope_lib


def _plane_norm(a, b):
  sq = a * a + b * b
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)  # finite gradient


def coca_qk(
  q_BTNH: Float[Array, "B T N H"],
  k_BSKH: Float[Array, "B S K H"],
  q_pos_BT: Int[Array, "B T"],
  kv_pos_BS: Int[Array, "B S"],
  *,
  base: float = rope_lib.DEFAULT_BASE,
) -> tuple[Float[Array, "B T N H"], Float[Array, "B S K H"]]:
  """(q̂, k̂): per plane, the query's norm and the key's norm placed at the rotary angles of
  their positions (see the module docstring)."""
  H = q_BTNH.shape[-1]
  if H % 2:
    raise ValueError(f"coca needs an even head dim (rotary planes); got H={H}")
  R = H // 2
  dtype = _checks.compute_dtype(q_BTNH.dtype)
  theta_R = rope_lib.rope_frequencies(H, base, dtype=dtype)

  def place(x, pos):
    x = x.astype(dtype)
    norm = _plane_norm(x[..., :R], x[..., R:])  # [B, L, heads, R]
    angle = pos.astype(dtype)[:, :, None, None] * theta_R
    return jnp.concatenate([norm * jnp.cos(angle), norm * jnp.sin(angle)], -1)

  return place(q_BTNH, q_pos_BT).astype(q_BTNH.dtype), place(k_BSKH, kv_pos_BS).astype(k_BSKH.dtype)


@typing.no_type_check
def coca(
  q_BTNH: Float[Array, "B T N H"],
  k_BSKH: Float[Array, "B S K H"],
  v_BSKV: Float[Array, "B S K Hv"],
  *,
  mask=None,
  q_positions: Int[Array, "B T"] | None = None,
  kv_positions: Int[Array, "B S"] | None = None,
  base: float = rope_lib.DEFAULT_BASE,
  implementation: str | None = None,
):
  """Collinear constrained attention (Cure the headache of Transformers via Collinear
  Constrained Attention) on unrotated q/k.

  Args:
    q_BTNH, k_BSKH, v_BSKV: queries, keys (not rotated), values.
    mask: as ``dot_product_attention`` (e.g. ``CausalMask()``).
    q_positions, kv_positions: integer positions (default bottom-right ``S − T + arange(T)``
      and ``arange(S)``).
    base: the rotary base.
    implementation: as ``dot_product_attention``.
  """
  dims = _checks.check_qkv(q_BTNH, k_BSKH, v_BSKV)
  base = rope_lib._check_base(base)
  if q_positions is None:
    q_positions = jnp.arange(dims.T, dtype=jnp.int32) + (dims.S - dims.T)
  if kv_positions is None:
    kv_positions = jnp.arange(dims.S, dtype=jnp.int32)
  q_pos = rope_lib._check_positions(q_positions, "q_positions", "T", dims.B, dims.T)
  kv_pos = rope_lib._check_positions(kv_positions, "kv_positions", "S", dims.B, dims.S)
  q_hat, k_hat = coca_qk(q_BTNH, k_BSKH, q_pos, kv_pos, base=base)
  return api_lib.dot_product_attention(
    q_hat, k_hat, v_BSKV, mask=mask, implementation=implementation
  )


def _build(key, dims, causal):
  del key, dims
  return {"mask": registry._causal_or_none(causal)}


registry.register(
  registry.Mechanism(
    id="coca",
    family="a",
    paper="Cure the headache of Transformers via Collinear Constrained Attention",
    entry_point="attn_jax.attention.coca:coca",
    implementations=registry.KERNEL_IMPLEMENTATIONS,
    patterns=registry.ALL_PATTERNS,
    decode=True,
    tier=2,
    check="The separable form equals the direct formula. Logits depend only on m − n (for "
    "position-independent magnitudes). At distance 0 every plane contributes a non-negative "
    "term.",
    build=_build,
    module=registry.NN_ATTENTION,
  )
)
