"""Existence bias (existence_bias, a tier-3 row built): log p_j is a cumulative sum of log
continue probabilities that restarts per packed document; p ≡ 1 is plain attention; p_j = 0
masks key j; the blocked and Pallas-interpret paths equal the float64 reference with
gradients reaching the continue logits; the NNX kind; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import CausalMask, biases, dot_product_attention
from attn_jax.nn.attention import Attention


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def test_log_probs_are_cumulative_and_restart_per_document(rng):
  c = normal(rng, (2, 9), jnp.float64)
  ls = np.log(1 / (1 + np.exp(-np.asarray(c))))
  close(biases.existence_log_probs(c), np.cumsum(ls, 1), 1e-12)
  seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 3, 3, 3], [1] * 9])
  got = np.asarray(biases.existence_log_probs(c, seg))
  close(got[0, 3:5], np.cumsum(ls[0, 3:5]), 1e-12)
  close(got[0, 5:], np.cumsum(ls[0, 5:]), 1e-12)
  close(got[1], np.cumsum(ls[1]), 1e-12)


def test_one_is_plain_attention_and_zero_masks_the_key(rng):
  kq, kk, kv = jax.random.split(rng, 3)
  q = normal(kq, (1, 8, 2, 4), jnp.float64)
  k, v = normal(kk, (1, 8, 2, 4), jnp.float64), normal(kv, (1, 8, 2, 4), jnp.float64)
  one = biases.existence_bias(jnp.full((1, 8), 60.0, jnp.float64))
  close(dot_product_attention(q, k, v, bias=one), dot_product_attention(q, k, v), 1e-12)
  # A continue logit of -1e4 at position 5: p_j = 0 (in float64) for keys 5, 6, 7.
  c = jnp.full((1, 8), 60.0, jnp.float64).at[0, 5].set(-1e4)
  got = dot_product_attention(q, k, v, bias=biases.existence_bias(c))
  close(got, dot_product_attention(q, k[:, :5], v[:, :5]), 1e-12)


@pytest.mark.parametrize("implementation", ["xla", "pallas_interpret"])
def test_fast_paths_equal_reference_with_gradients(rng, implementation):
  kq, kk, kv, kc, kw = jax.random.split(rng, 5)
  q = normal(kq, (2, 24, 4, 8), jnp.float64)
  k, v = normal(kk, (2, 24, 2, 8), jnp.float64), normal(kv, (2, 24, 2, 8), jnp.float64)
  c = 1.0 + normal(kc, (2, 24), jnp.float64)
  w = normal(kw, (2, 24, 4, 8), jnp.float64)

  def loss(q, k, v, c, impl):
    bias = biases.existence_bias(c).astype(q.dtype)
    o = dot_product_attention(q, k, v, mask=CausalMask(), bias=bias, implementation=impl)
    return jnp.sum(o * w)

  grad = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3)), static_argnums=4)
  want, want_g = grad(q, k, v, c, "reference")
  got, got_g = grad(*(a.astype(jnp.float32) for a in (q, k, v, c)), implementation)
  close(got, want, 1e-4)
  for g, r in zip(got_g, want_g, strict=True):
    close(g, r, 2e-4)
  assert float(jnp.abs(got_g[3]).max()) > 0


def test_nnx_kind_and_bad_input(rng):
  layer = Attention(
    d_model=16, num_heads=2, kind="existence_bias", positions="none", rngs=nnx.Rngs(0)
  )
  x = normal(rng, (2, 10, 16), jnp.float32)
  y = layer(x)
  assert y.shape == (2, 10, 16) and np.all(np.isfinite(np.asarray(y)))
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
  assert float(jnp.abs(grads.exist_w[...]).max()) > 0
  with pytest.raises(ValueError, match="continue_logits must be a float array"):
    biases.existence_log_probs(jnp.ones((2, 3, 4)))
  with pytest.raises(ValueError, match="segment_ids must have the shape"):
    biases.existence_log_probs(jnp.ones((2, 3)), jnp.ones((2, 4), jnp.int32))
