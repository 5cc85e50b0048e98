"""attn_jax.attention: attention as pure JAX functions (no Flax), and the registry.

Dimension key: B batch, T query length, S key/value length, N query heads, K kv heads
(N % K == 0), H q/k head dim, Hv value head dim, D model dim. Arrays are [B, T, N, H].
"""

from attn_jax.attention.api import IMPLEMENTATIONS, default_implementation, dot_product_attention
from attn_jax.attention.biases import AlibiBias, PeriodicBias, ScoreBias, alibi_slopes
from attn_jax.attention.masks import (
  EMPTY,
  FULL,
  PARTIAL,
  AlignmentMask,
  AndMask,
  BlockSparseMask,
  CausalMask,
  ChunkedCausalMask,
  ChunkSelectionMask,
  FullMask,
  GroupMask,
  LocalMask,
  Mask,
  OrMask,
  PrefixLMMask,
  SegmentMask,
  SinkKeysMask,
  sink_window,
  sliding_window,
  streaming_cache_indices,
)
from attn_jax.attention.reference import attention_reference
from attn_jax.attention.rope import apply_rope, rope_attention, rope_frequencies
from attn_jax.attention.xla import blocked_attention

__all__ = [
  "EMPTY",
  "FULL",
  "IMPLEMENTATIONS",
  "PARTIAL",
  "AlibiBias",
  "AlignmentMask",
  "AndMask",
  "BlockSparseMask",
  "CausalMask",
  "ChunkedCausalMask",
  "ChunkSelectionMask",
  "FullMask",
  "GroupMask",
  "LocalMask",
  "Mask",
  "OrMask",
  "PeriodicBias",
  "PrefixLMMask",
  "ScoreBias",
  "SegmentMask",
  "SinkKeysMask",
  "alibi_slopes",
  "apply_rope",
  "attention_reference",
  "blocked_attention",
  "default_implementation",
  "dot_product_attention",
  "rope_attention",
  "rope_frequencies",
  "sink_window",
  "sliding_window",
  "streaming_cache_indices",
]
