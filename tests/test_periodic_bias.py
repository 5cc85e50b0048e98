"""FaceFormer's periodic stepped bias and alignment mask (periodic_bias, a tier-3 row built):
the in-tile bias equals −⌊(i − j)/p⌋; the blocked path with it equals the float64 reference
(values and gradients); p >= T is plain causal attention; the alignment mask shows frame i
exactly keys [k·i, k·(i + 1)) and its tile map is exact; the NNX kind; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import (
  EMPTY,
  FULL,
  AlignmentMask,
  CausalMask,
  PeriodicBias,
  dot_product_attention,
)
from attn_jax.nn.attention import Attention


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def test_bias_values():
  bias = PeriodicBias(3, 2)
  got = bias(jnp.arange(2), jnp.arange(10), jnp.arange(10))
  i, j = np.arange(10)[:, None], np.arange(10)[None, :]
  want = -np.floor((i - j) / 3)
  assert got.shape == (2, 10, 10)
  close(got[1], want, 0)
  assert float(got[0, 7, 7]) == 0 and float(got[0, 7, 5]) == 0 and float(got[0, 7, 4]) == -1


def test_blocked_equals_reference_with_gradients_and_large_period_is_causal(rng):
  kq, kk, kv, kw = jax.random.split(rng, 4)
  q = normal(kq, (2, 37, 4, 8), jnp.float64)
  k, v = normal(kk, (2, 37, 2, 8), jnp.float64), normal(kv, (2, 37, 2, 8), jnp.float64)
  w = normal(kw, (2, 37, 4, 8), jnp.float64)
  bias = PeriodicBias(5, 4)

  def loss(q, k, v, impl):
    o = dot_product_attention(q, k, v, mask=CausalMask(), bias=bias, implementation=impl)
    return jnp.sum(o * w)

  grad = jax.jit(jax.value_and_grad(loss, (0, 1, 2)), static_argnums=3)
  want, want_g = grad(q, k, v, "reference")
  got, got_g = grad(*(a.astype(jnp.float32) for a in (q, k, v)), "xla")
  close(got, want, 1e-4)
  for g, r in zip(got_g, want_g, strict=True):
    close(g, r, 1e-4)
  # A period no shorter than the sequence puts every causal key in the query's period.
  close(
    dot_product_attention(q, k, v, mask=CausalMask(), bias=PeriodicBias(37, 4)),
    dot_product_attention(q, k, v, mask=CausalMask()),
    1e-12,
  )


def test_alignment_mask_rows_and_tile_map(rng):
  mask = AlignmentMask(3)
  dense = np.asarray(mask.dense(7, 21))
  for i in range(7):
    assert list(np.nonzero(dense[i])[0]) == [3 * i, 3 * i + 1, 3 * i + 2]
  kinds = np.asarray(mask.block_kinds(7, 21, 1, 3))
  assert np.all((kinds == FULL) == (np.arange(7)[:, None] == np.arange(7)[None, :]))
  kinds = np.asarray(mask.block_kinds(7, 21, 2, 4))
  for a in range(4):
    for b in range(6):
      tile = dense[2 * a : 2 * a + 2, 4 * b : 4 * b + 4]  # the in-range part of the tile
      assert (kinds[a, b] == EMPTY) == (not tile.any())
      assert (kinds[a, b] == FULL) == tile.all()
  kq, kk, kv = jax.random.split(rng, 3)
  q = normal(kq, (1, 7, 2, 8), jnp.float32)
  k, v = normal(kk, (1, 21, 2, 8), jnp.float32), normal(kv, (1, 21, 2, 8), jnp.float32)
  out = dot_product_attention(q, k, v, mask=mask)
  for i in (0, 4):
    sl = slice(3 * i, 3 * i + 3)
    close(out[:, i : i + 1], dot_product_attention(q[:, i : i + 1], k[:, sl], v[:, sl]), 1e-5)


def test_nnx_kind_and_bad_input(rng):
  layer = Attention(
    d_model=16,
    num_heads=2,
    kind="periodic_bias",
    positions="none",
    options={"period": 3},
    rngs=nnx.Rngs(0),
  )
  x = normal(rng, (2, 11, 16), jnp.float32)
  plain = Attention(d_model=16, num_heads=2, kind="causal", positions="none", rngs=nnx.Rngs(0))
  assert not np.allclose(np.asarray(layer(x)), np.asarray(plain(x)), atol=1e-4)
  big = Attention(
    d_model=16,
    num_heads=2,
    kind="periodic_bias",
    positions="none",
    options={"period": 64},
    rngs=nnx.Rngs(0),
  )
  close(big(x), plain(x), 1e-5)
  with pytest.raises(ValueError, match="period must be an int >= 1"):
    PeriodicBias(0, 2)
  with pytest.raises(ValueError, match="stride must be"):
    AlignmentMask(0)
  with pytest.raises(ValueError, match="has 2 heads; needs N=4"):
    q = jnp.ones((1, 5, 4, 8))
    dot_product_attention(q, q, q, mask=CausalMask(), bias=PeriodicBias(2, 2))
