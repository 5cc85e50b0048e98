"""The multi-head latent attention layer (MLA, DeepSeek-V2) of the stacks: owns the
projections and calls ``attn_jax.attention.mla`` in the expanded (``kind="mla"``) or the
absorbed (``kind="mla_absorbed"``) form. Both kinds have the same parameters and outputs.

Dimension key: B batch, T length, D model dim, N heads, H = P + R q/k head dim, V value head
dim (see ``attn_jax.attention.mla`` for C, Q, P, R).

Options (``options=``; -1 derives the size from ``head_dim`` = d_h, DeepSeek-V2's ratios):
  * ``kv_lora_rank`` d_c, the cached latent (default -1: 4·d_h);
  * ``q_lora_rank`` d_c' of low-rank queries (default 0: full-rank queries);
  * ``qk_nope_head_dim`` P, the non-rotary q/k head dim (default -1: d_h);
  * ``qk_rope_head_dim`` R = d_R, the decoupled rotary dim (default -1: d_h/2, even; 0: MLA
    without any positional encoding of its own);
  * ``v_head_dim`` V (default -1: the ``v_head_dim`` argument, else d_h).
The generic keys ``window``, ``chunk``, ``prefix``, ``softcap`` of the stacks' options dict are
declared (so configs and the stack's option check accept them) and ignored.

Positions: the decoupled rotary dims are always rotated (base ``rope_base``, the first
``rotary_dim`` of the R dims, all when None) at ``positions_BT``, whatever ``positions`` the
model uses ("rope", "learned" and "none" are all accepted: "learned" embeddings live in the
model's embedding and add to, rather than replace, MLA's rotary key). ``qk_norm`` is refused:
normalising the per-head keys would break the absorbed form.
"""

from flax import nnx

from attn_jax.attention import mla as mla_lib
from attn_jax.nn import attention as attention_lib
from attn_jax.nn import layers, projected

KINDS = ("mla", "mla_absorbed")
POSITIONS = ("rope", "learned", "none")
# The generic keys every stack's options dict carries (window, chunk, prefix, softcap) are
# declared, so a stack's option check accepts them, and ignored.
DEFAULT_OPTIONS = {
  **attention_lib.DEFAULT_OPTIONS,
  "kv_lora_rank": -1,
  "q_lora_rank": 0,
  "qk_nope_head_dim": -1,
  "qk_rope_head_dim": -1,
  "v_head_dim": -1,
}
MLA_OPTIONS = tuple(k for k in DEFAULT_OPTIONS if k not in attention_lib.DEFAULT_OPTIONS)


class MLAAttention(projected.ProjectedAttention):
  """Multi-head latent attention selected by the registry ids ``mla`` / ``mla_absorbed``.

  Args:
    d_model: model width D.
    num_heads: heads N.
    num_kv_heads: ignored (keys and values come from one shared latent); must divide N.
    head_dim: d_h (default D // N), from which the option defaults are derived.
    v_head_dim: value head dim when the ``v_head_dim`` option is -1 (default d_h).
    kind: "mla" (expanded per-head K/V) or "mla_absorbed" (one MQA call over the latent).
    causal: causal (decoder) or bidirectional (encoder).
    positions: "rope", "learned" or "none" (see the module doc).
    rope_base, rotary_dim: RoPE of the decoupled dims (rotary_dim <= R; None: all R).
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
    kind: str = "mla",
    causal: bool = True,
    positions: str = "rope",
    rope_base: float = 10000.0,
    rotary_dim: int | None = None,
    qk_norm: bool = False,
    options: dict | None = None,
    implementation: str | None = None,
    rngs: nnx.Rngs,
  ):
    projected.check_kind("MLAAttention", kind, KINDS, positions, POSITIONS)
    if qk_norm:
      raise ValueError(
        f"attention kind {kind!r} does not take qk_norm=True: normalising per-head keys "
        "W_UK,n·c breaks the absorbed form; use qk_norm=False"
      )
    if num_kv_heads is not None and (num_kv_heads < 1 or num_heads % num_kv_heads):
      raise ValueError(
        f"num_heads={num_heads} must be a positive multiple of num_kv_heads={num_kv_heads}"
      )
    options = projected.merge_options(kind, options, DEFAULT_OPTIONS)
    opts = {k: options[k] for k in MLA_OPTIONS}
    if opts["v_head_dim"] == -1 and v_head_dim is not None:
      opts["v_head_dim"] = v_head_dim
    self.dims = mla_lib.resolve_dims(
      d_model=d_model, num_heads=num_heads, head_dim=head_dim, **opts
    )
    self.rope = {"base": rope_base, "rotary_dim": rotary_dim}
    mla_lib.resolve_rope(self.rope, self.dims.R)  # a bad rotary_dim fails at construction
    self.kind, self.causal, self.implementation = kind, causal, implementation
    specs = mla_lib.param_specs(self.dims)
    self._declare_params(
      rngs,
      {n: (shape, layers.fan_in_init(fan_in), axes) for n, (shape, fan_in, axes) in specs.items()},
    )

  def __call__(self, x_BTD, *, positions_BT=None, segment_ids_BT=None, capture: bool = False):
    """Attention over ``x [B, T, D]``.

    Args:
      positions_BT: token positions for the decoupled RoPE (default ``arange(T)``).
      segment_ids_BT: packed-document ids; tokens attend only within their document.
      capture: sow the probabilities ``[B, N, T, T]`` and per-head outputs ``[B, T, N, V]``
        as ``nnx.Intermediate`` (computed by the reference path in the expanded form, which
        the absorbed form equals).
    """
    params = self.param_tree()
    mask = projected.segment_mask(segment_ids_BT)
    if capture:
      return self._captured(params, x_BTD, positions_BT, mask)
    fn = mla_lib.mla_absorbed if self.kind == "mla_absorbed" else mla_lib.mla
    return fn(
      params,
      x_BTD,
      causal=self.causal,
      implementation=self.implementation,
      mask=mask,
      positions_BT=positions_BT,
      rope=self.rope,
    )

  def _captured(self, params, x_BTD, positions_BT, mask):
    q_BTNH, k_BTNH, v_BTNV = mla_lib.mla_expanded_qkv(params, x_BTD, positions_BT, rope=self.rope)
    out_BTNV = self._sow_reference(
      q_BTNH, k_BTNH, v_BTNV, mask, causal=self.causal, scale=self.dims.scale
    )
    return mla_lib.output_projection(params, out_BTNV)
