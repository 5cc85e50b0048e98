"""The adaptively sparse attention layer of the stacks (registry id ``entmax``): GQA
projections with α-entmax rows and a learned α per head; calls
``attn_jax.attention.entmax.entmax_layer`` (materialised rows: the reference path only).

The generic option keys ``window``, ``chunk``, ``prefix``, ``softcap`` are declared and
ignored. Positions: "rope" rotates q and k; "learned" and "none" leave them alone.
"""

from attn_jax.attention import entmax as entmax_lib
from attn_jax.nn import attention as attention_lib
from attn_jax.nn import projected

KINDS = ("entmax",)
POSITIONS = ("rope", "learned", "none")


class EntmaxAttention(projected.ProjectedAttention):
  """α-entmax attention; constructor arguments as ``attn_jax.nn.attention.Attention``."""

  DEFAULT_OPTIONS = attention_lib.DEFAULT_OPTIONS

  def __init__(
    self,
    *,
    d_model: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    v_head_dim: int | None = None,
    kind: str = "entmax",
    causal: bool = True,
    positions: str = "rope",
    rope_base: float = 10000.0,
    rotary_dim: int | None = None,
    qk_norm: bool = False,
    options: dict | None = None,
    implementation: str | None = None,
    rngs,
  ):
    projected.check_kind("EntmaxAttention", kind, KINDS, positions, POSITIONS)
    if qk_norm:
      raise ValueError("attention kind 'entmax' does not take qk_norm=True; use qk_norm=False")
    projected.merge_options(kind, options, self.DEFAULT_OPTIONS)
    if implementation not in (None, "auto", "reference"):
      raise NotImplementedError(
        f"entmax runs on the materialised 'reference' path only; got implementation="
        f"{implementation!r}"
      )
    specs = entmax_lib.param_specs(
      d_model=d_model,
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=head_dim,
      v_head_dim=v_head_dim,
    )
    self.causal = causal
    self._declare_params(rngs, specs)
    self.rope = projected.rope_settings(positions, rope_base, rotary_dim, specs["w_k"][0][-1])

  def __call__(self, x_BTD, *, positions_BT=None, segment_ids_BT=None):
    return entmax_lib.entmax_layer(
      self.param_tree(),
      x_BTD,
      causal=self.causal,
      mask=projected.segment_mask(segment_ids_BT),
      positions_BT=positions_BT,
      rope=self.rope,
    )
