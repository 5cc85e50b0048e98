"""The stack side of ``hybrid_schedule`` (registry interface ``"schedule"``): the option keys
a config exposes for it. The schedule itself is expanded to one registry id per layer by
``attn_jax.nn.transformer.layer_kinds``; every layer is then an ordinary linear-attention or
attention module, and ``Transformer.init_cache`` / ``Transformer.step`` decode the mix."""

from attn_jax.attention import hybrid as hybrid_lib
from attn_jax.nn import attention as attention_lib
from attn_jax.nn import linear as linear_lib


class HybridSchedule:
  """Not a layer: the stack expands the schedule (see the module docstring)."""

  # The schedule's own keys plus those of the layers it can place (any linear id, any
  # softmax attention id), so every option of the expanded layers is a config field.
  DEFAULT_OPTIONS = {
    **attention_lib.DEFAULT_OPTIONS,
    **linear_lib.DEFAULT_OPTIONS,
    **hybrid_lib.DEFAULTS,
  }

  def __init__(self, **kwargs):
    del kwargs
    raise TypeError(
      "hybrid_schedule is a per-layer schedule, not a layer: build a stack with "
      "Transformer(attention='hybrid_schedule', num_layers=..., options={'hybrid_linear': ...})"
    )
