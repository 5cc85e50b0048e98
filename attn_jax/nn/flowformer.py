"""The Flow-Attention layer of the stacks (registry id ``flowformer``): GQA projections (K = N
by default), ``attn_jax.attention.flowformer.flowformer_attention`` (causal: the prefix-sum
form; bidirectional: the non-causal formula), then the output projection.

Options: ``flow_chunk`` (chunk size of the causal recurrence). The generic option keys of
``attn_jax.nn.attention`` are declared and ignored. Positions "learned" or "none" (the
sigmoid feature map takes no RoPE). Packed documents (segment ids) are refused: the flows
would need per-document sums, not built.
"""

import jax.numpy as jnp

from attn_jax.attention import flowformer as flow_lib
from attn_jax.attention import heads as heads_lib
from attn_jax.nn import attention as attention_lib
from attn_jax.nn import projected

DEFAULT_OPTIONS = {**attention_lib.DEFAULT_OPTIONS, "flow_chunk": 64}
POSITIONS = ("none", "learned")


class FlowAttention(projected.ProjectedAttention):
  """Flow-Attention; constructor arguments as ``attn_jax.nn.attention.Attention``."""

  DEFAULT_OPTIONS = DEFAULT_OPTIONS

  def __init__(
    self,
    *,
    d_model: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    v_head_dim: int | None = None,
    kind: str = "flowformer",
    causal: bool = True,
    positions: str = "none",
    rope_base: float = 10000.0,
    rotary_dim: int | None = None,
    qk_norm: bool = False,
    options: dict | None = None,
    implementation: str | None = None,
    rngs,
  ):
    del rope_base, rotary_dim
    projected.check_kind("FlowAttention", kind, ("flowformer",), positions, POSITIONS)
    if qk_norm:
      raise ValueError(f"attention kind {kind!r} does not take qk_norm=True")
    options = projected.merge_options(kind, options, self.DEFAULT_OPTIONS)
    self.chunk = int(options["flow_chunk"])
    if self.chunk < 1:
      raise ValueError(f"flow_chunk must be >= 1; got {self.chunk}")
    self.causal, self.implementation = causal, implementation
    specs = heads_lib.param_specs(
      "head_dims",
      d_model=d_model,
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=head_dim,
      v_head_dim=v_head_dim,
    )
    self._declare_params(rngs, specs)

  def __call__(self, x_BTD, *, positions_BT=None, segment_ids_BT=None):
    del positions_BT
    if segment_ids_BT is not None:
      raise NotImplementedError(
        "flowformer does not take packed documents (segment ids): its flows are sums over "
        "the whole sequence; use unpacked sequences"
      )
    p = self.param_tree()
    dtype = x_BTD.dtype
    q = jnp.einsum("BTD,DNH->BTNH", x_BTD, p["w_q"].astype(dtype))
    k = jnp.einsum("BTD,DKH->BTKH", x_BTD, p["w_k"].astype(dtype))
    v = jnp.einsum("BTD,DKV->BTKV", x_BTD, p["w_v"].astype(dtype))
    o = flow_lib.flowformer_attention(
      q, k, v, causal=self.causal, chunk_size=self.chunk, implementation=self.implementation
    )
    return jnp.einsum("BTNV,NVD->BTD", o, p["w_o"].astype(dtype))
