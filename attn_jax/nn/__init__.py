"""Flax NNX modules: they hold parameters and call ``attn_jax.attention`` for attention."""

from attn_jax.nn.attention import Attention
from attn_jax.nn.layers import MLP, Embed, Norm
from attn_jax.nn.transformer import Block, Transformer, attention_module_class, layer_kinds

__all__ = [
  "MLP",
  "Attention",
  "Block",
  "Embed",
  "Norm",
  "Transformer",
  "attention_module_class",
  "layer_kinds",
]
