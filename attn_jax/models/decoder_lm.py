"""Causal decoder language model: embeddings, a ``Transformer`` stack, (tied) output head.

Dimension key: B batch, T length, P scored positions, D model dim, V vocabulary.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax import sharding
from attn_jax.nn import layers, transformer

# Size table: model-section overrides. "tiny" is the CPU smoke size; the rest follow common
# decoder shapes (GQA from "medium" up) and are built under jax.eval_shape in the tests.
VARIANTS = {
  "tiny": dict(d_model=64, num_layers=2, num_heads=2, mlp_dim=256),
  "small": dict(d_model=768, num_layers=12, num_heads=12, mlp_dim=3072),
  "medium": dict(d_model=1024, num_layers=24, num_heads=16, num_kv_heads=4, mlp_dim=4096),
  "1b": dict(d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, mlp_dim=8192, mlp="swiglu"),
  "7b": dict(d_model=4096, num_layers=32, num_heads=32, mlp_dim=11008, mlp="swiglu"),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class DecoderLM(nnx.Module):
  """Causal LM. ``positions`` is "rope", "learned" (absolute, up to ``max_len``) or "none".

  Args:
    vocab_size: V.
    max_len: longest sequence (learned positions only).
    tie_embeddings: reuse the token embedding as the output projection.
    dtype: compute dtype name ("float32" or "bfloat16"); parameters stay float32.
    Other keyword arguments configure the ``Transformer`` (``attention``, ``num_layers``,
    ``num_heads``, ``num_kv_heads``, ``head_dim``, ``mlp``, ``norm``, ``qk_norm``, ...).
  """

  def __init__(
    self,
    *,
    vocab_size: int,
    d_model: int,
    max_len: int = 2048,
    positions: str = "rope",
    tie_embeddings: bool = True,
    dtype: str = "float32",
    rngs: nnx.Rngs,
    **transformer_kwargs,
  ):
    if dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    self.dtype, self.positions, self.max_len = DTYPES[dtype], positions, max_len
    self.embed = layers.Embed(vocab_size, d_model, rngs=rngs)
    if positions == "learned":
      self.pos_embed = layers.param(
        rngs, jax.nn.initializers.normal(0.02), (max_len, d_model), ("positions", "embed")
      )
    self.stack = transformer.Transformer(
      d_model=d_model, causal=True, positions=positions, rngs=rngs, **transformer_kwargs
    )
    self.unembed = (
      None
      if tie_embeddings
      else layers.param(
        rngs, layers.fan_in_init(d_model), (d_model, vocab_size), ("embed", "vocab")
      )
    )

  def embed_tokens(self, tokens_BT):
    x_BTD = self.embed(tokens_BT, self.dtype)
    if self.positions == "learned":
      T = tokens_BT.shape[1]
      if T > self.max_len:
        raise ValueError(f"sequence length {T} exceeds max_len={self.max_len}")
      x_BTD = x_BTD + self.pos_embed[:T].astype(self.dtype)
    return sharding.constrain(x_BTD, ("batch", "length", "embed"))

  def hidden(self, x_BTD, **kwargs):
    return self.stack(x_BTD, **kwargs)

  def logits(self, h_BPD):
    if self.unembed is None:
      out = self.embed.attend(h_BPD)
    else:
      out = h_BPD @ self.unembed[...].astype(h_BPD.dtype)
    return out.astype(jnp.float32)

  def __call__(self, tokens_BT, *, logit_positions_BP=None, **kwargs):
    """Logits ``[B, T, V]``, or ``[B, P, V]`` at ``logit_positions_BP`` only (cheaper).

    Keyword arguments (``segment_ids_BT``, ``positions_BT``, ``capture``) go to the layers.
    """
    h_BTD = self.hidden(self.embed_tokens(tokens_BT), **kwargs)
    if logit_positions_BP is not None:
      h_BTD = jnp.take_along_axis(h_BTD, logit_positions_BP[..., None], axis=1)
    return self.logits(h_BTD)
