"""The mixture-of-Gaussian-keys layer of the stacks (registry id ``mgk``): owns the
projections, the per-position key priors and the widths; calls ``attn_jax.attention.mgk.mgk``
(one attention call per key component, merged exactly).

Options: ``mgk_keys`` (M keys per position, default 2). The generic keys are declared and
ignored; "rope" rotates q and every key.
"""

from attn_jax.attention import mgk as mgk_lib
from attn_jax.nn import functional

MGKAttention = functional.functional_layer(
  "MGKAttention",
  "mgk",
  mgk_lib.param_specs,
  mgk_lib.mgk,
  options={"mgk_keys": 2},
  doc="Mixture-of-Gaussian-keys attention; constructor arguments as "
  "``attn_jax.nn.attention.Attention``.",
  module=__name__,
)
