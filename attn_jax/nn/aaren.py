"""The Aaren layer of the stacks (registry id ``aaren``): a learned query per head attends over
every prefix of the projected keys and values by a parallel prefix scan; calls
``attn_jax.attention.aaren.aaren``. Causal only; positions "learned" or "none" (the query
does not depend on the input, so RoPE has nothing to rotate against).
"""

from attn_jax.attention import aaren as aaren_lib
from attn_jax.nn import functional

AarenAttention = functional.functional_layer(
  "AarenAttention",
  "aaren",
  aaren_lib.param_specs,
  aaren_lib.aaren,
  positions=("none", "learned"),
  causal_only=True,
  doc="Aaren (Attention as an RNN); constructor arguments as ``attn_jax.nn.attention.Attention``.",
  module=__name__,
)
