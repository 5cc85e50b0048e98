"""Twins LSA / GSA (``window_2d``) and DaViT channel attention (``davit``): LSA equals
attention under the block-diagonal window mask (float64 oracle, values and gradients); a
whole-image window and a 1x1 sub-sampling window are global attention; GSA equals attention
over explicitly sub-sampled keys and values; channel attention equals attention on the
transposed token matrices; the NNX kinds cycle their modes by depth."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx
from test_block_sparse import assert_close, assert_matches_oracle, oracle

from attn_jax.attention import dot_product_attention
from attn_jax.attention import window_2d as w2d
from attn_jax.nn import Transformer

GRID = (6, 8)  # T = 48


def _qkv(key, B=2, T=48, N=4, K=2, H=8, Hv=8):
  kq, kk, kv = jax.random.split(key, 3)
  return (
    normal(kq, (B, T, N, H), jnp.float32),
    normal(kk, (B, T, K, H), jnp.float32),
    normal(kv, (B, T, K, Hv), jnp.float32),
  )


def test_lsa_equals_block_diagonal_window_mask_with_gradients(rng):
  q, k, v = _qkv(rng)
  window = (3, 4)
  r, c = np.divmod(np.arange(48), 8)
  win = (r // 3) * 2 + c // 4
  vis = jnp.asarray(win[:, None] == win[None, :])[None, None]
  w = normal(jax.random.fold_in(rng, 1), q.shape, jnp.float32)

  assert_matches_oracle(
    lambda q, k, v: w2d.window_2d(q, k, v, w2d_grid=GRID, w2d_window=window),
    lambda q, k, v: oracle(q, k, v, vis)[0],
    (q, k, v),
    w,
  )


def test_whole_image_window_and_unit_ratio_are_global(rng):
  q, k, v = _qkv(rng)
  full = dot_product_attention(q, k, v, implementation="reference")
  lsa = w2d.window_2d(q, k, v, w2d_grid=GRID, w2d_window=GRID)
  gsa = w2d.window_2d(q, k, v, w2d_grid=GRID, w2d_mode="global", w2d_ratio=1)
  np.testing.assert_allclose(lsa, full, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(gsa, full, atol=2e-5, rtol=2e-5)


def test_gsa_equals_attention_over_explicit_subsampled_keys(rng):
  q, k, v = _qkv(rng)
  wk = normal(jax.random.fold_in(rng, 1), (4, 2, 8), jnp.float32)
  wv = normal(jax.random.fold_in(rng, 2), (4, 2, 8), jnp.float32)
  out = w2d.window_2d(
    q, k, v, w2d_grid=GRID, w2d_mode="global", w2d_ratio=2, gsa_k_weight=wk, gsa_v_weight=wv
  )
  img = lambda x: np.asarray(x, np.float64).reshape(2, 6, 8, 2, 8)  # noqa: E731

  def sub(x, w):
    x = img(x)
    rows = []
    for i in range(3):
      for j in range(4):
        win = x[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(2, 4, 2, 8)
        rows.append(np.einsum("bikh,ikh->bkh", win, np.asarray(w, np.float64)))
    return jnp.asarray(np.stack(rows, 1))

  want = dot_product_attention(
    q.astype(jnp.float64), sub(k, wk), sub(v, wv), implementation="reference"
  )
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)


def test_channel_attention_is_attention_on_transposed_tokens(rng):
  q, k, v = _qkv(rng)
  w = normal(jax.random.fold_in(rng, 1), q.shape, jnp.float32)

  def loss(impl):
    def f(q, k, v):
      out = w2d.davit(q, k, v, davit_mode="channel", implementation=impl)
      return jnp.sum(out * w.astype(out.dtype)), out

    return f

  grads, out = jax.jit(jax.grad(loss("xla"), (0, 1, 2), has_aux=True))(q, k, v)
  r_grads, r_out = jax.grad(loss("reference"), (0, 1, 2), has_aux=True)(
    *(a.astype(jnp.float64) for a in (q, k, v))
  )
  # Explicit channel groups for one head: A = softmax(Q^T K / sqrt(H)), out = V A^T.
  Q, Kh, V = (np.asarray(x, np.float64)[0, :, h, :] for x, h in ((q, 1), (k, 0), (v, 0)))
  s = Q.T @ Kh / np.sqrt(8)
  a = np.exp(s - s.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(r_out)[0, :, 1], V @ a.T, atol=1e-10)
  assert_close("out", out, r_out)
  for name, g, rg in zip(("dq", "dk", "dv"), grads, r_grads, strict=True):
    assert_close(name, g, rg)


def test_nnx_kinds_cycle_their_modes_by_depth(rng):
  opts = {"w2d_grid": "4,4", "w2d_window": "2,2", "w2d_ratio": "2,2"}
  stack = Transformer(
    num_layers=2,
    attention="window_2d",
    d_model=16,
    num_heads=2,
    causal=False,
    positions="none",
    options=opts,
    rngs=nnx.Rngs(0),
  )
  a1, a2 = (b.attn for b in stack.blocks)
  assert (a1._cycled("w2d_mode"), a2._cycled("w2d_mode")) == ("local", "global")
  assert not hasattr(a1, "gsa_k") and a2.gsa_k[...].shape == (4, 2, 8)
  x = normal(rng, (2, 16, 16), jnp.float32)
  assert np.all(np.isfinite(np.asarray(stack(x))))
  davit_stack = Transformer(
    num_layers=2,
    attention="davit",
    d_model=16,
    num_heads=2,
    causal=False,
    positions="none",
    options={"w2d_grid": "4,4", "w2d_window": "2,2"},
    rngs=nnx.Rngs(0),
  )
  modes = [b.attn._cycled("davit_mode") for b in davit_stack.blocks]
  assert modes == ["spatial", "channel"]
  assert np.all(np.isfinite(np.asarray(davit_stack(x))))


def test_bad_inputs(rng):
  q, k, v = _qkv(rng)
  with pytest.raises(ValueError, match="must split into whole"):
    w2d.window_2d(q, k, v, w2d_grid=GRID, w2d_window=5)
  with pytest.raises(ValueError, match="must hold T=48"):
    w2d.window_2d(q, k, v, w2d_grid=(5, 5))
  with pytest.raises(ValueError, match="w2d_mode must be one of"):
    w2d.window_2d(q, k, v, w2d_mode="both")
  with pytest.raises(ValueError, match=r"sub-sampling weight must have shape"):
    w2d.window_2d(
      q, k, v, w2d_grid=GRID, w2d_mode="global", w2d_ratio=2, gsa_k_weight=jnp.ones((3, 2, 8))
    )
  with pytest.raises(ValueError, match="davit_mode must be"):
    w2d.davit(q, k, v, davit_mode="both")
  with pytest.raises(ValueError, match="Hv == H"):
    w2d.davit(*_qkv(rng, Hv=6), davit_mode="channel")
