"""The Music Transformer relative-attention layer of the stacks (registry id ``rel_skew``):
causal only, GQA projections plus learned relative embeddings; calls
``attn_jax.attention.rel_skew.rel_skew``.

Options: ``rel_max`` (relative distances L, default 512; longer distances reuse the last).
The generic keys ``window``, ``chunk``, ``prefix``, ``softcap`` are declared and ignored.
Positions: "learned" or "none"; "rope" is refused (the relative embeddings carry position).
"""

from attn_jax.attention import rel_skew as rel_lib
from attn_jax.nn import attention as attention_lib
from attn_jax.nn import projected

KINDS = ("rel_skew",)
POSITIONS = ("learned", "none")
DEFAULT_OPTIONS = {**attention_lib.DEFAULT_OPTIONS, "rel_max": 512}


class RelSkewAttention(projected.ProjectedAttention):
  """Relative attention with the skew; constructor arguments as
  ``attn_jax.nn.attention.Attention``."""

  DEFAULT_OPTIONS = DEFAULT_OPTIONS

  def __init__(
    self,
    *,
    d_model: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    v_head_dim: int | None = None,
    kind: str = "rel_skew",
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
        "rel_skew carries position in its relative embeddings: use positions="
        "'learned' or 'none', not 'rope'"
      )
    projected.check_kind("RelSkewAttention", kind, KINDS, positions, POSITIONS)
    if not causal:
      raise ValueError("attention kind 'rel_skew' is causal-only; the model is bidirectional")
    if qk_norm:
      raise ValueError("attention kind 'rel_skew' does not take qk_norm=True")
    options = projected.merge_options(kind, options, DEFAULT_OPTIONS)
    specs = rel_lib.param_specs(
      d_model=d_model,
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=head_dim,
      v_head_dim=v_head_dim,
      rel_max=int(options["rel_max"]),
    )
    self.implementation = implementation
    self._declare_params(rngs, specs)

  def __call__(self, x_BTD, *, positions_BT=None, segment_ids_BT=None):
    return rel_lib.rel_skew(
      self.param_tree(),
      x_BTD,
      causal=True,
      implementation=self.implementation,
      mask=projected.segment_mask(segment_ids_BT),
      positions_BT=positions_BT,
    )
