"""The fusion-bottleneck layer of the stacks (registry id ``mbt_bottleneck``): per-modality
projections over ``[fusion tokens ; modality 1 ; ... ; modality M]``; calls
``attn_jax.attention.bottleneck.mbt_bottleneck``.

Options: ``mbt_fusion_tokens`` (F, default 4), ``mbt_modalities`` (M, default 2),
``mbt_modality_lengths`` ("" for near-equal parts of T − F, or comma-separated lengths such
as "48,16"), ``mbt_fusion_layer`` (L_f, 1-based: layers at or above it fuse through the
fusion tokens, layers below keep every modality apart; a value above the stack's depth gives
independent per-modality encoders). The stack must be bidirectional, its positions "learned"
or "none", and its batches unpacked. The generic option keys are declared and ignored.
"""

from attn_jax.attention import bottleneck as bottleneck_lib
from attn_jax.nn import attention as attention_lib
from attn_jax.nn import projected

DEFAULT_OPTIONS = {
  **attention_lib.DEFAULT_OPTIONS,
  "mbt_fusion_tokens": 4,
  "mbt_modalities": 2,
  "mbt_modality_lengths": "",
  "mbt_fusion_layer": 2,
}
POSITIONS = ("learned", "none")


def parse_lengths(text) -> tuple[int, ...] | None:
  """``"48,16"`` -> ``(48, 16)``; ``""`` -> None (the default split)."""
  if isinstance(text, (tuple, list)):
    return tuple(int(n) for n in text)
  text = str(text).strip()
  if not text:
    return None
  try:
    return tuple(int(n) for n in text.split(","))
  except ValueError:
    raise ValueError(
      f"mbt_modality_lengths must be comma-separated ints (e.g. '48,16') or ''; got {text!r}"
    ) from None


class MBTAttention(projected.ProjectedAttention):
  """Fusion-bottleneck attention; constructor arguments as ``attn_jax.nn.attention.Attention``
  plus ``layer_index``."""

  DEFAULT_OPTIONS = DEFAULT_OPTIONS
  TAKES_LAYER_INDEX = True

  def __init__(
    self,
    *,
    d_model: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    v_head_dim: int | None = None,
    kind: str = "mbt_bottleneck",
    causal: bool = False,
    positions: str = "learned",
    rope_base: float = 10000.0,
    rotary_dim: int | None = None,
    qk_norm: bool = False,
    options: dict | None = None,
    implementation: str | None = None,
    layer_index: int = 1,
    rngs,
  ):
    del rope_base, rotary_dim
    projected.check_kind("MBTAttention", kind, ("mbt_bottleneck",), positions, POSITIONS)
    if causal:
      raise ValueError("attention kind 'mbt_bottleneck' is bidirectional; the model is causal")
    if qk_norm:
      raise ValueError("attention kind 'mbt_bottleneck' does not take qk_norm=True")
    options = projected.merge_options(kind, options, self.DEFAULT_OPTIONS)
    self.num_fusion = int(options["mbt_fusion_tokens"])
    self.lengths = parse_lengths(options["mbt_modality_lengths"])
    fusion_layer = int(options["mbt_fusion_layer"])
    if fusion_layer < 1 or not isinstance(layer_index, int) or layer_index < 1:
      raise ValueError(
        f"mbt_fusion_layer and layer_index are 1-based; got {fusion_layer}, {layer_index!r}"
      )
    self.fuse = layer_index >= fusion_layer
    self.implementation = implementation
    specs = bottleneck_lib.param_specs(
      d_model=d_model,
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=head_dim,
      v_head_dim=v_head_dim,
      num_modalities=int(options["mbt_modalities"]),
    )
    self._declare_params(rngs, specs)

  def __call__(self, x_BTD, *, positions_BT=None, segment_ids_BT=None):
    if segment_ids_BT is not None:
      raise ValueError("mbt_bottleneck does not take packed batches (segment ids)")
    return bottleneck_lib.mbt_bottleneck(
      self.param_tree(),
      x_BTD,
      causal=False,
      implementation=self.implementation,
      positions_BT=positions_BT,
      num_fusion=self.num_fusion,
      modality_lengths=self.lengths,
      fuse=self.fuse,
    )
