"""The head-structure attention layer of the stacks (catalog family (b) except MLA): owns the
projections and calls ``attn_jax.attention.heads`` for the registry ids ``mqa``, ``gqa``,
``kdgqa``, ``head_dims``, ``mhe``, ``dha`` and ``sigma_diffqkv``.

Dimension key: B batch, T length, D model dim, N query heads, H head dim, Hv value head dim.

Constructor arguments follow ``attn_jax.nn.attention.Attention``: ``num_kv_heads`` is the kv
(key) head count of gqa / kdgqa / head_dims / dha and the value head count of sigma_diffqkv,
and is ignored by mqa (K = 1) and mhe (one shared head); None takes the defaults of
``attn_jax.attention.heads.param_specs``. ``head_dim`` / ``v_head_dim`` are H / Hv.

Options (``options=``; -1 takes the default):
  * ``mhe_variant``: "additive" (default) or "multiplicative" (mhe);
  * ``dha_value_heads``: value heads of dha (default -1: N);
  * ``sigma_key_heads``: key heads of sigma_diffqkv (default -1: half the value heads when
    that is even);
  * ``sigma_key_head_dim``: key head dim of sigma_diffqkv (default -1: 2·max(1, H // 4));
  * ``sigma_q_aug_dim``: sigma_diffqkv's augmented query dim A (default 0: no augmentation).
Each kind reads only its own keys. The generic keys ``window``, ``chunk``, ``prefix``,
``softcap`` of the stacks' options dict are declared (so the stack's option check accepts
them) and ignored.

Positions: "rope" rotates the per-head q and k (``rope_base``, ``rotary_dim``) at
``positions_BT``; "learned" and "none" leave them alone. ``qk_norm`` is refused. ``kdgqa`` is
bidirectional only (its key-norm assignment sees the whole sequence).
"""

from flax import nnx

from attn_jax.attention import heads as heads_lib
from attn_jax.nn import attention as attention_lib
from attn_jax.nn import projected

KINDS = heads_lib.KINDS
POSITIONS = ("rope", "learned", "none")
DEFAULT_OPTIONS = {
  **attention_lib.DEFAULT_OPTIONS,
  "mhe_variant": "additive",
  "dha_value_heads": -1,
  "sigma_key_heads": -1,
  "sigma_key_head_dim": -1,
  "sigma_q_aug_dim": 0,
}
_KIND_OPTIONS = {
  "mhe": ("mhe_variant",),
  "dha": ("dha_value_heads",),
  "sigma_diffqkv": ("sigma_key_heads", "sigma_key_head_dim", "sigma_q_aug_dim"),
}


class HeadStructureAttention(projected.ProjectedAttention):
  """Attention whose head structure is chosen by a family-(b) registry id.

  Args:
    d_model: model width D.
    num_heads: query heads N.
    num_kv_heads: see the module doc (None: the kind's default).
    head_dim, v_head_dim: H and Hv (defaults D // N and H).
    kind: one of ``KINDS``.
    causal: causal (decoder) or bidirectional (encoder).
    positions: "rope", "learned" or "none" (see the module doc).
    rope_base, rotary_dim: RoPE settings when ``positions == "rope"``.
    qk_norm: must be False.
    options: see ``DEFAULT_OPTIONS`` and the module doc.
    implementation: passed to ``dot_product_attention`` (None: best for the backend).
  """

  DEFAULT_OPTIONS = DEFAULT_OPTIONS

  def __init__(
    self,
    *,
    d_model: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    v_head_dim: int | None = None,
    kind: str = "gqa",
    causal: bool = True,
    positions: str = "rope",
    rope_base: float = 10000.0,
    rotary_dim: int | None = None,
    qk_norm: bool = False,
    options: dict | None = None,
    implementation: str | None = None,
    rngs: nnx.Rngs,
  ):
    projected.check_kind("HeadStructureAttention", kind, KINDS, positions, POSITIONS)
    if qk_norm:
      raise ValueError(f"attention kind {kind!r} does not take qk_norm=True; use qk_norm=False")
    if kind == "kdgqa" and causal:
      raise ValueError(
        "attention kind 'kdgqa' is bidirectional only (its per-sequence key-norm head "
        "assignment would leak later tokens); use causal=False (an encoder)"
      )
    options = projected.merge_options(kind, options, DEFAULT_OPTIONS)
    opts = {k: options[k] for k in _KIND_OPTIONS.get(kind, ())}
    specs = heads_lib.param_specs(
      kind,
      d_model=d_model,
      num_heads=num_heads,
      num_kv_heads=None if kind in ("mqa", "mhe") else num_kv_heads,
      head_dim=head_dim,
      v_head_dim=v_head_dim,
      **opts,
    )
    self.kind, self.causal, self.implementation = kind, causal, implementation
    self.mhe_variant = opts.get("mhe_variant", "additive")
    self._declare_params(rngs, specs)
    H = specs["w_k"][0][-1]
    self.rope = projected.rope_settings(positions, rope_base, rotary_dim, H)

  def _kwargs(self):
    return {"mhe_variant": self.mhe_variant} if self.kind == "mhe" else {}

  def __call__(self, x_BTD, *, positions_BT=None, segment_ids_BT=None, capture: bool = False):
    """Attention over ``x [B, T, D]``.

    Args:
      positions_BT: token positions for RoPE (default ``arange(T)``).
      segment_ids_BT: packed-document ids; tokens attend only within their document.
      capture: sow the probabilities ``[B, N, T, T]`` and per-head outputs ``[B, T, N, Hv]``
        as ``nnx.Intermediate`` (computed by the reference path on the per-head q/k/v).
    """
    params = self.param_tree()
    mask = projected.segment_mask(segment_ids_BT)
    if capture:
      return self._captured(params, x_BTD, positions_BT, mask)
    fn = getattr(heads_lib, self.kind)
    return fn(
      params,
      x_BTD,
      causal=self.causal,
      implementation=self.implementation,
      mask=mask,
      positions_BT=positions_BT,
      rope=self.rope,
      **self._kwargs(),
    )

  def _captured(self, params, x_BTD, positions_BT, mask):
    q_BTNH, k_BTNH, v_BTNV = heads_lib.per_head_qkv(
      self.kind, params, x_BTD, positions_BT=positions_BT, rope=self.rope, **self._kwargs()
    )
    out_BTNV = self._sow_reference(q_BTNH, k_BTNH, v_BTNV, mask, causal=self.causal)
    return heads_lib.output_projection(params, out_BTNV)
