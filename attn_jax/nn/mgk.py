"""The mixture-of-Gaussian-keys layer of the stacks (registry id ``mgk``): owns the
projections, the per-position key priors and the widths; calls
``attn_jax.attention.mgk.mgk`` (one attention call per key component, merged exactly).

Options: ``mgk_keys`` (M keys per position, default 2). The generic keys ``window``,
``chunk``, ``prefix``, ``softcap`` are declared and ignored. Positions: "rope" rotates q and
every key; "learned" and "none" leave them alone.
"""

from attn_jax.attention import mgk as mgk_lib
from attn_jax.nn import attention as attention_lib
from attn_jax.nn import projected

KINDS = ("mgk",)
POSITIONS = ("rope", "learned", "none")
DEFAULT_OPTIONS = {**attention_lib.DEFAULT_OPTIONS, "mgk_keys": 2}


class MGKAttention(projected.ProjectedAttention):
  """Mixture-of-Gaussian-keys attention; constructor arguments as
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
    kind: str = "mgk",
    causal: bool = True,
    positions: str = "rope",
    rope_base: float = 10000.0,
    rotary_dim: int | None = None,
    qk_norm: bool = False,
    options: dict | None = None,
    implementation: str | None = None,
    rngs,
  ):
    projected.check_kind("MGKAttention", kind, KINDS, positions, POSITIONS)
    if qk_norm:
      raise ValueError("attention kind 'mgk' does not take qk_norm=True; use qk_norm=False")
    options = projected.merge_options(kind, options, DEFAULT_OPTIONS)
    specs = mgk_lib.param_specs(
      d_model=d_model,
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=head_dim,
      v_head_dim=v_head_dim,
      mgk_keys=int(options["mgk_keys"]),
    )
    self.causal, self.implementation = causal, implementation
    self._declare_params(rngs, specs)
    self.rope = projected.rope_settings(positions, rope_base, rotary_dim, specs["w_k"][0][-1])

  def __call__(self, x_BTD, *, positions_BT=None, segment_ids_BT=None):
    return mgk_lib.mgk(
      self.param_tree(),
      x_BTD,
      causal=self.causal,
      implementation=self.implementation,
      mask=projected.segment_mask(segment_ids_BT),
      positions_BT=positions_BT,
      rope=self.rope,
    )
