"""The dual-attention layer of the stacks (registry id ``relational_attn``): sensory and
relational heads; calls ``attn_jax.attention.relational.relational_attn``.

Options: ``rel_heads`` (relational heads, -1: max(1, N // 2)), ``rel_dim`` (relations per
head, default 4), ``rel_symbols`` (positional symbol library size, default 512). The generic
keys are declared and ignored; "rope" rotates the attention q/k. ``num_kv_heads`` must be
None or N.
"""

from attn_jax.attention import relational as rel_lib
from attn_jax.nn import functional

RelationalAttention = functional.functional_layer(
  "RelationalAttention",
  "relational_attn",
  rel_lib.param_specs,
  rel_lib.relational_attn,
  options={"rel_heads": -1, "rel_dim": 4, "rel_symbols": 512},
  doc="Dual attention; constructor arguments as ``attn_jax.nn.attention.Attention``.",
  module=__name__,
)
