"""Layers with fewer projections (registry ids ``minimal_attn``, ``pay_better``): heads are
channel slices of the input; call ``attn_jax.attention.minimal``. Options:
``minimal_symmetric`` (W_n = A_nᵀ A_n) and ``minimal_rank`` (r, -1: h) for ``minimal_attn``,
``pay_better_variant`` ("optimised" or "efficient") for ``pay_better``. No RoPE (keys are
raw input slices): positions "learned" or "none".
"""

from attn_jax.attention import minimal as minimal_lib
from attn_jax.nn import functional

MinimalAttention = functional.functional_layer(
  "MinimalAttention",
  "minimal_attn",
  minimal_lib.minimal_specs,
  minimal_lib.minimal_attn,
  options={"minimal_symmetric": False, "minimal_rank": -1},
  positions=("learned", "none"),
  doc="Minimal attention; constructor arguments as ``attn_jax.nn.attention.Attention``.",
  module=__name__,
)

PayBetterAttention = functional.functional_layer(
  "PayBetterAttention",
  "pay_better",
  minimal_lib.pay_better_specs,
  minimal_lib.pay_better,
  options={"pay_better_variant": "optimised"},
  positions=("learned", "none"),
  doc="Optimised / Efficient attention; constructor arguments as "
  "``attn_jax.nn.attention.Attention``.",
  module=__name__,
)
