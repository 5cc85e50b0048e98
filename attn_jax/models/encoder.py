"""Bidirectional encoder with a pooled head, for classification and regression tasks
(ViT-style patches or LRA-style tokens later; in-context regression now).

Dimension key: B batch, T length, F input features, D model dim, C classes/outputs.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax import sharding
from attn_jax.models.decoder_lm import DTYPES
from attn_jax.nn import layers, transformer
from attn_jax.nn import probe as probe_nn

VARIANTS = {
  "tiny": dict(d_model=64, num_layers=2, num_heads=2, mlp_dim=256),
  "small": dict(d_model=384, num_layers=12, num_heads=6, mlp_dim=1536),
  "base": dict(d_model=768, num_layers=12, num_heads=12, mlp_dim=3072),
  "large": dict(d_model=1024, num_layers=24, num_heads=16, mlp_dim=4096),
}
POOLING = ("mean", "first", "last", "efficient_probe")


class Encoder(nnx.Module):
  """Tokens (``vocab_size``) or feature vectors (``input_dim``) in, ``[B, C]`` out.

  Args:
    num_outputs: C (classes, or 1 for scalar regression).
    pooling: "mean" over valid tokens, "first" (a CLS position), "last", or
      "efficient_probe" (multi-query attention pooling over valid tokens, registry id
      ``efficient_probe``; ``probe_queries`` M and ``probe_dim`` Dv set its size).
    positions: "learned" (absolute, up to ``max_len``), "rope" or "none".
  """

  def __init__(
    self,
    *,
    d_model: int,
    num_outputs: int,
    vocab_size: int | None = None,
    input_dim: int | None = None,
    max_len: int = 1024,
    positions: str = "learned",
    pooling: str = "mean",
    probe_queries: int = 32,
    probe_dim: int | None = None,
    dtype: str = "float32",
    rngs: nnx.Rngs,
    **transformer_kwargs,
  ):
    if (vocab_size is None) == (input_dim is None):
      raise ValueError("give exactly one of vocab_size (tokens) or input_dim (features)")
    if pooling not in POOLING:
      raise ValueError(f"pooling must be one of {POOLING}; got {pooling!r}")
    if dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    self.dtype, self.positions, self.pooling, self.max_len = (
      DTYPES[dtype],
      positions,
      pooling,
      max_len,
    )
    self.embed = layers.Embed(vocab_size, d_model, rngs=rngs) if vocab_size else None
    self.input_proj = (
      layers.param(rngs, layers.fan_in_init(input_dim), (input_dim, d_model), (None, "embed"))
      if input_dim
      else None
    )
    if positions == "learned":
      self.pos_embed = layers.param(
        rngs, jax.nn.initializers.normal(0.02), (max_len, d_model), ("positions", "embed")
      )
    self.stack = transformer.Transformer(
      d_model=d_model, causal=False, positions=positions, rngs=rngs, **transformer_kwargs
    )
    self.probe = (
      probe_nn.EfficientProbe(
        d_model=d_model,
        num_queries=probe_queries,
        v_dim=probe_dim,
        implementation=transformer_kwargs.get("implementation"),
        rngs=rngs,
      )
      if pooling == "efficient_probe"
      else None
    )
    pooled_dim = d_model if self.probe is None else self.probe.out_dim
    self.head = layers.param(
      rngs, layers.fan_in_init(pooled_dim), (pooled_dim, num_outputs), ("embed", None)
    )

  def __call__(self, inputs, *, segment_ids_BT=None, **kwargs):
    if self.embed is not None:
      x_BTD = self.embed(inputs, self.dtype)
    else:
      x_BTD = inputs.astype(self.dtype) @ self.input_proj[...].astype(self.dtype)
    T = x_BTD.shape[1]
    if self.positions == "learned":
      if T > self.max_len:
        raise ValueError(f"sequence length {T} exceeds max_len={self.max_len}")
      x_BTD = x_BTD + self.pos_embed[:T].astype(self.dtype)
    x_BTD = sharding.constrain(x_BTD, ("batch", "length", "embed"))
    h_BTD = self.stack(x_BTD, segment_ids_BT=segment_ids_BT, **kwargs)
    if self.pooling == "first":
      pooled_BD = h_BTD[:, 0]
    elif self.pooling == "last":
      pooled_BD = h_BTD[:, -1]
    elif self.pooling == "efficient_probe":
      valid_BT = None if segment_ids_BT is None else segment_ids_BT > 0
      pooled_BD = self.probe(h_BTD, valid_BS=valid_BT)
    else:
      valid_BT = jnp.ones(h_BTD.shape[:2]) if segment_ids_BT is None else segment_ids_BT > 0
      valid_BT = valid_BT.astype(h_BTD.dtype)
      pooled_BD = (h_BTD * valid_BT[..., None]).sum(1) / jnp.maximum(valid_BT.sum(1), 1)[:, None]
    return (pooled_BD @ self.head[...].astype(pooled_BD.dtype)).astype(jnp.float32)
