"""Per-head window sizes (mw_mha): full windows give MHA; each head equals its windowed
attention run alone (non-causal and causal, GQA); the blocked path equals the reference with
gradients; the NNX kind; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import CausalMask, dot_product_attention
from attn_jax.attention import multi_window as mw
from attn_jax.attention.masks import window_blocks
from attn_jax.nn.attention import Attention


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def qkv(key, T=30, N=4, K=2, dtype=jnp.float64):
  kq, kk, kv = jax.random.split(key, 3)
  return (
    normal(kq, (2, T, N, 8), dtype),
    normal(kk, (2, T, K, 8), dtype),
    normal(kv, (2, T, K, 8), dtype),
  )


def test_full_windows_are_mha(rng):
  q, k, v = qkv(rng)
  for causal in (False, True):
    mask = CausalMask() if causal else None
    close(
      mw.mw_mha(q, k, v, windows=(30, 0, 64, 0), causal=causal),
      dot_product_attention(q, k, v, mask=mask),
      1e-12,
    )


@pytest.mark.parametrize("causal", [False, True])
def test_each_head_is_its_windowed_attention(rng, causal):
  q, k, v = qkv(rng)
  windows = (5, 0, 6, 5)
  out = mw.mw_mha(q, k, v, windows=windows, causal=causal)
  for n, w in enumerate(windows):
    mask = window_blocks(w) if w else None
    if causal:
      mask = CausalMask() if mask is None else mask & CausalMask()
    alone = dot_product_attention(
      q[:, :, n : n + 1], k[:, :, n // 2 : n // 2 + 1], v[:, :, n // 2 : n // 2 + 1], mask=mask
    )
    close(out[:, :, n], alone[:, :, 0], 1e-12)


def test_blocked_equals_reference_with_gradients(rng):
  q, k, v = qkv(rng)
  w = normal(jax.random.fold_in(rng, 1), q.shape, jnp.float64)

  def loss(q, k, v, impl):
    return jnp.sum(mw.mw_mha(q, k, v, windows=(4, 8, 0, 4), causal=True, implementation=impl) * w)

  grad = jax.jit(jax.value_and_grad(loss, (0, 1, 2)), static_argnums=3)
  want, want_g = grad(q, k, v, "reference")
  got, got_g = grad(*(a.astype(jnp.float32) for a in (q, k, v)), "xla")
  close(got, want, 1e-4)
  for g, r in zip(got_g, want_g, strict=True):
    close(g, r, 1e-4)


def test_nnx_kind_and_bad_input(rng):
  layer = Attention(
    d_model=16,
    num_heads=4,
    kind="mw_mha",
    positions="none",
    options={"mw_windows": "2,0,4,2"},
    rngs=nnx.Rngs(0),
  )
  x = normal(rng, (2, 12, 16), jnp.float32)
  assert layer(x).shape == (2, 12, 16)
  q, k, v = qkv(rng)
  with pytest.raises(ValueError, match="one int >= 0 per query head"):
    mw.mw_mha(q, k, v, windows=(4, 4))
  with pytest.raises(ValueError, match="needs S == T"):
    mw.mw_mha(q[:, :10], k, v, windows=(4, 4, 4, 4))
