"""The head-routing layers of the stacks besides MoH (registry ids ``moa``, ``mae_h1``): own the
projections and the gate and call ``attn_jax.attention.head_routing``.

``MoAAttention`` (``moa``): ``num_heads`` is the number of experts E (``num_kv_heads`` must be
None or 1: the experts share one kv head). Under ``nnx.capture`` it sows ``load_balance +
moa_z_loss_weight · z_loss`` as ``nnx.Intermediate`` "aux_loss" (the trainer adds it times
``config.aux_loss_weight``). Options: ``moa_top_k`` (experts per token, -1: E // 2),
``moa_z_loss_weight`` (default 0.1, i.e. the z-loss at a tenth of the load-balance weight).

``MAEAttention`` (``mae_h1``): N heads (``num_kv_heads`` None: N), no auxiliary loss, no
options of its own.

The generic keys ``window``, ``chunk``, ``prefix``, ``softcap`` are declared and ignored.
Positions: "rope" rotates q and k; "learned" and "none" leave them alone.
"""

from attn_jax.attention import head_routing as routing_lib
from attn_jax.nn import attention as attention_lib
from attn_jax.nn import projected

POSITIONS = ("rope", "learned", "none")
MOA_OPTIONS = {**attention_lib.DEFAULT_OPTIONS, "moa_top_k": -1, "moa_z_loss_weight": 0.1}


class _RoutedHeads(projected.ProjectedAttention):
  KIND = ""
  DEFAULT_OPTIONS = attention_lib.DEFAULT_OPTIONS

  def __init__(
    self,
    *,
    d_model: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    v_head_dim: int | None = None,
    kind: str,
    causal: bool = True,
    positions: str = "rope",
    rope_base: float = 10000.0,
    rotary_dim: int | None = None,
    qk_norm: bool = False,
    options: dict | None = None,
    implementation: str | None = None,
    rngs,
  ):
    projected.check_kind(type(self).__name__, kind, (self.KIND,), positions, POSITIONS)
    if qk_norm:
      raise ValueError(f"attention kind {kind!r} does not take qk_norm=True; use qk_norm=False")
    self.options = projected.merge_options(kind, options, self.DEFAULT_OPTIONS)
    specs = routing_lib.param_specs(
      kind,
      d_model=d_model,
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=head_dim,
      v_head_dim=v_head_dim,
    )
    self.causal, self.implementation = causal, implementation
    self._declare_params(rngs, specs)
    self.rope = projected.rope_settings(positions, rope_base, rotary_dim, specs["w_k"][0][-1])

  def _call_kwargs(self, positions_BT, segment_ids_BT) -> dict:
    return dict(
      causal=self.causal,
      implementation=self.implementation,
      mask=projected.segment_mask(segment_ids_BT),
      positions_BT=positions_BT,
      rope=self.rope,
    )


class MoAAttention(_RoutedHeads):
  """Mixture of attention heads; constructor arguments as ``attn_jax.nn.attention.Attention``
  (``num_heads`` = experts E)."""

  KIND = "moa"
  DEFAULT_OPTIONS = MOA_OPTIONS

  def __init__(self, *, kind: str = "moa", **kwargs):
    super().__init__(kind=kind, **kwargs)
    E = self.w_q[...].shape[1]
    top_k = self.options["moa_top_k"]
    self.top_k = None if top_k == -1 else int(top_k)
    if self.top_k is not None and not 1 <= self.top_k <= E:
      raise ValueError(f"moa_top_k must be in [1, {E}] (the experts); got {self.top_k}")
    self.z_weight = float(self.options["moa_z_loss_weight"])
    if self.z_weight < 0:
      raise ValueError(f"moa_z_loss_weight must be >= 0; got {self.z_weight}")

  def __call__(self, x_BTD, *, positions_BT=None, segment_ids_BT=None):
    y, aux = routing_lib.moa(
      self.param_tree(),
      x_BTD,
      return_aux=True,
      moa_top_k=self.top_k,
      **self._call_kwargs(positions_BT, segment_ids_BT),
    )
    projected.sow_aux_loss(self, aux["load_balance"] + self.z_weight * aux["z_loss"])
    return y


class MAEAttention(_RoutedHeads):
  """Mixture of the N leave-one-head-out experts; constructor arguments as
  ``attn_jax.nn.attention.Attention``."""

  KIND = "mae_h1"

  def __init__(self, *, kind: str = "mae_h1", **kwargs):
    super().__init__(kind=kind, **kwargs)

  def __call__(self, x_BTD, *, positions_BT=None, segment_ids_BT=None):
    return routing_lib.mae_h1(
      self.param_tree(), x_BTD, **self._call_kwargs(positions_BT, segment_ids_BT)
    )
