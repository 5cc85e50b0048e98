"""The Transformer-XL relative-score layer of the stacks (registry id ``rel_xl``): calls
``attn_jax.attention.rel_xl.rel_xl``. Options ``rel_xl_dim`` (the sinusoid width R, -1: the
head dim rounded up to even) and ``rel_xl_conv`` (the causal depthwise-convolution width,
1: none). No RoPE: the relative sinusoids carry position ("learned" or "none").
"""

from attn_jax.attention import rel_xl as rel_xl_lib
from attn_jax.nn import functional

RelXLAttention = functional.functional_layer(
  "RelXLAttention",
  "rel_xl",
  rel_xl_lib.param_specs,
  rel_xl_lib.rel_xl,
  options={"rel_xl_dim": -1, "rel_xl_conv": 3},
  positions=("none", "learned"),
  doc="Transformer-XL relative attention with a depthwise convolution; constructor arguments "
  "as ``attn_jax.nn.attention.Attention``.",
  module=__name__,
)
