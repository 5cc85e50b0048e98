"""Pallas kernels for attn_jax (TPU and GPU), depending only on jax.

  * ``flash_tpu``: flash attention for TPU (Mosaic), forward and backward, block skipping
    through scalar-prefetched kv-block lists.
  * ``flash_gpu``: flash attention for NVIDIA GPUs (Triton lowering), forward and backward,
    block skipping through per-program loops over kv-block lists.
  * ``_blocks``: the caller → kernel mask contract (block map, in-tile predicate, per-token
    operands) and block-list compaction, shared by both.

The block-sparse and chunked-linear kernel families are not built yet.
``attn_jax.attention.dot_product_attention(implementation="pallas_tpu" | "pallas_gpu" |
"pallas_interpret")`` is the front door to the flash kernels.
"""
