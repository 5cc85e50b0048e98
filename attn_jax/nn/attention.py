"""The softmax attention layer of the stacks: projections, positions, qk-norm, and the mask,
bias, soft-cap or sinks of its registry id, calling ``attn_jax.attention`` for the attention.

Dimension key: B batch, T length, D model dim, N query heads, K kv heads, H q/k head dim,
Hv value head dim.

``options`` hold the per-mechanism settings a config gives (``window``, ``chunk``,
``prefix``, ``softcap``, ``longheads_top_k``); anything not given takes the default in
``DEFAULT_OPTIONS``. ``longheads`` (training-free chunk selection per head) reads ``chunk`` as
its chunk size; ``qada`` (training-free local/full choice per query and head) reads
``window`` as its recent-key window. ``group_mask`` (token groups with a G×G visibility table)
reads ``group_starts`` (the position where each group begins: "0,8,40" is three groups;
"": one group), ``group_table`` (rows of 0/1, one per query group: "10/11" lets group 1 see
group 0 but not the reverse; "": all true) and ``group_rule`` ("and": the table restricts
causal attention, isolating groups; "or": the table grants visibility beyond causal, e.g.
image tokens seeing a later text prompt); per-token ids passed as ``group_ids_BT`` replace
the position-derived ones.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax import sharding
from attn_jax.attention import api, biases, masks, reference
from attn_jax.attention import biformer as biformer_lib
from attn_jax.attention import coca as coca_lib
from attn_jax.attention import dma as dma_lib
from attn_jax.attention import flexprefill as flex_lib
from attn_jax.attention import landmark as landmark_lib
from attn_jax.attention import longheads as longheads_lib
from attn_jax.attention import moba as moba_lib
from attn_jax.attention import multi_window as mw_lib
from attn_jax.attention import neighborhood as neighborhood_lib
from attn_jax.attention import qada as qada_lib
from attn_jax.attention import rope as rope_lib
from attn_jax.attention import routing as routing_lib
from attn_jax.attention import sharded as sharded_lib
from attn_jax.attention import vmoba as vmoba_lib
from attn_jax.attention import window_2d as w2d_lib
from attn_jax.nn import layers, projected

# Registry ids this module serves; the registry points their ``module`` field here.
KINDS = (
  "mha",
  "causal",
  "sliding_window",
  "sink_window",
  "moba",
  "biformer",
  "flexprefill",
  "vmoba",
  "landmark",
  "window_2d",
  "davit",
  "dma",
  "routing_transformer",
  "gna",
  "mw_mha",
  "chunked_causal",
  "prefix_lm",
  "segment",
  "alibi",
  "softcap",
  "sinks",
  "rope",
  "longheads",
  "qada",
  "cog_attn",
  "coca",
  "periodic_bias",
  "existence_bias",
  "group_mask",
)
CAUSAL_ONLY = (
  "flexprefill",
  "routing_transformer",
  "dma",
  "landmark",
  "sink_window",
  "causal",
  "chunked_causal",
  "prefix_lm",
  "alibi",
  "qada",
  "periodic_bias",
)
NONCAUSAL_ONLY = ("biformer", "vmoba", "window_2d", "davit")
DEFAULT_OPTIONS = {
  "biformer_region": 64,
  "biformer_top_k": 4,
  "biformer_lce_width": 5,
  "flex_block": 64,
  "flex_gamma": 0.9,
  "flex_tau": 0.1,
  "vmoba_grid": "",
  "vmoba_block": "64,1,1",
  "vmoba_tau": 0.5,
  "landmark_block": 50,
  "w2d_grid": "",
  "w2d_mode": "local;global",
  "w2d_window": "7,7",
  "w2d_ratio": "2,2",
  "davit_mode": "spatial;channel",
  "dma_window": 64,
  "routing_clusters": 8,
  "routing_mode": "balanced",
  "routing_window": 0,
  "mw_windows": "",
  "gna_grid": "",
  "gna_stride": 1,
  "gna_dilation": 1,
  "moba_block": 64,
  "moba_top_k": 3,
  "sink_tokens": 4,
  "period": 25,
  "window": 64,
  "chunk": 64,
  "prefix": 0,
  "softcap": 50.0,
  "longheads_top_k": 4,
  "qada_sinks": 4,
  "qada_tau": 0.5,
  "group_starts": "",
  "group_table": "",
  "group_rule": "and",
}
POSITIONS = ("rope", "learned", "none")


def _ints(text) -> tuple[int, ...]:
  """ "7,7" -> (7, 7); "" -> ()."""
  return tuple(int(n) for n in str(text).split(",") if n.strip())


class Attention(nnx.Module):
  """Multi-head attention with MHA/GQA/MQA heads, selected by a registry id.

  Args:
    d_model: model width D.
    num_heads: query heads N.
    num_kv_heads: kv heads K (N % K == 0; K = N is MHA, K = 1 is MQA).
    head_dim: H, independent of d_model. v_head_dim: Hv (default H).
    kind: registry id (one of ``KINDS``).
    causal: causal (decoder) or bidirectional (encoder).
    positions: "rope" rotates q and k here; "learned" and "none" leave them alone
      (learned absolute positions live in the model's embedding). The ``rope`` kind always
      rotates.
    qk_norm: RMS-normalise q and k per head before the logits.
    options: per-mechanism settings (see ``DEFAULT_OPTIONS``).
    implementation: passed to ``dot_product_attention`` (None: best for the backend).
  """

  DEFAULT_OPTIONS = DEFAULT_OPTIONS  # the option keys configs expose for these kinds
  TAKES_LAYER_INDEX = True  # depth-cycled options ("a;b": layer l uses entry (l-1) mod 2)

  def __init__(
    self,
    *,
    d_model: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    v_head_dim: int | None = None,
    kind: str = "mha",
    causal: bool = True,
    positions: str = "rope",
    rope_base: float = 10000.0,
    rotary_dim: int | None = None,
    qk_norm: bool = False,
    options: dict | None = None,
    implementation: str | None = None,
    layer_index: int = 1,
    rngs: nnx.Rngs,
  ):
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    head_dim = d_model // num_heads if head_dim is None else head_dim
    v_head_dim = head_dim if v_head_dim is None else v_head_dim
    if kind not in KINDS:
      raise ValueError(f"Attention serves the registry ids {KINDS}; got kind={kind!r}")
    if kind in CAUSAL_ONLY and not causal:
      raise ValueError(f"attention kind {kind!r} is causal-only; the model is bidirectional")
    if kind in NONCAUSAL_ONLY and causal:
      raise ValueError(f"attention kind {kind!r} is bidirectional-only; the model is causal")
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
      raise ValueError(
        f"num_heads={num_heads} must be a positive multiple of num_kv_heads={num_kv_heads}"
      )
    if positions not in POSITIONS:
      raise ValueError(f"positions must be one of {POSITIONS}; got {positions!r}")
    self.kind, self.causal, self.qk_norm = kind, causal, qk_norm
    self.rope = kind == "rope" or positions == "rope"
    self.rope_base, self.rotary_dim = rope_base, rotary_dim
    self.options = projected.merge_options(kind, options, DEFAULT_OPTIONS)
    self.layer_index = layer_index
    self.implementation = implementation
    self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
    init = layers.fan_in_init(d_model)
    self.wq = layers.param(rngs, init, (d_model, num_heads, head_dim), ("embed", "heads", None))
    self.wk = layers.param(
      rngs, init, (d_model, num_kv_heads, head_dim), ("embed", "kv_heads", None)
    )
    self.wv = layers.param(
      rngs, init, (d_model, num_kv_heads, v_head_dim), ("embed", "kv_heads", None)
    )
    self.wo = layers.param(
      rngs,
      layers.fan_in_init(num_heads * v_head_dim),
      (num_heads, v_head_dim, d_model),
      ("heads", None, "embed"),
    )
    if qk_norm:
      self.q_norm = layers.Norm(head_dim, kind="rmsnorm", rngs=rngs)
      self.k_norm = layers.Norm(head_dim, kind="rmsnorm", rngs=rngs)
    if kind == "sinks":
      self.sinks = layers.param(rngs, jax.nn.initializers.zeros, (num_heads,), ("heads",))
    if kind == "window_2d" and self._cycled("w2d_mode") == "global":
      # GSA's depthwise sub-sampling weights, initialised to the window mean.
      r = math.prod(_ints(self.options["w2d_ratio"]))
      for name, dim in (("gsa_k", head_dim), ("gsa_v", v_head_dim)):
        init_mean = jax.nn.initializers.constant(1.0 / r)
        setattr(
          self,
          name,
          layers.param(rngs, init_mean, (r, num_kv_heads, dim), (None, "kv_heads", None)),
        )
    if kind == "dma":  # δ = A·softplus(v·W): W = 0, A = 1 start as a sliding window of w keys
      self.dma_w = layers.param(
        rngs, jax.nn.initializers.zeros, (num_kv_heads, v_head_dim), ("kv_heads", None)
      )
      self.dma_a = layers.param(rngs, jax.nn.initializers.ones, (num_kv_heads,), ("kv_heads",))
    if kind == "routing_transformer":  # centroids, learned on the k-means loss (aux_loss)
      shape = (num_heads, int(self.options["routing_clusters"]), head_dim)
      self.centroids = layers.param(
        rngs, jax.nn.initializers.normal(1.0), shape, ("heads", None, None)
      )
    if kind == "biformer" and int(self.options["biformer_lce_width"]) > 0:
      # LCE: depthwise conv over V, zero-initialised (the layer starts as pure routing).
      shape = (int(self.options["biformer_lce_width"]), num_kv_heads, v_head_dim)
      self.lce = layers.param(rngs, jax.nn.initializers.zeros, shape, (None, "kv_heads", None))
    if kind == "existence_bias":  # continue logit x·w + b per token; σ(8) ≈ 1 − 3e-4 at init
      self.exist_w = layers.param(rngs, jax.nn.initializers.zeros, (d_model,), ("embed",))
      self.exist_b = layers.param(rngs, jax.nn.initializers.constant(8.0), (1,), (None,))

  def _cycled(self, key: str) -> str:
    """Option ``key``'s entry for this layer: "a;b;c" cycles by depth (layer l: entry l-1)."""
    parts = [p.strip() for p in str(self.options[key]).split(";")]
    return parts[(self.layer_index - 1) % len(parts)]

  def _group_table(self):
    """The ``group_table`` option as a bool [G, G] array (G from ``group_starts``)."""
    starts = _ints(self.options["group_starts"]) or (0,)
    text = str(self.options["group_table"]).strip()
    G = len(starts)
    if not text:
      return jnp.ones((G, G), bool)
    rows = [r.strip() for r in text.split("/")]
    if len(rows) != G or any(len(r) != G or set(r) - {"0", "1"} for r in rows):
      raise ValueError(
        f"group_table must be {G} rows of {G} 0/1 digits separated by '/' (one per group of "
        f"group_starts={self.options['group_starts']!r}); got {text!r}"
      )
    return jnp.asarray([[c == "1" for c in r] for r in rows])

  def _group_mask(self, base, positions_BT, group_ids_BT, batch_length):
    """``base`` combined with the token-group mask of the ``group_*`` options."""
    table = self._group_table()
    if group_ids_BT is None:
      starts = _ints(self.options["group_starts"]) or (0,)
      if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:], strict=False)):
        raise ValueError(
          f"group_starts must start at 0 and increase; got {self.options['group_starts']!r}"
        )
      pos = jnp.arange(batch_length[1]) if positions_BT is None else positions_BT
      group_ids_BT = jnp.searchsorted(jnp.asarray(starts), pos, side="right") - 1
      group_ids_BT = jnp.broadcast_to(group_ids_BT, batch_length).astype(jnp.int32)
    group = masks.GroupMask(group_ids_BT, group_ids_BT, table=table)
    rule = str(self.options["group_rule"])
    if rule not in ("and", "or"):
      raise ValueError(f"group_rule must be 'and' or 'or'; got {rule!r}")
    if base is None:
      return group
    return base & group if rule == "and" else base | group

  def _mask(self, segment_ids_BT, length: int):
    kind, o = self.kind, self.options
    if kind == "sliding_window":
      w = int(o["window"])
      mask = masks.sliding_window(w) if self.causal else masks.LocalMask(w - 1, w - 1)
    elif kind == "gna":  # options window, gna_grid ("": 1-D), gna_stride, gna_dilation
      grid = tuple(int(n) for n in str(o["gna_grid"]).split(",") if n.strip()) or (length,)
      mask = neighborhood_lib.NeighborhoodMask(
        grid, int(o["window"]), int(o["gna_stride"]), int(o["gna_dilation"]), self.causal
      )
    elif kind == "sink_window":  # options "window" and "sink_tokens"
      mask = masks.sink_window(int(o["window"]), int(o["sink_tokens"]))
    elif kind == "chunked_causal":
      mask = masks.ChunkedCausalMask(int(o["chunk"]))
    elif kind == "prefix_lm":
      mask = masks.PrefixLMMask(int(o["prefix"]))
    else:
      mask = masks.CausalMask() if self.causal else None
    if segment_ids_BT is not None:
      seg = masks.SegmentMask(segment_ids_BT, segment_ids_BT)
      mask = seg if mask is None else mask & seg
    return mask

  def __call__(
    self,
    x_BTD,
    *,
    positions_BT=None,
    segment_ids_BT=None,
    group_ids_BT=None,
    capture: bool = False,
  ):
    """Attention over ``x [B, T, D]``.

    Args:
      positions_BT: token positions for RoPE (default ``arange(T)``).
      segment_ids_BT: packed-document ids; tokens attend only within their document (0 is
        padding and attends nowhere).
      group_ids_BT: token-group ids in [0, G) for kind ``group_mask`` (default: from the
        ``group_starts`` option and the positions); refused by the other kinds.
      capture: sow the attention probabilities ``[B, N, T, T]`` and the per-head outputs
        ``[B, T, N, Hv]`` as ``nnx.Intermediate`` (computed by the reference path; off by
        default, and free when off). Collect them with
        ``out, inter = nnx.capture(model, nnx.Intermediate)(x, capture=True)``.
    """
    dtype = x_BTD.dtype
    q_BTNH = jnp.einsum("BTD,DNH->BTNH", x_BTD, self.wq[...].astype(dtype))
    k_BTKH = jnp.einsum("BTD,DKH->BTKH", x_BTD, self.wk[...].astype(dtype))
    v_BTKH = jnp.einsum("BTD,DKH->BTKH", x_BTD, self.wv[...].astype(dtype))
    if self.qk_norm:
      q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
    if self.kind == "coca":  # collinear keys at rotary angles (replaces RoPE)
      pos = jnp.broadcast_to(
        jnp.arange(x_BTD.shape[1]) if positions_BT is None else positions_BT, x_BTD.shape[:2]
      )
      q_BTNH, k_BTKH = coca_lib.coca_qk(q_BTNH, k_BTKH, pos, pos, base=self.rope_base)
    elif self.rope:
      if positions_BT is None:
        positions_BT = jnp.arange(x_BTD.shape[1])
      rope = {"base": self.rope_base, "rotary_dim": self.rotary_dim}
      q_BTNH = rope_lib.apply_rope(q_BTNH, positions_BT, **rope)
      k_BTKH = rope_lib.apply_rope(k_BTKH, positions_BT, **rope)
    q_BTNH = sharding.constrain(q_BTNH, ("batch", "length", "heads", None))
    k_BTKH = sharding.constrain(k_BTKH, ("batch", "length", "kv_heads", None))
    v_BTKH = sharding.constrain(v_BTKH, ("batch", "length", "kv_heads", None))
    if group_ids_BT is not None and self.kind != "group_mask":
      raise ValueError(f"group_ids_BT is read by kind 'group_mask' only; got kind {self.kind!r}")
    if group_ids_BT is not None and jnp.shape(group_ids_BT) != x_BTD.shape[:2]:
      raise ValueError(
        f"group_ids_BT must have shape [B, T] = {list(x_BTD.shape[:2])}; got "
        f"{list(jnp.shape(group_ids_BT))}"
      )
    if self.kind == "group_mask":  # groups combine with causal; documents restrict both
      mask = self._group_mask(
        self._mask(None, x_BTD.shape[1]), positions_BT, group_ids_BT, x_BTD.shape[:2]
      )
      if segment_ids_BT is not None:
        mask = mask & masks.SegmentMask(segment_ids_BT, segment_ids_BT)
      kwargs = {"mask": mask}
    else:
      kwargs = {"mask": self._mask(segment_ids_BT, x_BTD.shape[1])}
    if self.kind == "alibi":
      kwargs["bias"] = biases.AlibiBias.default(self.num_heads)
    if self.kind == "existence_bias":  # log p_j of continue probabilities σ(x_j·w + b)
      logits_BT = x_BTD @ self.exist_w[...].astype(dtype) + self.exist_b[...].astype(dtype)
      kwargs["bias"] = biases.existence_bias(logits_BT, segment_ids_BT).astype(dtype)
    if self.kind == "periodic_bias":  # FaceFormer's −⌊(i − j)/p⌋, in-tile; option "period"
      kwargs["bias"] = biases.PeriodicBias(int(self.options["period"]), self.num_heads)
    if self.kind == "softcap":
      kwargs["softcap"] = float(self.options["softcap"])
    if self.kind == "sinks":
      kwargs["sinks"] = self.sinks[...]
    if self.kind == "cog_attn":  # signed weights sign(s)·exp(|s|)/Σ exp(|s|)
      kwargs["signed"] = True
    if (
      self.kind == "longheads"
    ):  # training-free chunk selection; options "chunk", "longheads_top_k"
      if capture:
        raise NotImplementedError("capture=True is not built for attention kind 'longheads'")
      out_BTNH = longheads_lib.longheads(
        q_BTNH,
        k_BTKH,
        v_BTKH,
        causal=self.causal,
        longheads_chunk=int(self.options["chunk"]),
        longheads_top_k=int(self.options["longheads_top_k"]),
        mask=kwargs["mask"],
        implementation=self.implementation,
      )
    elif self.kind == "mw_mha":  # per-head windows; option mw_windows ("" alternates)
      if capture:
        raise NotImplementedError("capture=True is not built for attention kind 'mw_mha'")
      text = str(self.options["mw_windows"]).strip()
      windows = (
        tuple(int(w) for w in text.split(","))
        if text
        else mw_lib.default_windows(self.num_heads, int(self.options["window"]))
      )
      out_BTNH = mw_lib.mw_mha(
        q_BTNH,
        k_BTKH,
        v_BTKH,
        windows=windows,
        causal=self.causal,
        mask=None if segment_ids_BT is None else masks.SegmentMask(segment_ids_BT, segment_ids_BT),
        implementation=self.implementation,
      )
    elif self.kind == "moba":  # parameter-free block gate; options moba_block, moba_top_k
      if capture:
        raise NotImplementedError("capture=True is not built for attention kind 'moba'")
      out_BTNH = moba_lib.moba(
        q_BTNH,
        k_BTKH,
        v_BTKH,
        moba_block=int(self.options["moba_block"]),
        moba_top_k=int(self.options["moba_top_k"]),
        mask=None if segment_ids_BT is None else masks.SegmentMask(segment_ids_BT, segment_ids_BT),
        implementation=self.implementation,
      )
    elif self.kind == "biformer":  # region routing; options biformer_region/_top_k/_lce_width
      if capture:
        raise NotImplementedError("capture=True is not built for attention kind 'biformer'")
      if segment_ids_BT is not None:
        raise NotImplementedError(
          "attention kind 'biformer' routes whole regions and takes no segment ids (packing)"
        )
      out_BTNH = biformer_lib.biformer(
        q_BTNH,
        k_BTKH,
        v_BTKH,
        biformer_region=int(self.options["biformer_region"]),
        biformer_top_k=int(self.options["biformer_top_k"]),
        lce_weight=self.lce[...] if hasattr(self, "lce") else None,
        implementation=self.implementation,
      )
    elif self.kind == "flexprefill":  # training-free pattern choice; options flex_*
      if capture:
        raise NotImplementedError("capture=True is not built for attention kind 'flexprefill'")
      if segment_ids_BT is not None:
        raise NotImplementedError(
          "attention kind 'flexprefill' selects blocks of one sequence; it takes no segment ids"
        )
      out_BTNH = flex_lib.flexprefill(
        q_BTNH,
        k_BTKH,
        v_BTKH,
        flex_block=int(self.options["flex_block"]),
        flex_gamma=float(self.options["flex_gamma"]),
        flex_tau=float(self.options["flex_tau"]),
        implementation=self.implementation,
      )
    elif self.kind == "vmoba":  # options vmoba_grid ("F,H,W"; "": 1-D), vmoba_block, vmoba_tau
      if capture:
        raise NotImplementedError("capture=True is not built for attention kind 'vmoba'")
      if segment_ids_BT is not None:
        raise NotImplementedError("attention kind 'vmoba' attends one video; no segment ids")
      text = str(self.options["vmoba_grid"]).strip()
      out_BTNH = vmoba_lib.vmoba(
        q_BTNH,
        k_BTKH,
        v_BTKH,
        vmoba_grid=tuple(int(n) for n in text.split(",")) if text else None,
        vmoba_block=_ints(self._cycled("vmoba_block")),
        vmoba_tau=float(self.options["vmoba_tau"]),
        implementation=self.implementation,
      )
    elif self.kind == "landmark":  # every (ℓ+1)-th position is a landmark; option landmark_block
      if capture:
        raise NotImplementedError("capture=True is not built for attention kind 'landmark'")
      if segment_ids_BT is not None:
        raise NotImplementedError("attention kind 'landmark' takes no segment ids (packing)")
      out_BTNH = landmark_lib.landmark_attention(
        q_BTNH,
        k_BTKH,
        v_BTKH,
        landmark_block=int(self.options["landmark_block"]),
        implementation=self.implementation,
      )
    elif self.kind in ("window_2d", "davit"):  # image tokens; options w2d_*, davit_mode
      if capture:
        raise NotImplementedError(f"capture=True is not built for attention kind {self.kind!r}")
      if segment_ids_BT is not None:
        raise NotImplementedError(f"attention kind {self.kind!r} attends one image; no segment ids")
      grid = _ints(self.options["w2d_grid"]) or None
      if self.kind == "davit":
        out_BTNH = w2d_lib.davit(
          q_BTNH,
          k_BTKH,
          v_BTKH,
          davit_mode=self._cycled("davit_mode"),
          davit_grid=grid,
          davit_window=_ints(self.options["w2d_window"]),
          implementation=self.implementation,
        )
      else:
        mode = self._cycled("w2d_mode")
        out_BTNH = w2d_lib.window_2d(
          q_BTNH,
          k_BTKH,
          v_BTKH,
          w2d_grid=grid,
          w2d_mode=mode,
          w2d_window=_ints(self.options["w2d_window"]),
          w2d_ratio=_ints(self.options["w2d_ratio"]),
          gsa_k_weight=self.gsa_k[...] if mode == "global" else None,
          gsa_v_weight=self.gsa_v[...] if mode == "global" else None,
          implementation=self.implementation,
        )
    elif self.kind == "dma":  # value-scored top-w keys per query; option dma_window
      if capture:
        raise NotImplementedError("capture=True is not built for attention kind 'dma'")
      if segment_ids_BT is not None:
        raise NotImplementedError("attention kind 'dma' takes no segment ids (packing)")
      out_BTNH = dma_lib.dma(
        q_BTNH,
        k_BTKH,
        v_BTKH,
        dma_w=self.dma_w[...],
        dma_a=self.dma_a[...],
        dma_window=int(self.options["dma_window"]),
        implementation=self.implementation,
      )
    elif self.kind == "routing_transformer":  # options routing_clusters, _mode, _window
      if capture:
        raise NotImplementedError(
          "capture=True is not built for attention kind 'routing_transformer'"
        )
      if segment_ids_BT is not None:
        raise NotImplementedError("attention kind 'routing_transformer' takes no segment ids")
      centroids = self.centroids[...]
      out_BTNH, routes = routing_lib.routing_attention(
        q_BTNH,
        k_BTKH,
        v_BTKH,
        centroids=centroids,
        routing_mode=str(self.options["routing_mode"]),
        routing_window=int(self.options["routing_window"]),
        return_routes=True,
        implementation="reference" if self.implementation == "reference" else "xla",
      )
      projected.sow_aux_loss(self, routing_lib.kmeans_loss(q_BTNH, k_BTKH, centroids, routes))
    elif self.kind == "qada":  # training-free local/full choice; options window, qada_*
      if capture:
        raise NotImplementedError("capture=True is not built for attention kind 'qada'")
      out_BTNH = qada_lib.qada(
        q_BTNH,
        k_BTKH,
        v_BTKH,
        qada_sinks=int(self.options["qada_sinks"]),
        qada_window=int(self.options["window"]),
        qada_tau=float(self.options["qada_tau"]),
        mask=None if segment_ids_BT is None else masks.SegmentMask(segment_ids_BT, segment_ids_BT),
        implementation=self.implementation,
      )
    elif capture:
      out_BTNH, probs_BNTS = reference.attention_reference(
        q_BTNH, k_BTKH, v_BTKH, return_probs=True, **kwargs
      )
      self.sow(nnx.Intermediate, "probs", probs_BNTS)
      self.sow(nnx.Intermediate, "heads", out_BTNH)
    else:
      out_BTNH = self._attend(q_BTNH, k_BTKH, v_BTKH, kwargs)
    return jnp.einsum("BTNH,NHD->BTD", out_BTNH, self.wo[...].astype(dtype))

  # Kinds whose layer is projections + (RoPE) + causal softmax attention: they decode
  # against a KV cache (``init_cache`` / ``step``; used by ``Transformer.step``).
  DECODE_KINDS = ("mha", "rope")

  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """An empty KV cache for ``step``: keys ``[B, max_len, K, H]``, values ``[.., Hv]``."""
    self._check_decodes()
    K, H = self.wk.shape[1:]
    return {
      "k": jnp.zeros((batch, max_len, K, H), dtype),
      "v": jnp.zeros((batch, max_len, K, self.wv.shape[2]), dtype),
    }

  def _check_decodes(self):
    if self.kind not in self.DECODE_KINDS or not self.causal:
      raise NotImplementedError(
        f"decoding with a cache is built for causal attention kinds {self.DECODE_KINDS}; "
        f"this layer is kind={self.kind!r}, causal={self.causal}"
      )

  def step(self, x_BTD, cache: dict, length):
    """Runs T new tokens (positions ``length .. length + T − 1``) against the cache:
    returns ``(y [B, T, D], cache with their keys and values written)``. Token t sees the
    cached tokens and the new tokens up to itself (equal to the full causal layer)."""
    self._check_decodes()
    dtype = x_BTD.dtype
    T = x_BTD.shape[1]
    q_BTNH = jnp.einsum("BTD,DNH->BTNH", x_BTD, self.wq[...].astype(dtype))
    k_BTKH = jnp.einsum("BTD,DKH->BTKH", x_BTD, self.wk[...].astype(dtype))
    v_BTKH = jnp.einsum("BTD,DKH->BTKH", x_BTD, self.wv[...].astype(dtype))
    if self.qk_norm:
      q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
    pos_T = length + jnp.arange(T)
    if self.rope:
      rope = {"base": self.rope_base, "rotary_dim": self.rotary_dim}
      q_BTNH = rope_lib.apply_rope(q_BTNH, pos_T, **rope)
      k_BTKH = rope_lib.apply_rope(k_BTKH, pos_T, **rope)
    zero = jnp.zeros((), jnp.int32)
    at = (zero, jnp.asarray(length, jnp.int32), zero, zero)
    k_all = jax.lax.dynamic_update_slice(cache["k"], k_BTKH.astype(cache["k"].dtype), at)
    v_all = jax.lax.dynamic_update_slice(cache["v"], v_BTKH.astype(cache["v"].dtype), at)
    G = self.num_heads // self.num_kv_heads
    k_SNH = jnp.repeat(k_all, G, axis=2).astype(dtype)
    v_SNH = jnp.repeat(v_all, G, axis=2).astype(dtype)
    logits = jnp.einsum("BTNH,BSNH->BNTS", q_BTNH, k_SNH) * q_BTNH.shape[-1] ** -0.5
    visible = jnp.arange(k_all.shape[1])[None, :] <= pos_T[:, None]  # [T, S]
    logits = jnp.where(visible, logits.astype(jnp.float32), -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    out_BTNH = jnp.einsum("BNTS,BSNH->BTNH", probs, v_SNH)
    y = jnp.einsum("BTNH,NHD->BTD", out_BTNH, self.wo[...].astype(dtype))
    return y, {"k": k_all, "v": v_all}

  def _attend(self, q_BTNH, k_BTKH, v_BTKH, kwargs):
    """Calls the attention function; a Pallas kernel under a mesh runs per shard."""
    impl = self.implementation or api.default_implementation(
      mask=kwargs.get("mask"), bias=kwargs.get("bias")
    )
    if kwargs.get("signed") and self.implementation is None and impl.startswith("pallas"):
      impl = "xla"  # the kernels take no signed weights
    active = sharding.current()
    if active is None or not impl.startswith("pallas"):
      return api.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, implementation=impl, **kwargs)
    mesh, rules = active
    batch_axes = sharding.mesh_axes_for("batch", rules)
    head_axes = sharding.mesh_axes_for("kv_heads", rules)
    B, K = q_BTNH.shape[0], k_BTKH.shape[2]
    if B % math.prod(mesh.shape[a] for a in batch_axes):
      batch_axes = ()
    if K % math.prod(mesh.shape[a] for a in head_axes):
      head_axes = ()  # heads that do not divide over the mesh stay whole on every device
    return sharded_lib.sharded_attention(
      q_BTNH,
      k_BTKH,
      v_BTKH,
      mesh=mesh,
      batch_axes=batch_axes,
      head_axes=head_axes,
      implementation=impl,
      **kwargs,
    )
