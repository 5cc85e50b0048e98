"""The cross-head interaction layer of the stacks (catalog family (c)): owns the projections
and calls ``attn_jax.attention.cross_head`` for the registry ids ``talking_heads``,
``knocking_heads``, ``dcmha``, ``mta`` and ``chai``.

Dimension key: B batch, T length, D model dim, N query heads, H head dim, Hv value head dim.

Constructor arguments follow ``attn_jax.nn.attention.Attention`` (``num_kv_heads`` None: N).

Options (``options=``; -1 takes the default):
  * ``knocking_axis``: "heads" (default) or "features" (knocking_heads);
  * ``dcmha_rank``: rank R of DCMHA's dynamic terms (default -1: 2);
  * ``mta_query_taps``, ``mta_key_taps``, ``mta_head_group``: MTA's convolution taps and
    head-mixing group size (defaults -1: 6, 11, 2); ``mta_head_mix``: "post" or "pre";
  * ``chai_clusters``: CHAI's representative of each head as a comma string ("" = singleton
    clusters, i.e. MHA), e.g. "0,0,2,2";
  * ``query_chunk``: query rows per chunk of the memory-lean path of talking_heads, dcmha and
    mta (default 256).
Each kind reads only its own keys; the generic keys ``window``, ``chunk``, ``prefix``,
``softcap`` of the stacks' options dict are declared (so the stack's option check accepts
them) and ignored.

Positions: "rope" rotates the per-head q and k (``rope_base``, ``rotary_dim``) at
``positions_BT``; "learned" and "none" leave them alone. ``qk_norm`` is refused.
"""

from attn_jax.attention import cross_head as cross_head_lib
from attn_jax.nn import attention as attention_lib
from attn_jax.nn import projected

KINDS = cross_head_lib.KINDS
POSITIONS = ("rope", "learned", "none")
DEFAULT_OPTIONS = {
  **attention_lib.DEFAULT_OPTIONS,
  "knocking_axis": "heads",
  "dcmha_rank": -1,
  "mta_query_taps": -1,
  "mta_key_taps": -1,
  "mta_head_group": -1,
  "mta_head_mix": "post",
  "chai_clusters": "",
  "query_chunk": cross_head_lib.DEFAULT_QUERY_CHUNK,
}
_INIT_OPTIONS = {
  "knocking_heads": ("knocking_axis",),
  "dcmha": ("dcmha_rank",),
  "mta": ("mta_query_taps", "mta_key_taps", "mta_head_group"),
}
_CALL_OPTIONS = {
  "talking_heads": ("query_chunk",),
  "dcmha": ("query_chunk",),
  "mta": ("query_chunk", "mta_head_mix"),
  "chai": ("chai_clusters",),
}


class CrossHeadAttention(projected.ProjectedAttention):
  """Attention whose heads interact, chosen by a family-(c) registry id.

  Args:
    d_model: model width D.
    num_heads: query heads N.
    num_kv_heads: kv heads K (None: N).
    head_dim, v_head_dim: H and Hv (defaults D // N and H).
    kind: one of ``KINDS``.
    causal: causal (decoder) or bidirectional (encoder).
    positions: "rope", "learned" or "none".
    rope_base, rotary_dim: RoPE settings when ``positions == "rope"``.
    qk_norm: must be False.
    options: see ``DEFAULT_OPTIONS`` and the module doc.
    implementation: passed to the layer function (None: its default).
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
    kind: str = "talking_heads",
    causal: bool = True,
    positions: str = "rope",
    rope_base: float = 10000.0,
    rotary_dim: int | None = None,
    qk_norm: bool = False,
    options: dict | None = None,
    implementation: str | None = None,
    rngs,
  ):
    projected.check_kind("CrossHeadAttention", kind, KINDS, positions, POSITIONS)
    if qk_norm:
      raise ValueError(f"attention kind {kind!r} does not take qk_norm=True; use qk_norm=False")
    options = projected.merge_options(kind, options, DEFAULT_OPTIONS)
    specs = cross_head_lib.param_specs(
      kind,
      d_model=d_model,
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=head_dim,
      v_head_dim=v_head_dim,
      **{k: options[k] for k in _INIT_OPTIONS.get(kind, ())},
    )
    self.call_options = {k: options[k] for k in _CALL_OPTIONS.get(kind, ())}
    if kind == "chai":  # a bad cluster string fails at construction
      cross_head_lib.check_clusters(options["chai_clusters"], num_heads)
    if kind == "mta" and options["mta_head_mix"] not in cross_head_lib.MTA_MIX_AT:
      raise ValueError(
        f"mta_head_mix must be one of {cross_head_lib.MTA_MIX_AT}; got {options['mta_head_mix']!r}"
      )
    self.kind, self.causal, self.implementation = kind, causal, implementation
    self._declare_params(rngs, specs)
    H = specs["w_k"][0][-1]
    self.rope = projected.rope_settings(positions, rope_base, rotary_dim, H)

  def __call__(self, x_BTD, *, positions_BT=None, segment_ids_BT=None):
    """Attention over ``x [B, T, D]``.

    Args:
      positions_BT: token positions for RoPE (default ``arange(T)``).
      segment_ids_BT: packed-document ids; tokens attend only within their document.
    """
    fn = getattr(cross_head_lib, self.kind)
    return fn(
      self.param_tree(),
      x_BTD,
      causal=self.causal,
      implementation=self.implementation,
      mask=projected.segment_mask(segment_ids_BT),
      positions_BT=positions_BT,
      rope=self.rope,
      **self.call_options,
    )
