"""Landmark attention's grouped softmax (``attn_jax.attention.landmark``): the explicit
weights sum to 1 and follow the rule term by term; a sequence without a landmark is causal;
the blocked path equals the float64 explicit-weights oracle (values and gradients);
``insert_landmarks`` layout; the NNX kind."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import CausalMask, dot_product_attention
from attn_jax.attention import landmark as lm
from attn_jax.nn.attention import Attention


def _qkv(key, B=2, T=23, N=4, K=2, H=8, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(key, 3)
  return (
    normal(kq, (B, T, N, H), dtype),
    normal(kk, (B, T, K, H), dtype),
    normal(kv, (B, T, K, H), dtype),
  )


def test_weights_follow_the_rule_and_sum_to_one(rng):
  T, block = 11, 3  # blocks of 3 regular tokens + landmark at 3, 7; a partial block 8..10
  s = normal(rng, (1, 1, T, T), jnp.float64)
  w = np.asarray(lm._weights_reference(s, block))[0, 0]
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-12)
  e = np.exp(np.asarray(s)[0, 0])
  i = 9  # block 2: regular 8, 9 own; landmarks 3 (block 0) and 7 (block 1)
  Z = e[i, 8] + e[i, 9] + e[i, 3] + e[i, 7]
  np.testing.assert_allclose(w[i, 9], e[i, 9] / Z, rtol=1e-12)
  np.testing.assert_allclose(w[i, 1], e[i, 3] / Z * e[i, 1] / e[i, 0:3].sum(), rtol=1e-12)
  np.testing.assert_allclose(w[i, 5], e[i, 7] / Z * e[i, 5] / e[i, 4:7].sum(), rtol=1e-12)
  assert w[i, 3] == 0 and w[i, 7] == 0 and w[i, 10] == 0  # landmark values unused, causal
  assert np.all(w[np.triu_indices(T, 1)] == 0)


def test_without_landmarks_it_is_causal(rng):
  q, k, v = _qkv(rng, T=12)
  want = dot_product_attention(q, k, v, mask=CausalMask(), implementation="reference")
  for impl in ("reference", "xla"):
    out = lm.landmark_attention(q, k, v, landmark_block=20, implementation=impl)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("T, block", [(23, 4), (40, 9)])
def test_blocked_equals_float64_oracle_with_gradients(rng, T, block):
  q, k, v = _qkv(rng, T=T)
  w = normal(jax.random.fold_in(rng, 1), q.shape, jnp.float32)

  def loss(impl):
    def f(q, k, v):
      out = lm.landmark_attention(q, k, v, landmark_block=block, implementation=impl)
      return jnp.sum(out * w.astype(out.dtype)), out

    return f

  grads, out = jax.jit(jax.grad(loss("xla"), (0, 1, 2), has_aux=True))(q, k, v)
  r_grads, r_out = jax.grad(loss("reference"), (0, 1, 2), has_aux=True)(
    *(a.astype(jnp.float64) for a in (q, k, v))
  )
  np.testing.assert_allclose(out, r_out, atol=2e-5, rtol=2e-5)
  for g, rg in zip(grads, r_grads, strict=True):
    np.testing.assert_allclose(g, rg, atol=5e-5, rtol=5e-5)


def test_insert_landmarks_layout(rng):
  x = normal(rng, (2, 7, 3), jnp.float32)
  mark = jnp.asarray([9.0, 9.0, 9.0])
  y = lm.insert_landmarks(x, mark, 3)
  assert y.shape == (2, 9, 3)
  np.testing.assert_array_equal(np.asarray(lm.is_landmark(9, 3)), [0, 0, 0, 1, 0, 0, 0, 1, 0])
  np.testing.assert_array_equal(y[:, 3], jnp.broadcast_to(mark, (2, 3)))
  np.testing.assert_array_equal(y[:, [0, 1, 2, 4, 5, 6, 8]], x)


def test_bad_inputs_and_nnx_kind(rng):
  q, k, v = _qkv(rng)
  with pytest.raises(ValueError, match="landmark_block must be an int >= 1"):
    lm.landmark_attention(q, k, v, landmark_block=0)
  with pytest.raises(ValueError, match="needs S == T"):
    lm.landmark_attention(q, k[:, :5], v[:, :5])
  layer = Attention(
    d_model=16, num_heads=2, kind="landmark", options={"landmark_block": 3}, rngs=nnx.Rngs(0)
  )
  x = normal(rng, (2, 14, 16), jnp.float32)
  assert np.all(np.isfinite(np.asarray(layer(x))))
  with pytest.raises(ValueError, match="causal-only"):
    Attention(d_model=16, num_heads=2, kind="landmark", causal=False, rngs=nnx.Rngs(0))
