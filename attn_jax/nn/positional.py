"""The positional attention layer of the stacks (registry id ``positional_attn``): q and k
from positional encodings, v from the input; calls
``attn_jax.attention.positional.positional_attn``.

Options: ``positional_dim`` (P, default 512: one-hot positions 0..511) and
``positional_encoding`` ("onehot" or "sinusoidal"). The generic keys ``window``, ``chunk``,
``prefix``, ``softcap`` are declared and ignored. Positions: "learned" or "none" (the
model's own position handling); "rope" is refused, since q and k carry no content to rotate.
"""

from attn_jax.attention import positional as pos_lib
from attn_jax.nn import attention as attention_lib
from attn_jax.nn import projected

KINDS = ("positional_attn",)
POSITIONS = ("learned", "none")
DEFAULT_OPTIONS = {
  **attention_lib.DEFAULT_OPTIONS,
  "positional_dim": 512,
  "positional_encoding": "onehot",
}


class PositionalAttention(projected.ProjectedAttention):
  """Positional attention; constructor arguments as ``attn_jax.nn.attention.Attention``."""

  DEFAULT_OPTIONS = DEFAULT_OPTIONS

  def __init__(
    self,
    *,
    d_model: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    v_head_dim: int | None = None,
    kind: str = "positional_attn",
    causal: bool = True,
    positions: str = "learned",
    rope_base: float = 10000.0,
    rotary_dim: int | None = None,
    qk_norm: bool = False,
    options: dict | None = None,
    implementation: str | None = None,
    rngs,
  ):
    del rope_base, rotary_dim
    if positions == "rope":
      raise ValueError(
        "positional_attn computes q and k from positional encodings; use positions='learned' "
        "or 'none', not 'rope'"
      )
    projected.check_kind("PositionalAttention", kind, KINDS, positions, POSITIONS)
    if qk_norm:
      raise ValueError("attention kind 'positional_attn' does not take qk_norm=True")
    options = projected.merge_options(kind, options, DEFAULT_OPTIONS)
    self.encoding = str(options["positional_encoding"])
    if self.encoding not in pos_lib.ENCODINGS:
      raise ValueError(
        f"positional_encoding must be one of {pos_lib.ENCODINGS}; got {self.encoding!r}"
      )
    specs = pos_lib.param_specs(
      d_model=d_model,
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=head_dim,
      v_head_dim=v_head_dim,
      positional_dim=int(options["positional_dim"]),
    )
    self.causal, self.implementation = causal, implementation
    self._declare_params(rngs, specs)

  def __call__(self, x_BTD, *, positions_BT=None, segment_ids_BT=None):
    return pos_lib.positional_attn(
      self.param_tree(),
      x_BTD,
      causal=self.causal,
      implementation=self.implementation,
      mask=projected.segment_mask(segment_ids_BT),
      positions_BT=positions_BT,
      positional_encoding=self.encoding,
    )
