"""The agent-attention layer of the stacks (registry id ``agent_attn``): projections (K = N by
default), pooled-query agents, the two softmax calls of
``attn_jax.attention.agent.agent_attention`` with learned agent biases and the DWC term,
then the output projection. Bidirectional only.

Options: ``agent_num`` (n agents, 49 as in the paper), ``agent_dwc`` (depthwise-conv width
W, odd; 0: no DWC), ``agent_bias_points`` (P anchors of each bias table, linearly
interpolated to the sequence length so any length works). The bias tables and the DWC start
at zero (the layer starts as plain agent attention). Positions "learned" or "none" (the
agent biases are this layer's position signal). Packed documents are refused.
"""

import jax
import jax.numpy as jnp

from attn_jax.attention import agent as agent_lib
from attn_jax.attention import heads as heads_lib
from attn_jax.nn import attention as attention_lib
from attn_jax.nn import projected

DEFAULT_OPTIONS = {
  **attention_lib.DEFAULT_OPTIONS,
  "agent_num": 49,
  "agent_dwc": 3,
  "agent_bias_points": 7,
}
POSITIONS = ("none", "learned")


class AgentAttention(projected.ProjectedAttention):
  """Agent attention; constructor arguments as ``attn_jax.nn.attention.Attention``."""

  DEFAULT_OPTIONS = DEFAULT_OPTIONS

  def __init__(
    self,
    *,
    d_model: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    v_head_dim: int | None = None,
    kind: str = "agent_attn",
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
    projected.check_kind("AgentAttention", kind, ("agent_attn",), positions, POSITIONS)
    if causal:
      raise ValueError(
        f"attention kind {kind!r} is bidirectional-only (its agents pool every query); the "
        "model is causal"
      )
    if qk_norm:
      raise ValueError(f"attention kind {kind!r} does not take qk_norm=True")
    options = projected.merge_options(kind, options, self.DEFAULT_OPTIONS)
    n, W, P = (int(options[k]) for k in ("agent_num", "agent_dwc", "agent_bias_points"))
    if n < 1 or P < 1 or W < 0 or (W and W % 2 == 0):
      raise ValueError(
        f"need agent_num >= 1, agent_bias_points >= 1 and agent_dwc 0 or odd; got {n}, {P}, {W}"
      )
    self.num_agents, self.implementation = n, implementation
    specs = heads_lib.param_specs(
      "head_dims",
      d_model=d_model,
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=head_dim,
      v_head_dim=v_head_dim,
    )
    N = specs["w_q"][0][1]
    _, K, Hv = specs["w_v"][0]
    zeros = jax.nn.initializers.zeros
    specs["agent_b1"] = ((N, n, P), zeros, ("heads", None, None))  # agents -> key positions
    specs["agent_b2"] = ((N, n, P), zeros, ("heads", None, None))  # query positions -> agents
    if W:
      specs["agent_dwc"] = ((W, K, Hv), zeros, (None, "kv_heads", None))
    self._declare_params(rngs, specs)

  def __call__(self, x_BTD, *, positions_BT=None, segment_ids_BT=None):
    del positions_BT
    if segment_ids_BT is not None:
      raise NotImplementedError(
        "agent_attn does not take packed documents (segment ids): the agents pool the whole "
        "sequence; use unpacked sequences"
      )
    p = self.param_tree()
    dtype = x_BTD.dtype
    T = x_BTD.shape[1]
    q = jnp.einsum("BTD,DNH->BTNH", x_BTD, p["w_q"].astype(dtype))
    k = jnp.einsum("BTD,DKH->BTKH", x_BTD, p["w_k"].astype(dtype))
    v = jnp.einsum("BTD,DKV->BTKV", x_BTD, p["w_v"].astype(dtype))
    bias1 = agent_lib.interpolate_bias(p["agent_b1"], T)  # [N, n, T]
    bias2 = jnp.swapaxes(agent_lib.interpolate_bias(p["agent_b2"], T), 1, 2)  # [N, T, n]
    o = agent_lib.agent_attention(
      q,
      k,
      v,
      num_agents=self.num_agents,
      agent_bias1=bias1,
      agent_bias2=bias2,
      dwc_weight=p.get("agent_dwc"),
      implementation=self.implementation,
    )
    return jnp.einsum("BTNV,NVD->BTD", o, p["w_o"].astype(dtype))
