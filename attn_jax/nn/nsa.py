"""The native-sparse-attention layer of the stacks (registry id ``nsa``): GQA projections,
compressed / selected / sliding-window branches mixed by sigmoid gates; calls
``attn_jax.attention.nsa.nsa``. Options: ``nsa_block`` (block length l), ``nsa_top_n``
(selected blocks per query and kv head), ``nsa_window`` (window branch). Causal only.
"""

from attn_jax.attention import nsa as nsa_lib
from attn_jax.nn import functional

NSAAttention = functional.functional_layer(
  "NSAAttention",
  "nsa",
  nsa_lib.param_specs,
  nsa_lib.nsa,
  options={"nsa_block": 64, "nsa_top_n": 4, "nsa_window": 128},
  call_options=("nsa_top_n", "nsa_window"),
  causal_only=True,
  doc="Native sparse attention; constructor arguments as ``attn_jax.nn.attention.Attention``.",
  module=__name__,
)
