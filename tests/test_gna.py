"""Generalized neighbourhood attention (gna): every non-causal query sees exactly the product
of its per-dimension windows (shifted inward at borders); w = extent is full attention; s = w
is non-overlapping window attention; dilation d is neighbourhood attention on d interleaved
sub-grids; causal windows never see the future; the exact tile map skips empty tiles and the
blocked path equals the reference with gradients; the NNX kind; bad input."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import EMPTY, FULL, dot_product_attention
from attn_jax.attention import neighborhood as na
from attn_jax.nn.attention import Attention


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def dense(mask):
  return np.asarray(mask.dense(mask.size, mask.size))


def brute_window(x, L, w):
  """Plain 1-D neighbourhood: w consecutive positions around x, shifted inward."""
  lo = min(max(x - w // 2, 0), L - w)
  return set(range(lo, lo + w))


def test_each_query_sees_the_product_of_its_windows():
  m = na.NeighborhoodMask((6, 7), (3, 5))
  d = dense(m)
  for t in range(42):
    x, y = divmod(t, 7)
    want = {a * 7 + b for a in brute_window(x, 6, 3) for b in brute_window(y, 7, 5)}
    assert set(np.nonzero(d[t])[0]) == want
  assert np.all(d.sum(1) == 15)


def test_full_extent_stride_and_dilation():
  assert dense(na.NeighborhoodMask((12,), (12,))).all()
  blocks = dense(na.NeighborhoodMask((12,), (4,), stride=(4,)))
  tiles = np.arange(12) // 4
  assert np.array_equal(blocks, tiles[:, None] == tiles[None, :])
  dil = dense(na.NeighborhoodMask((12,), (3,), dilation=(2,)))
  plain = dense(na.NeighborhoodMask((6,), (3,)))
  for r in (0, 1):
    idx = np.arange(r, 12, 2)
    assert np.array_equal(dil[np.ix_(idx, idx)], plain)  # each sub-grid alone
    other = np.arange(1 - r, 12, 2)
    assert not dil[np.ix_(idx, other)].any()  # nothing across sub-grids


def test_causal_never_sees_the_future_and_is_a_sliding_window_at_stride_one():
  d = dense(na.NeighborhoodMask((10,), (3,), causal=(True,)))
  i, j = np.arange(10)[:, None], np.arange(10)[None, :]
  assert np.array_equal(d, (j <= i) & (j > i - 3))
  d2 = dense(na.NeighborhoodMask((5, 6), (2, 3), stride=(1, 3), causal=(True, False)))
  for t, u in itertools.product(range(30), range(30)):
    if d2[t, u]:
      assert u // 6 <= t // 6  # causal along the first dimension


def test_tile_map_is_exact_and_blocked_equals_reference_with_gradients(rng):
  m = na.NeighborhoodMask((8, 8), (3, 3), dilation=(1, 2))
  d = dense(m)
  kinds = np.asarray(m.block_kinds(64, 64, 8, 8))
  for a, b in itertools.product(range(8), range(8)):
    tile = d[8 * a : 8 * a + 8, 8 * b : 8 * b + 8]
    assert (kinds[a, b] == EMPTY) == (not tile.any())
    assert (kinds[a, b] == FULL) == tile.all()
  assert (kinds == EMPTY).mean() > 0.4  # most tiles are skipped
  kq, kk, kv, kw = jax.random.split(rng, 4)
  q = normal(kq, (1, 64, 2, 8), jnp.float64)
  k, v = normal(kk, (1, 64, 1, 8), jnp.float64), normal(kv, (1, 64, 1, 8), jnp.float64)
  w = normal(kw, (1, 64, 2, 8), jnp.float64)

  def loss(q, k, v, impl):
    out = na.gna(q, k, v, grid=(8, 8), window=3, dilation=(1, 2), implementation=impl)
    return jnp.sum(out * w)

  grad = jax.jit(jax.value_and_grad(loss, (0, 1, 2)), static_argnums=3)
  want, want_g = grad(q, k, v, "reference")
  got, got_g = grad(*(a.astype(jnp.float32) for a in (q, k, v)), "xla")
  close(got, want, 1e-4)
  for g, r in zip(got_g, want_g, strict=True):
    close(g, r, 1e-4)
  close(
    na.gna(q, k, v, grid=(64,), window=64),
    dot_product_attention(q, k, v),
    1e-12,
  )


def test_nnx_kind_and_bad_input(rng):
  layer = Attention(
    d_model=16,
    num_heads=2,
    kind="gna",
    causal=False,
    positions="none",
    options={"window": 3, "gna_grid": "3,4"},
    rngs=nnx.Rngs(0),
  )
  x = normal(rng, (2, 12, 16), jnp.float32)
  assert layer(x).shape == (2, 12, 16)
  with pytest.raises(ValueError, match="dilation·window must be <= the extent"):
    na.NeighborhoodMask((6,), (4,), dilation=(2,))
  with pytest.raises(ValueError, match="stride must be <= window"):
    na.NeighborhoodMask((6,), (2,), stride=(3,))
  with pytest.raises(ValueError, match="needs T = S = 12"):
    q = jnp.ones((1, 10, 1, 4))
    dot_product_attention(q, q, q, mask=na.NeighborhoodMask((3, 4), (2, 2)))
  with pytest.raises(NotImplementedError, match="'pallas_tpu' is not built"):
    q = jnp.ones((1, 12, 1, 4))
    na.gna(q, q, q, grid=(12,), window=3, implementation="pallas_tpu")
