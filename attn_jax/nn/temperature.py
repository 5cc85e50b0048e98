"""The selective-attention temperature layer of the stacks (registry id
``query_temperature``): GQA projections with token- and position-dependent query
temperatures and token-dependent value temperatures; calls
``attn_jax.attention.temperature.query_temperature``. The generic option keys are declared
and ignored; "rope" rotates q and k (the temperature's position term always uses the token
positions).
"""

from attn_jax.attention import temperature as temp_lib
from attn_jax.nn import functional

TemperatureAttention = functional.functional_layer(
  "TemperatureAttention",
  "query_temperature",
  temp_lib.param_specs,
  temp_lib.query_temperature,
  doc="Query/value-temperature attention; constructor arguments as "
  "``attn_jax.nn.attention.Attention``.",
  module=__name__,
)
