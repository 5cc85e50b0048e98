"""ssd_rope (tier 3): SSD (the simple_gla recurrence) with RoPE on its C (q) and B (k)
projections — zero angles equal plain SSD, a shift of every position leaves the output
unchanged, the chunk form equals the recurrence with gradients, the NNX layer decodes like
its full sequence, bad input raises."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import linear as lin
from attn_jax.nn.transformer import Transformer


def close(a, b, tol):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol)


def inputs(key, B=2, T=37, N=2, H=8, Hv=6):
  ks = jax.random.split(key, 4)
  q, k = normal(ks[0], (B, T, N, H), jnp.float64), normal(ks[1], (B, T, N, H), jnp.float64)
  v = normal(ks[2], (B, T, N, Hv), jnp.float64)
  g = -jax.nn.softplus(normal(ks[3], (B, T, N), jnp.float64))
  return q, k, v, g


def test_zero_angles_are_plain_ssd_and_shift_invariance(rng):
  q, k, v, g = inputs(rng)
  plain = lin.linear_attention(q, k, v, g, chunk_size=8)
  zero_pos = jnp.zeros(q.shape[1], jnp.int32)
  close(lin.ssd_rope_attention(q, k, v, g, positions=zero_pos, chunk_size=8), plain, 1e-12)
  close(lin.ssd_rope_attention(q, k, v, g, rotary_dim=0, chunk_size=8), plain, 1e-12)
  rotated = lin.ssd_rope_attention(q, k, v, g, chunk_size=8)
  assert float(jnp.abs(rotated - plain).max()) > 1e-3  # the rotation does something
  shifted = lin.ssd_rope_attention(q, k, v, g, positions=jnp.arange(37) + 1000, chunk_size=8)
  close(shifted, rotated, 1e-9)


def test_chunk_equals_recurrence_with_gradients(rng):
  q, k, v, g = inputs(rng)

  def run(impl):
    def f(q, k, v, g):
      out = lin.ssd_rope_attention(q, k, v, g, chunk_size=8, implementation=impl)
      return jnp.sum(jnp.sin(out)), out

    return jax.jit(jax.grad(f, (0, 1, 2, 3), has_aux=True))(q, k, v, g)

  (grads, out), (want_grads, want) = run("xla"), run("reference")
  close(out, want, 1e-10)
  for a, b in zip(grads, want_grads, strict=True):
    close(a, b, 1e-9)


def test_layer_decodes_like_the_full_sequence(rng):
  model = Transformer(
    num_layers=2,
    attention="ssd_rope",
    d_model=16,
    num_heads=2,
    positions="none",
    rngs=nnx.Rngs(0),
  )
  x = normal(rng, (2, 7, 16), jnp.float32)

  @nnx.jit
  def run(model, x):
    cache = model.init_cache(2, 7)
    a, cache = model.step(x[:, :4], cache)
    b, cache = model.step(x[:, 4:5], cache)
    c, cache = model.step(x[:, 5:], cache)
    return model(x), jnp.concatenate([a, b, c], axis=1)

  full, decoded = run(model, x)
  close(decoded, full, 2e-5)


def test_bad_inputs(rng):
  q, k, v, g = inputs(rng, T=8)
  with pytest.raises(ValueError, match="feature_map must be 'identity'"):
    lin.ssd_rope_attention(q, k, v, g, feature_map="elu1")
