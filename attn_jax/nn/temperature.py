"""The selective-attention temperature layer of the stacks (registry id
``query_temperature``): GQA projections with token- and position-dependent query
temperatures and token-dependent value temperatures; calls
``attn_jax.attention.temperature.query_temperature``.

The generic option keys ``window``, ``chunk``, ``prefix``, ``softcap`` are declared and
ignored. Positions: "rope" rotates q and k; "learned" and "none" leave them alone (the
position term of the temperature always uses the token positions).
"""

from attn_jax.attention import temperature as temp_lib
from attn_jax.nn import attention as attention_lib
from attn_jax.nn import projected

KINDS = ("query_temperature",)
POSITIONS = ("rope", "learned", "none")


class TemperatureAttention(projected.ProjectedAttention):
  """Query/value-temperature attention; constructor arguments as
  ``attn_jax.nn.attention.Attention``."""

  DEFAULT_OPTIONS = attention_lib.DEFAULT_OPTIONS

  def __init__(
    self,
    *,
    d_model: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    v_head_dim: int | None = None,
    kind: str = "query_temperature",
    causal: bool = True,
    positions: str = "rope",
    rope_base: float = 10000.0,
    rotary_dim: int | None = None,
    qk_norm: bool = False,
    options: dict | None = None,
    implementation: str | None = None,
    rngs,
  ):
    projected.check_kind("TemperatureAttention", kind, KINDS, positions, POSITIONS)
    if qk_norm:
      raise ValueError("attention kind 'query_temperature' does not take qk_norm=True")
    projected.merge_options(kind, options, self.DEFAULT_OPTIONS)
    specs = temp_lib.param_specs(
      d_model=d_model,
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=head_dim,
      v_head_dim=v_head_dim,
    )
    self.causal, self.implementation = causal, implementation
    self._declare_params(rngs, specs)
    self.rope = projected.rope_settings(positions, rope_base, rotary_dim, specs["w_k"][0][-1])

  def __call__(self, x_BTD, *, positions_BT=None, segment_ids_BT=None):
    return temp_lib.query_temperature(
      self.param_tree(),
      x_BTD,
      causal=self.causal,
      implementation=self.implementation,
      mask=projected.segment_mask(segment_ids_BT),
      positions_BT=positions_BT,
      rope=self.rope,
    )
