"""The mixture-of-head attention layer of the stacks (registry id ``moh``): owns the
projections and gates and calls ``attn_jax.attention.moh``; under ``nnx.capture`` it sows the
load-balance loss as ``nnx.Intermediate`` "aux_loss" (the trainer adds it times
``config.aux_loss_weight``).

Options (``options=``; -1 takes the default): ``moh_shared_heads`` (always-on heads, default
max(1, N // 4)), ``moh_top_k`` (routed heads kept per token, default half the routed heads).
The generic keys ``window``, ``chunk``, ``prefix``, ``softcap`` are declared and ignored.
Positions: "rope" rotates q and k; "learned" and "none" leave them alone.
"""

from attn_jax.attention import moh as moh_lib
from attn_jax.nn import attention as attention_lib
from attn_jax.nn import projected

KINDS = ("moh",)
POSITIONS = ("rope", "learned", "none")
DEFAULT_OPTIONS = {**attention_lib.DEFAULT_OPTIONS, "moh_shared_heads": -1, "moh_top_k": -1}


class MoHAttention(projected.ProjectedAttention):
  """Mixture-of-head attention; constructor arguments as ``attn_jax.nn.attention.Attention``
  (``num_kv_heads`` None: N)."""

  DEFAULT_OPTIONS = DEFAULT_OPTIONS

  def __init__(
    self,
    *,
    d_model: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    v_head_dim: int | None = None,
    kind: str = "moh",
    causal: bool = True,
    positions: str = "rope",
    rope_base: float = 10000.0,
    rotary_dim: int | None = None,
    qk_norm: bool = False,
    options: dict | None = None,
    implementation: str | None = None,
    rngs,
  ):
    projected.check_kind("MoHAttention", kind, KINDS, positions, POSITIONS)
    if qk_norm:
      raise ValueError("attention kind 'moh' does not take qk_norm=True; use qk_norm=False")
    options = projected.merge_options(kind, options, DEFAULT_OPTIONS)
    specs = moh_lib.param_specs(
      d_model=d_model,
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=head_dim,
      v_head_dim=v_head_dim,
      moh_shared_heads=options["moh_shared_heads"],
    )
    Nr = specs["w_routed"][0][1]
    self.top_k = None if options["moh_top_k"] == -1 else int(options["moh_top_k"])
    if self.top_k is not None and not 1 <= self.top_k <= Nr:
      raise ValueError(f"moh_top_k must be in [1, {Nr}] (the routed heads); got {self.top_k}")
    self.causal, self.implementation = causal, implementation
    self._declare_params(rngs, specs)
    H = specs["w_k"][0][-1]
    self.rope = projected.rope_settings(positions, rope_base, rotary_dim, H)

  def __call__(self, x_BTD, *, positions_BT=None, segment_ids_BT=None):
    y, aux = moh_lib.moh(
      self.param_tree(),
      x_BTD,
      causal=self.causal,
      implementation=self.implementation,
      mask=projected.segment_mask(segment_ids_BT),
      positions_BT=positions_BT,
      rope=self.rope,
      return_aux=True,
      moh_top_k=self.top_k,
    )
    projected.sow_aux_loss(self, aux["load_balance"])
    return y
