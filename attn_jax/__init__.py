"""attn_jax: a JAX/Flax research library for attention mechanisms."""

__version__ = "0.1.0"
