"""The attention-bottleneck layer of the stacks (registry id ``tab``): attention whose total
weight on the keys lies in [0, 1] through a learned null slot per head; calls
``attn_jax.attention.tab.tab``. The paper's layer has one head (``num_heads=1``). The
generic option keys are declared and ignored; "rope" rotates q and k.
"""

from attn_jax.attention import tab as tab_lib
from attn_jax.nn import functional

TABAttention = functional.functional_layer(
  "TABAttention",
  "tab",
  tab_lib.param_specs,
  tab_lib.tab,
  doc="Attention bottleneck; constructor arguments as ``attn_jax.nn.attention.Attention``.",
  module=__name__,
)
