"""The Music Transformer relative-attention layer of the stacks (registry id ``rel_skew``):
causal only, GQA projections plus learned relative embeddings; calls
``attn_jax.attention.rel_skew.rel_skew``.

Options: ``rel_max`` (relative distances L, default 512; longer distances reuse the last).
The generic keys are declared and ignored. Positions: "learned" or "none"; "rope" is refused
(the relative embeddings carry position).
"""

from attn_jax.attention import rel_skew as rel_lib
from attn_jax.nn import functional

RelSkewAttention = functional.functional_layer(
  "RelSkewAttention",
  "rel_skew",
  rel_lib.param_specs,
  rel_lib.rel_skew,
  options={"rel_max": 512},
  positions=("learned", "none"),
  causal_only=True,
  doc="Relative attention with the skew; constructor arguments as "
  "``attn_jax.nn.attention.Attention``.",
  module=__name__,
)
