"""One test per documented bad input of dot_product_attention, asserting the message."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.attention import (
  AlibiBias,
  BlockSparseMask,
  CausalMask,
  PrefixLMMask,
  SegmentMask,
  dot_product_attention,
)

F32 = jnp.float32


def arrays(B=2, T=8, S=8, N=4, K=2, H=16, Hv=16, dtype=F32):
  key = jax.random.key(0)
  return (
    jax.random.normal(key, (B, T, N, H), dtype),
    jax.random.normal(key, (B, S, K, H), dtype),
    jax.random.normal(key, (B, S, K, Hv), dtype),
  )


q, k, v = arrays()

BAD_INPUTS = {
  "q rank": (dict(q=q[0]), "q must have rank 4 with layout [B, T, N, H]; got shape (8, 4, 16)"),
  "k rank": (dict(k=k[..., 0]), "k must have rank 4 with layout [B, S, K, H]"),
  "q not an array": (dict(q=[[1.0]]), "q must be an array of shape [B, T, N, H]; got list"),
  "int dtype": (dict(q=q.astype(jnp.int32)), "q must have a floating dtype; got int32"),
  "empty dim": (dict(q=q[:, :0]), "q must not have an empty dimension; got shape (2, 0, 4, 16)"),
  "batch mismatch": (
    dict(k=arrays(B=3)[1], v=arrays(B=3)[2]),
    "q, k and v must share the batch size B",
  ),
  "S mismatch k/v": (dict(v=arrays(S=9)[2]), "v must have shape [B, S, K, Hv] matching k"),
  "H mismatch": (dict(k=arrays(H=8)[1]), "q and k must share the head dim H; got q H=16, k H=8"),
  "head divisibility": (
    dict(k=arrays(K=3)[1], v=arrays(K=3)[2]),
    "the number of query heads N=4 must be a multiple of the number of kv heads K=3",
  ),
  "dtype mismatch": (
    dict(v=v.astype(jnp.bfloat16)),
    "q, k and v must share a dtype; got float32, float32, bfloat16",
  ),
  "dense mask": (
    dict(mask=jnp.ones((8, 8), bool)),
    "mask must be a attn_jax.attention.masks.Mask (e.g. CausalMask()); got ",
  ),
  "segment ids shape": (
    dict(mask=SegmentMask(jnp.ones((2, 7), jnp.int32), jnp.ones((2, 8), jnp.int32))),
    "q_segment_ids has shape (2, 7); needs [B, T] = (2, 8)",
  ),
  "kv segment ids shape": (
    dict(mask=SegmentMask(jnp.ones((2, 8), jnp.int32), jnp.ones((2, 9), jnp.int32))),
    "kv_segment_ids has shape (2, 9); needs [B, S] = (2, 8)",
  ),
  "prefix batch": (
    dict(mask=PrefixLMMask(jnp.ones((3,), jnp.int32))),
    "PrefixLMMask prefix_len has shape (3,); needs [B] with B=2",
  ),
  "block indices shape": (
    dict(mask=BlockSparseMask(jnp.zeros((5, 1), jnp.int32), 4)),
    "BlockSparseMask block_indices has shape (5, 1); needs",
  ),
  "bias rank": (
    dict(bias=jnp.zeros((8, 8))),
    "bias must have rank 4 and be broadcastable to [B, N, T, S] = (2, 4, 8, 8)",
  ),
  "bias shape": (
    dict(bias=jnp.zeros((2, 3, 8, 8))),
    "(each dim 1 or full); got shape (2, 3, 8, 8)",
  ),
  "bias dtype": (dict(bias=jnp.zeros((1, 1, 8, 8), jnp.int32)), "bias must be a float array"),
  "bias heads": (dict(bias=AlibiBias.default(3)), "has 3 heads; needs N=4"),
  "sinks shape": (dict(sinks=jnp.zeros((2,))), "sinks must have shape [N] = (4,); got (2,)"),
  "sinks type": (dict(sinks=0.5), "sinks must be a float array of shape [N]"),
  "softcap negative": (dict(softcap=-1.0), "softcap must be finite and > 0 (or None); got -1.0"),
  "softcap inf": (dict(softcap=float("inf")), "softcap must be finite and > 0"),
  "softcap array": (dict(softcap=jnp.ones(())), "softcap must be a Python float > 0 or None"),
  "scale zero": (dict(scale=0.0), "scale must be finite and non-zero; got 0.0"),
  "scale nan": (dict(scale=float("nan")), "scale must be finite and non-zero"),
  "scale type": (dict(scale="0.1"), "scale must be a Python float; got str"),
  "block_q": (dict(block_q=0), "block_q must be a positive int; got 0"),
  "block_kv": (dict(block_kv=2.5), "block_kv must be a positive int; got 2.5"),
  "block sizes for reference": (
    dict(block_q=16, implementation="reference"),
    "block_q / block_kv apply to blocked implementations",
  ),
  "implementation": (dict(implementation="cuda"), "implementation must be one of"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_message(case):
  overrides, message = BAD_INPUTS[case]
  kwargs = dict(q=q, k=k, v=v)
  kwargs.update(overrides)
  args = kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v")
  with pytest.raises(ValueError) as err:
    dot_product_attention(*args, **kwargs)
  assert message in str(err.value)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu", "pallas_interpret"])
def test_pallas_kernels_reject_what_they_cannot_take(impl):
  from attn_jax.attention import AlibiBias, BlockSparseMask

  with pytest.raises(NotImplementedError, match="dense additive biases, not a score-bias"):
    dot_product_attention(q, k, v, bias=AlibiBias.default(q.shape[2]), implementation=impl)
  sparse = BlockSparseMask(jnp.zeros((1, 1), jnp.int32), (q.shape[1], k.shape[1]))
  with pytest.raises(NotImplementedError, match="no tile dividing the BlockSparseMask blocks"):
    dot_product_attention(q, k, v, mask=sparse, implementation=impl)
  with pytest.raises(NotImplementedError, match="BlockSparseMask combined with |"):
    dot_product_attention(q, k, v, mask=sparse | CausalMask(), implementation=impl)


def test_validation_happens_before_tracing():
  """Errors come from attn_jax's checks, also under jit (shapes are static)."""
  f = jax.jit(lambda q, k: dot_product_attention(q, k, v))
  with pytest.raises(ValueError, match="q and k must share the head dim H"):
    f(q, arrays(H=8)[1])


def test_valid_call_passes_every_check():
  out = dot_product_attention(
    q,
    k,
    v,
    mask=CausalMask(),
    bias=jnp.zeros((1, 4, 1, 8)),
    sinks=jnp.zeros((4,)),
    softcap=3.0,
    scale=0.2,
  )
  assert out.shape == (2, 8, 4, 16) and np.all(np.isfinite(out))
