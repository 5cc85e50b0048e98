"""Linear-attention layers of the stacks (registry ids ``linear_attn``, ``lightning``,
``simple_gla``, ``delta_rule``, ``gated_delta``, ``gla``, ``based``, ``hgrn2``,
``ssd_rope``): GQA projections, the recurrence of ``attn_jax.attention.linear.linear_attention`` or
``attn_jax.attention.delta`` (chunked), a
per-head RMSNorm of the output (our choice for all: the unnormalised recurrences grow with
the length), then the output projection.

Delta rules: q and k are L2-normalised per head, β_t = sigmoid(x_t W_β) per (token, head);
``gated_delta`` adds the decay of ``simple_gla``. ``gla``: per key-dimension gates
g = −softplus(x W_1 W_2 + b) / ``gla_tau`` from a rank-``gla_rank`` projection. ``based``:
q and k projected to ``based_dim`` features, the Taylor map [1, x, vec(x xᵀ)/√2] and the z
normaliser (the Based model's short convolutions: option ``short_conv``; its
sliding-window layers: a hybrid schedule). ``hgrn2``: the query projection is the output gate g,
the key projection the forget-gate logits z and the value projection the input i (no
activations on g or i: our choice), f = γ + (1 − γ)·σ(z) with a learned lower bound γ per
(head, key dimension) that rises with depth: γ lies in the band of this layer
(``attn_jax.attention.linear.hgrn2_lower_bound``: [(l − 1)/L, l/L) when the option
``hgrn2_num_layers`` = L is set, else [1 − 2^(1−l), 1 − 2^(−l)), because the stack hands a
layer its 1-based ``layer_index`` but not the depth), starting mid-band.

Decays: ``linear_attn`` none (feature map ``linear_feature_map``, default "elu1", with the
z normaliser); ``lightning`` fixed per head, λ_n = 1 − 2^(−5 − n); ``simple_gla``
g_t = −softplus(x_t W_g + b_g) / ``gla_tau`` per (token, head), b_g initialised so the
decay starts near 1. ``short_conv`` = W > 0 (default 0: off) runs a causal depthwise
convolution of width W, then SiLU, on the q, k and v projections of every kind
(``attn_jax.attention.linear.short_conv``; the H3/Based/GLA/DeltaNet token mixer that hands
each token its predecessors inside one layer), before feature maps, L2 norms and RoPE.
Packed documents (segment ids) reset the state and stop the filter. Decoding:
``init_cache`` / ``step`` carry the recurrent state across calls (``Transformer.step``).
``ssd_rope``: the ``simple_gla`` decay with RoPE (``rope_base``, ``rotary_dim``) on q and k
inside the layer. Causal only; model positions "learned" or "none". The generic option keys
are declared and ignored.
"""

import jax
import jax.numpy as jnp

from attn_jax.attention import delta as delta_lib
from attn_jax.attention import heads as heads_lib
from attn_jax.attention import linear as linear_lib
from attn_jax.attention import rope as rope_lib
from attn_jax.nn import attention as attention_lib
from attn_jax.nn import projected

KINDS = (
  "linear_attn",
  "lightning",
  "simple_gla",
  "delta_rule",
  "gated_delta",
  "gla",
  "based",
  "hgrn2",
  "ssd_rope",
)
DEFAULT_OPTIONS = {
  **attention_lib.DEFAULT_OPTIONS,
  "linear_feature_map": "elu1",
  "linear_chunk": 64,
  "gla_tau": 16.0,
  "gla_rank": 16,
  "based_dim": 16,
  "hgrn2_num_layers": 0,
  "short_conv": 0,
}
POSITIONS = ("none", "learned")


class LinearAttention(projected.ProjectedAttention):
  """Scalar-decay linear attention; constructor arguments as
  ``attn_jax.nn.attention.Attention`` plus ``layer_index`` (used by ``hgrn2``)."""

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
    kind: str = "linear_attn",
    causal: bool = True,
    positions: str = "none",
    rope_base: float = 10000.0,
    rotary_dim: int | None = None,
    qk_norm: bool = False,
    options: dict | None = None,
    implementation: str | None = None,
    layer_index: int = 1,
    rngs,
  ):
    self.rope_base, self.rotary_dim = rope_base, rotary_dim  # ssd_rope
    projected.check_kind("LinearAttention", kind, KINDS, positions, POSITIONS)
    if not causal:
      raise ValueError(
        f"attention kind {kind!r} is a causal recurrence; the model is bidirectional"
      )
    if qk_norm:
      raise ValueError(f"attention kind {kind!r} does not take qk_norm=True")
    options = projected.merge_options(kind, options, self.DEFAULT_OPTIONS)
    self.kind, self.implementation = kind, implementation
    self.feature = {"linear_attn": str(options["linear_feature_map"]), "based": "taylor"}.get(
      kind, "identity"
    )
    self.normalize = kind in ("linear_attn", "based")
    self.chunk, self.tau = int(options["linear_chunk"]), float(options["gla_tau"])
    self.layer_index, self.num_layers = layer_index, int(options["hgrn2_num_layers"])
    if kind == "hgrn2":
      linear_lib.hgrn2_lower_bound(0.0, layer_index, self.num_layers)  # validates
    width = d_model // num_heads if head_dim is None else head_dim
    specs = heads_lib.param_specs(
      "head_dims",
      d_model=d_model,
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=int(options["based_dim"]) if kind == "based" else head_dim,
      v_head_dim=width if kind == "based" and v_head_dim is None else v_head_dim,
    )
    N, Hv = specs["w_o"][0][:2]
    specs["out_norm"] = ((N, Hv), jax.nn.initializers.ones, ("heads", None))
    if kind == "gla":
      H, R = specs["w_q"][0][2], int(options["gla_rank"])
      specs["w_g1"] = ((d_model, R), heads_lib._fan_in(d_model), ("embed", None))
      specs["w_g2"] = ((R, N, H), heads_lib._fan_in(R), (None, "heads", None))
      specs["b_g"] = ((N, H), jax.nn.initializers.constant(-4.0), ("heads", None))
    if kind == "hgrn2":  # θ of the lower bound; 0 puts γ mid-band
      H = specs["w_q"][0][2]
      specs["hgrn2_theta"] = ((N, H), jax.nn.initializers.zeros, ("heads", None))
    if kind in ("delta_rule", "gated_delta"):
      specs["w_beta"] = ((d_model, N), heads_lib._fan_in(d_model), ("embed", "heads"))
    self.conv = int(options["short_conv"])
    if self.conv < 0:
      raise ValueError(f"short_conv must be >= 0 (0: off); got {self.conv}")
    if self.conv:  # one depthwise causal filter per q/k/v channel, PyTorch Conv1d's init
      bound = self.conv**-0.5
      conv_init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)  # noqa: E731
      for name, axes in (("q", "heads"), ("k", "kv_heads"), ("v", "kv_heads")):
        shape = (self.conv, *specs[f"w_{name}"][0][1:])
        specs[f"conv_{name}"] = (shape, conv_init, (None, axes, None))
    if kind in ("simple_gla", "gated_delta", "ssd_rope"):
      specs["w_g"] = ((d_model, N), heads_lib._fan_in(d_model), ("embed", "heads"))
      specs["b_g"] = ((N,), jax.nn.initializers.constant(-4.0), ("heads",))
    self._declare_params(rngs, specs)
    self.num_heads = N

  def __call__(self, x_BTD, *, positions_BT=None, segment_ids_BT=None):
    return self._forward(x_BTD, segment_ids_BT, None, positions_BT)[0]

  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """The recurrent state for ``step`` (float32, ``[B, N, H', Hv']``: H' after the feature
    map, Hv' with the normaliser column) and, with ``short_conv`` W > 0, the last W − 1
    q/k/v projections (``conv_q``, ``conv_k``, ``conv_v``); its size does not depend on
    ``max_len``."""
    del max_len
    p = self.param_tree()
    H, Hv = p["w_q"].shape[2], p["w_v"].shape[2]
    if self.feature == "taylor":
      H = 1 + H + H * H
    cache = {"state": jnp.zeros((batch, self.num_heads, H, Hv + self.normalize), jnp.float32)}
    for name in ("q", "k", "v") if self.conv else ():
      shape = (batch, self.conv - 1, *p[f"w_{name}"].shape[1:])
      cache[f"conv_{name}"] = jnp.zeros(shape, dtype)
    return cache

  def step(self, x_BTD, cache: dict, length):
    """T new tokens against the carried cache: ``(y [B, T, D], new cache)``."""
    positions = length + jnp.arange(x_BTD.shape[1])  # RoPE of ssd_rope
    return self._forward(x_BTD, None, cache, positions)

  def _forward(self, x_BTD, segment_ids_BT, cache, positions=None):
    """(y, new cache or None): the layer, from ``cache`` (None: zeros, no cache out)."""
    state = None if cache is None else cache["state"]
    carry = {} if state is None else {"initial_state": state, "return_final_state": True}
    p = self.param_tree()
    dtype = x_BTD.dtype
    q = jnp.einsum("BTD,DNH->BTNH", x_BTD, p["w_q"].astype(dtype))
    k = jnp.einsum("BTD,DKH->BTKH", x_BTD, p["w_k"].astype(dtype))
    v = jnp.einsum("BTD,DKV->BTKV", x_BTD, p["w_v"].astype(dtype))
    new_cache = {}
    if self.conv:
      convolved = []
      for name, a in (("q", q), ("k", k), ("v", v)):
        w = p[f"conv_{name}"]
        if cache is None:
          convolved.append(linear_lib.short_conv(a, w, segment_ids=segment_ids_BT))
        else:
          a, new_cache[f"conv_{name}"] = linear_lib.short_conv(a, w, cache=cache[f"conv_{name}"])
          convolved.append(a)
      q, k, v = convolved
    if self.kind == "lightning":
      g = jnp.asarray(linear_lib.lightning_log_decay(self.num_heads))
    elif self.kind in ("simple_gla", "gated_delta", "ssd_rope"):
      logits = jnp.einsum("BTD,DN->BTN", x_BTD.astype(jnp.float32), p["w_g"]) + p["b_g"]
      g = -jax.nn.softplus(logits) / self.tau
    elif self.kind == "gla":
      low = jnp.einsum("BTD,DR->BTR", x_BTD.astype(jnp.float32), p["w_g1"])
      logits = jnp.einsum("BTR,RNH->BTNH", low, p["w_g2"]) + p["b_g"]
      g = -jax.nn.softplus(logits) / self.tau
    else:
      g = None
    if self.kind == "hgrn2":
      gamma = linear_lib.hgrn2_lower_bound(p["hgrn2_theta"], self.layer_index, self.num_layers)
      o = linear_lib.hgrn2_attention(
        q,
        k,
        v,
        lower_bound=gamma,
        segment_ids=segment_ids_BT,
        chunk_size=self.chunk,
        implementation=self.implementation,
        **carry,
      )
    elif self.kind in ("delta_rule", "gated_delta"):
      beta = jax.nn.sigmoid(jnp.einsum("BTD,DN->BTN", x_BTD.astype(jnp.float32), p["w_beta"]))
      o = delta_lib.delta_rule_attention(
        q,
        k,
        v,
        beta,
        g,
        segment_ids=segment_ids_BT,
        chunk_size=self.chunk,
        implementation=self.implementation,
        l2_normalize=True,
        **carry,
      )
    else:
      if self.kind == "ssd_rope":  # RoPE on C (q) and B (k), then the SSD recurrence
        pos = jnp.arange(x_BTD.shape[1]) if positions is None else positions
        rope = {"base": self.rope_base, "rotary_dim": self.rotary_dim}
        q, k = rope_lib.apply_rope(q, pos, **rope), rope_lib.apply_rope(k, pos, **rope)
      o = self._linear(q, k, v, g, segment_ids_BT, carry)
    o, state = o if carry else (o, None)
    of = o.astype(jnp.float32)
    of = of * jax.lax.rsqrt(jnp.mean(of * of, axis=-1, keepdims=True) + 1e-6) * p["out_norm"]
    y = jnp.einsum("BTNV,NVD->BTD", of.astype(dtype), p["w_o"].astype(dtype))
    return y, (None if cache is None else {"state": state, **new_cache})

  def _linear(self, q, k, v, g, segment_ids_BT, carry=None):
    return linear_lib.linear_attention(
      q,
      k,
      v,
      g,
      feature_map=self.feature,
      normalize=self.normalize,
      segment_ids=segment_ids_BT,
      chunk_size=self.chunk,
      implementation=self.implementation,
      **(carry or {}),
    )
