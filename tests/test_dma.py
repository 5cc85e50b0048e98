"""Dynamic mask attention (``attn_jax.attention.dma``): the key expiry equals the brute-force
per-query top-w rule (recency breaks ties); the layer equals a float64 dense masked
reference with δ as a bias (values and gradients, the score parameters included); w >= T
with A = 0 is causal; equal scores give a sliding window; the TPU kernel path equals the
blocked path; the NNX kind."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import CausalMask, dot_product_attention, sliding_window
from attn_jax.attention import dma as dma_lib
from attn_jax.nn.attention import Attention


def _qkv(key, B=2, T=30, N=4, K=2, H=8, Hv=6):
  kq, kk, kv = jax.random.split(key, 3)
  return (
    normal(kq, (B, T, N, H), jnp.float32),
    normal(kk, (B, T, K, H), jnp.float32),
    normal(kv, (B, T, K, Hv), jnp.float32),
  )


def _kept_brute(delta_BKS, w, T):
  """bool [B, K, T, S]: query i keeps key j iff j <= i + S - T and fewer than w visible keys
  outrank j (higher δ, or equal δ and more recent)."""
  d = np.asarray(delta_BKS)
  B, K, S = d.shape
  kept = np.zeros((B, K, T, S), bool)
  for b, h, i in np.ndindex(B, K, T):
    p = i + S - T
    vis = np.arange(p + 1)
    order = sorted(vis, key=lambda j: (-d[b, h, j], -j))
    kept[b, h, i, order[:w]] = True
  return kept


def test_expiry_equals_the_brute_force_rule(rng):
  d = jnp.round(jax.random.normal(rng, (2, 3, 37)) * 2) / 2  # ties on purpose
  for w in (1, 4, 9):
    end = np.asarray(dma_lib.key_expiry(d, w, block=8))
    j = np.arange(37)
    i = np.arange(37)[:, None]
    kept = (j <= i) & (i < end[:, :, None, :])
    np.testing.assert_array_equal(kept, _kept_brute(d, w, 37))


def test_equals_dense_masked_reference_with_gradients(rng):
  q, k, v = _qkv(rng)
  kw_, ka = jax.random.split(jax.random.fold_in(rng, 1))
  w_ = 0.5 * normal(kw_, (2, 6), jnp.float32)
  a_ = jax.random.uniform(ka, (2,), jnp.float32, 0.5, 1.5)
  window = 7
  cot = normal(jax.random.fold_in(rng, 2), (2, 30, 4, 6), jnp.float32)
  delta = dma_lib.key_scores(v, w_, a_).transpose(0, 2, 1)
  kept = jnp.asarray(_kept_brute(delta, window, 30))

  def fast(q, k, v, w_, a_):
    return jnp.sum(dma_lib.dma(q, k, v, dma_w=w_, dma_a=a_, dma_window=window) * cot)

  def ref(q, k, v, w_, a_):
    d = dma_lib.key_scores(v, w_, a_).astype(q.dtype)  # [B, S, K]
    kr, vr = jnp.repeat(k, 2, 2), jnp.repeat(v, 2, 2)
    s = jnp.einsum("btnh,bsnh->bnts", q, kr) / np.sqrt(8)
    s = s + jnp.repeat(d.transpose(0, 2, 1), 2, 1)[:, :, None, :]
    s = jnp.where(jnp.repeat(kept, 2, 1), s, -jnp.inf)
    p = jax.nn.softmax(s, -1)
    return jnp.sum(jnp.einsum("bnts,bsnh->btnh", p, vr) * cot)

  args = (q, k, v, w_, a_)
  val, grads = jax.jit(jax.value_and_grad(fast, argnums=range(5)))(*args)
  args64 = tuple(x.astype(jnp.float64) for x in args)
  val_r, grads_r = jax.value_and_grad(ref, argnums=range(5))(*args64)
  np.testing.assert_allclose(val, val_r, rtol=1e-5)
  for g, gr in zip(grads, grads_r, strict=True):
    np.testing.assert_allclose(g, gr, atol=5e-5 * max(1.0, float(jnp.abs(gr).max())), rtol=0)


def test_limits_causal_and_sliding_window(rng):
  q, k, v = _qkv(rng)
  zeros_w, ones = jnp.zeros((2, 6)), jnp.ones((2,))
  out = dma_lib.dma(q, k, v, dma_w=zeros_w, dma_a=0 * ones, dma_window=30)
  want = dot_product_attention(q, k, v, mask=CausalMask(), implementation="reference")
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
  out = dma_lib.dma(q, k, v, dma_w=zeros_w, dma_a=ones, dma_window=5)
  want = dot_product_attention(q, k, v, mask=sliding_window(5), implementation="reference")
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)


def test_kernel_path_equals_blocked_path(rng):
  q, k, v = _qkv(rng, B=1, T=256, N=2, K=1, H=16, Hv=16)
  kw = dict(dma_w=0.3 * normal(rng, (1, 16), jnp.float32), dma_a=jnp.ones((1,)), dma_window=40)
  got = dma_lib.dma(q, k, v, implementation="pallas_interpret", **kw)
  want = dma_lib.dma(q, k, v, implementation="xla", **kw)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_bad_inputs_and_nnx_kind(rng):
  q, k, v = _qkv(rng)
  with pytest.raises(ValueError, match="dma_window must be an int >= 1"):
    dma_lib.dma(q, k, v, dma_w=jnp.zeros((2, 6)), dma_a=jnp.ones((2,)), dma_window=0)
  with pytest.raises(ValueError, match=r"dma_w must be \[K, Hv\]"):
    dma_lib.dma(q, k, v, dma_w=jnp.zeros((2, 5)), dma_a=jnp.ones((2,)), dma_window=3)
  layer = Attention(
    d_model=16, num_heads=2, kind="dma", options={"dma_window": 4}, rngs=nnx.Rngs(0)
  )
  x = normal(rng, (2, 12, 16), jnp.float32)
  assert np.all(np.isfinite(np.asarray(layer(x))))
  with pytest.raises(ValueError, match="causal-only"):
    Attention(d_model=16, num_heads=2, kind="dma", causal=False, rngs=nnx.Rngs(0))
