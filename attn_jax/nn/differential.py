"""The differential attention layer of the stacks (registry ids ``diff_attn``,
``grouped_diff_attn``): owns the projections, the λ vectors and the per-head RMSNorm and
calls ``attn_jax.attention.differential``. ``grouped_diff_attn`` reads the option
``gdiff_ratio`` (signal heads per noise head; -1: 4, 3, 2 or 1, the largest dividing N) and
takes no ``num_kv_heads``.

``head_dim`` is the full head width 2h of an N-head MHA it replaces (default D // N): each
query/key half has h = head_dim // 2 and the value 2h, so the projections match the MHA's
widths. ``layer_index`` (1-based, set by the stack) picks λ_init = 0.8 − 0.6 exp(−0.3 (l − 1)).
The generic option keys ``window``, ``chunk``, ``prefix``, ``softcap`` are declared and
ignored. Positions: "rope" rotates each half; "learned" and "none" leave them alone.
"""

from flax import nnx

from attn_jax.attention import differential as diff_lib
from attn_jax.nn import attention as attention_lib
from attn_jax.nn import projected

KINDS = ("diff_attn", "grouped_diff_attn")
DEFAULT_OPTIONS = {**attention_lib.DEFAULT_OPTIONS, "gdiff_ratio": -1}
POSITIONS = ("rope", "learned", "none")


class DiffAttention(projected.ProjectedAttention):
  """Differential attention; constructor arguments as ``attn_jax.nn.attention.Attention``
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
    kind: str = "diff_attn",
    causal: bool = True,
    positions: str = "rope",
    rope_base: float = 10000.0,
    rotary_dim: int | None = None,
    qk_norm: bool = False,
    options: dict | None = None,
    implementation: str | None = None,
    layer_index: int = 1,
    rngs,
  ):
    projected.check_kind("DiffAttention", kind, KINDS, positions, POSITIONS)
    if qk_norm:
      raise ValueError(f"attention kind {kind!r} does not take qk_norm=True; use qk_norm=False")
    options = projected.merge_options(kind, options, self.DEFAULT_OPTIONS)
    width = d_model // num_heads if head_dim is None else head_dim
    if v_head_dim not in (None, width):
      raise ValueError(
        f"diff_attn's value width is the head width {width}; got v_head_dim={v_head_dim}"
      )
    if width < 2 or width % 2:
      raise ValueError(f"diff_attn needs an even head width >= 2 (two halves); got {width}")
    diff_lib.lambda_init(layer_index)  # validates
    if kind == "diff_attn":
      specs = diff_lib.param_specs(
        d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=width // 2
      )
    else:  # the stack's num_kv_heads (= N by default) has no meaning here: ratio instead
      if num_kv_heads not in (None, num_heads):
        raise ValueError(
          "grouped_diff_attn sets its noise heads with the option gdiff_ratio, not "
          f"num_kv_heads; got num_kv_heads={num_kv_heads}"
        )
      specs = diff_lib.grouped_param_specs(
        d_model=d_model,
        num_heads=num_heads,
        head_dim=width // 2,
        gdiff_ratio=int(options["gdiff_ratio"]),
      )
    self.kind = kind
    self.causal, self.implementation, self.layer_index = causal, implementation, layer_index
    self._declare_params(rngs, specs)
    self.rope = projected.rope_settings(positions, rope_base, rotary_dim, width // 2)

  def __call__(self, x_BTD, *, positions_BT=None, segment_ids_BT=None, capture: bool = False):
    """``capture=True`` (diff_attn only) also sows the differential map ``A_1 − λ A_2``
    ``[B, N, T, T]`` as ``nnx.Intermediate`` "probs" (read with ``nnx.capture``)."""
    fn = diff_lib.diff_attn if self.kind == "diff_attn" else diff_lib.grouped_diff_attn
    if capture:
      if self.kind != "diff_attn":
        raise NotImplementedError(f"capture=True is not built for attention kind {self.kind!r}")
      probs = diff_lib.diff_attn_probs(
        self.param_tree(),
        x_BTD,
        causal=self.causal,
        mask=projected.segment_mask(segment_ids_BT),
        positions_BT=positions_BT,
        rope=self.rope,
        layer_index=self.layer_index,
      )
      self.sow(nnx.Intermediate, "probs", probs)
    return fn(
      self.param_tree(),
      x_BTD,
      causal=self.causal,
      implementation=self.implementation,
      mask=projected.segment_mask(segment_ids_BT),
      positions_BT=positions_BT,
      rope=self.rope,
      layer_index=self.layer_index,
    )
