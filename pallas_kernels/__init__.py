"""Pallas kernels for attn_jax (flash, block-sparse, chunked linear; TPU and GPU).

Kernels depend only on jax, never on attn_jax. None is built yet: the front door
``attn_jax.attention.dot_product_attention`` raises a clear error for the Pallas
implementation names until they land.
"""
