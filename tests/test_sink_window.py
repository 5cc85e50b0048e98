"""Sinks + recent window (sink_window): the visibility rule; n_sink = 0 is sliding_window and
w >= T is causal; the tile map is the first kv-block column plus the diagonal band (work
linear in T); decoding from the constant-size streaming cache equals the full row; the NNX
kind; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import (
  EMPTY,
  CausalMask,
  dot_product_attention,
  sink_window,
  sliding_window,
  streaming_cache_indices,
)
from attn_jax.nn.attention import Attention


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def test_rule_and_limits(rng):
  dense = np.asarray(sink_window(4, 3).dense(20, 20))
  i, j = np.arange(20)[:, None], np.arange(20)[None, :]
  assert np.array_equal(dense, ((j < 3) & (j <= i)) | ((i - 4 < j) & (j <= i)))
  kq, kk, kv = jax.random.split(rng, 3)
  q = normal(kq, (2, 25, 4, 8), jnp.float32)
  k, v = normal(kk, (2, 25, 2, 8), jnp.float32), normal(kv, (2, 25, 2, 8), jnp.float32)
  assert sink_window(5, 0) == sliding_window(5)
  close(
    dot_product_attention(q, k, v, mask=sink_window(25, 3)),
    dot_product_attention(q, k, v, mask=CausalMask()),
    1e-6,
  )
  close(
    dot_product_attention(q, k, v, mask=sink_window(6, 2), implementation="xla"),
    dot_product_attention(q, k, v, mask=sink_window(6, 2), implementation="reference"),
    2e-5,
  )


def test_tile_map_is_first_column_plus_band():
  kinds = np.asarray(sink_window(64, 4).block_kinds(1024, 1024, 64, 64))
  nonempty = kinds != EMPTY
  band = np.eye(16, dtype=bool) | np.eye(16, k=-1, dtype=bool)
  first = np.zeros((16, 16), bool)
  first[:, 0] = True
  assert np.array_equal(nonempty, band | first)
  counts = [int(sink_window(64, 4).block_lists(t, t, 64, 64)[0].sum()) for t in (1024, 2048)]
  assert counts == [3 * 16 - 3, 3 * 32 - 3]  # at most 3 tiles per q block: linear in T


def test_streaming_cache_is_constant_and_decodes_exactly(rng):
  w, n = 6, 3
  sizes = [len(streaming_cache_indices(t, w, n)) for t in (0, 4, 9, 50, 500)]
  assert sizes == [0, 4, 8, 8, 8]
  kq, kk, kv = jax.random.split(rng, 3)
  T = 30
  q = normal(kq, (1, T, 2, 8), jnp.float32)
  k, v = normal(kk, (1, T, 2, 8), jnp.float32), normal(kv, (1, T, 2, 8), jnp.float32)
  full = dot_product_attention(q, k, v, mask=sink_window(w, n))
  for t in (1, 5, 17, T - 1):
    keep = np.concatenate([streaming_cache_indices(t, w, n), [t]])  # the cache + the new key
    step = dot_product_attention(q[:, t : t + 1], k[:, keep], v[:, keep])
    close(step[:, 0], full[:, t], 1e-5)


def test_nnx_kind_and_bad_input(rng):
  layer = Attention(
    d_model=16,
    num_heads=2,
    kind="sink_window",
    positions="none",
    options={"window": 3, "sink_tokens": 2},
    rngs=nnx.Rngs(0),
  )
  x = normal(rng, (2, 12, 16), jnp.float32)
  swa = Attention(
    d_model=16,
    num_heads=2,
    kind="sliding_window",
    positions="none",
    options={"window": 3},
    rngs=nnx.Rngs(0),
  )
  y, y_swa = np.asarray(layer(x)), np.asarray(swa(x))
  close(y[:, :3], y_swa[:, :3], 1e-6)  # the first rows see the same keys
  assert not np.allclose(y[:, 6:], y_swa[:, 6:], atol=1e-4)  # later rows also see the sinks
  with pytest.raises(ValueError, match="num_sinks must be"):
    sink_window(4, -1)
  with pytest.raises(ValueError, match="window must be"):
    streaming_cache_indices(10, 0, 2)
