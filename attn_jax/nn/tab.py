"""The attention-bottleneck layer of the stacks (registry id ``tab``): attention whose total
weight on the keys lies in [0, 1] through a learned null slot per head; calls
``attn_jax.attention.tab.tab``. The paper's layer has one head (``num_heads=1``).

The generic option keys ``window``, ``chunk``, ``prefix``, ``softcap`` are declared and
ignored. Positions: "rope" rotates q and k; "learned" and "none" leave them alone.
"""

from attn_jax.attention import tab as tab_lib
from attn_jax.nn import attention as attention_lib
from attn_jax.nn import projected

KINDS = ("tab",)
POSITIONS = ("rope", "learned", "none")


class TABAttention(projected.ProjectedAttention):
  """Attention bottleneck; constructor arguments as ``attn_jax.nn.attention.Attention``."""

  DEFAULT_OPTIONS = attention_lib.DEFAULT_OPTIONS

  def __init__(
    self,
    *,
    d_model: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    v_head_dim: int | None = None,
    kind: str = "tab",
    causal: bool = True,
    positions: str = "rope",
    rope_base: float = 10000.0,
    rotary_dim: int | None = None,
    qk_norm: bool = False,
    options: dict | None = None,
    implementation: str | None = None,
    rngs,
  ):
    projected.check_kind("TABAttention", kind, KINDS, positions, POSITIONS)
    if qk_norm:
      raise ValueError("attention kind 'tab' does not take qk_norm=True; use qk_norm=False")
    projected.merge_options(kind, options, self.DEFAULT_OPTIONS)
    specs = tab_lib.param_specs(
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
    return tab_lib.tab(
      self.param_tree(),
      x_BTD,
      causal=self.causal,
      implementation=self.implementation,
      mask=projected.segment_mask(segment_ids_BT),
      positions_BT=positions_BT,
      rope=self.rope,
    )
