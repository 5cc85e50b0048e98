"""The dual-attention layer of the stacks (registry id ``relational_attn``): sensory and
relational heads; calls ``attn_jax.attention.relational.relational_attn``.

Options: ``rel_heads`` (relational heads, -1: max(1, N // 2)), ``rel_dim`` (relations per
head, default 4), ``rel_symbols`` (positional symbol library size, default 512). The generic
keys ``window``, ``chunk``, ``prefix``, ``softcap`` are declared and ignored. Positions:
"rope" rotates the attention q/k; "learned" and "none" leave them alone. ``num_kv_heads``
must be None or N.
"""

from attn_jax.attention import relational as rel_lib
from attn_jax.nn import attention as attention_lib
from attn_jax.nn import projected

KINDS = ("relational_attn",)
POSITIONS = ("rope", "learned", "none")
DEFAULT_OPTIONS = {
  **attention_lib.DEFAULT_OPTIONS,
  "rel_heads": -1,
  "rel_dim": 4,
  "rel_symbols": 512,
}


class RelationalAttention(projected.ProjectedAttention):
  """Dual attention; constructor arguments as ``attn_jax.nn.attention.Attention``."""

  DEFAULT_OPTIONS = DEFAULT_OPTIONS

  def __init__(
    self,
    *,
    d_model: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    v_head_dim: int | None = None,
    kind: str = "relational_attn",
    causal: bool = True,
    positions: str = "rope",
    rope_base: float = 10000.0,
    rotary_dim: int | None = None,
    qk_norm: bool = False,
    options: dict | None = None,
    implementation: str | None = None,
    rngs,
  ):
    projected.check_kind("RelationalAttention", kind, KINDS, positions, POSITIONS)
    if qk_norm:
      raise ValueError("attention kind 'relational_attn' does not take qk_norm=True")
    options = projected.merge_options(kind, options, DEFAULT_OPTIONS)
    specs = rel_lib.param_specs(
      d_model=d_model,
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=head_dim,
      v_head_dim=v_head_dim,
      rel_heads=int(options["rel_heads"]),
      rel_dim=int(options["rel_dim"]),
      rel_symbols=int(options["rel_symbols"]),
    )
    self.causal, self.implementation = causal, implementation
    self._declare_params(rngs, specs)
    self.rope = projected.rope_settings(positions, rope_base, rotary_dim, specs["w_qa"][0][-1])

  def __call__(self, x_BTD, *, positions_BT=None, segment_ids_BT=None):
    return rel_lib.relational_attn(
      self.param_tree(),
      x_BTD,
      causal=self.causal,
      implementation=self.implementation,
      mask=projected.segment_mask(segment_ids_BT),
      positions_BT=positions_BT,
      rope=self.rope,
    )
