"""Routing attention (``attn_jax.attention.routing``): one cluster is causal attention; the
gathered clusters equal the dense per-cluster masks merged by log-sum-exp (float64, values
and gradients); routes are each centroid's top-w members; gather/scatter round-trips; the
k-means loss moves only the centroids and the EMA update moves them toward their members;
the NNX kind sows the k-means loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import CausalMask, dot_product_attention
from attn_jax.attention import routing as rt
from attn_jax.nn.attention import Attention


def _qkv(key, B=2, T=32, N=4, K=2, H=8):
  kq, kk, kv = jax.random.split(key, 3)
  return (
    normal(kq, (B, T, N, H), jnp.float32),
    normal(kk, (B, T, K, H), jnp.float32),
    normal(kv, (B, T, K, H), jnp.float32),
  )


def test_one_cluster_is_causal(rng):
  q, k, v = _qkv(rng)
  mu = normal(rng, (4, 1, 8), jnp.float32)
  want = dot_product_attention(q, k, v, mask=CausalMask(), implementation="reference")
  for impl in ("xla", "reference"):
    out = rt.routing_attention(q, k, v, centroids=mu, implementation=impl)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)


def test_gathered_clusters_equal_dense_masks_with_gradients(rng):
  q, k, v = _qkv(rng)
  mu = normal(jax.random.fold_in(rng, 1), (4, 4, 8), jnp.float32)
  w = normal(jax.random.fold_in(rng, 2), q.shape, jnp.float32)

  def loss(impl):
    def f(q, k, v):
      out = rt.routing_attention(q, k, v, centroids=mu.astype(q.dtype), implementation=impl)
      return jnp.sum(out * w.astype(out.dtype)), out

    return f

  grads, out = jax.jit(jax.grad(loss("xla"), (0, 1, 2), has_aux=True))(q, k, v)
  r_grads, r_out = jax.grad(loss("reference"), (0, 1, 2), has_aux=True)(
    *(a.astype(jnp.float64) for a in (q, k, v))
  )
  np.testing.assert_allclose(out, r_out, atol=2e-5, rtol=2e-5)
  for g, rg in zip(grads, r_grads, strict=True):
    np.testing.assert_allclose(g, rg, atol=5e-5, rtol=5e-5)
  assert not np.allclose(out, dot_product_attention(q, k, v, mask=CausalMask()), atol=1e-3)


def test_routes_and_round_trip(rng):
  q, _, _ = _qkv(rng)
  mu = normal(rng, (4, 4, 8), jnp.float32)
  r = np.asarray(rt.route(q, mu, 8))
  score = np.einsum("btnh,nch->bnct", np.asarray(rt.normalize(q)), np.asarray(mu))
  want = np.sort(np.argsort(-score, -1)[..., :8], -1)
  np.testing.assert_array_equal(r, want)
  # Scatter of gathered positions (lse 0) returns each routed position's own index.
  pos = jnp.broadcast_to(jnp.asarray(r, jnp.float32)[..., None], (*r.shape, 1))
  back = np.asarray(rt._merge(pos, jnp.zeros(r.shape), jnp.asarray(r), 32))[..., 0]
  routed = np.zeros((2, 4, 32), bool)
  np.put_along_axis(routed, r.reshape(2, 4, -1), True, axis=-1)
  np.testing.assert_array_equal(back[routed], np.broadcast_to(np.arange(32), back.shape)[routed])
  assert np.all(back[~routed] == 0)


def test_centroid_updates(rng):
  q, k, _ = _qkv(rng)
  mu = normal(rng, (4, 4, 8), jnp.float32)
  routes = (rt.route(q, mu, 8), rt.route(k, mu, 8))
  gq, gmu = jax.grad(lambda q, m: rt.kmeans_loss(q, k, m, routes), (0, 1))(q, mu)
  assert float(jnp.abs(gq).max()) == 0.0 and float(jnp.abs(gmu).max()) > 0.0
  new = rt.ema_update(q, k, mu, routes, decay=0.5)
  loss = lambda m: float(rt.kmeans_loss(q, k, m, routes))  # noqa: E731
  assert loss(new) < loss(mu)


def test_bad_inputs_and_nnx_kind(rng):
  q, k, v = _qkv(rng)
  with pytest.raises(ValueError, match="centroids must be"):
    rt.routing_attention(q, k, v, centroids=jnp.zeros((3, 2, 8)))
  with pytest.raises(ValueError, match="1 <= C <= T"):
    rt.routing_attention(q, k, v, centroids=jnp.zeros((4, 40, 8)))
  layer = Attention(
    d_model=16,
    num_heads=2,
    kind="routing_transformer",
    options={"routing_clusters": 3},
    rngs=nnx.Rngs(0),
  )
  x = normal(rng, (2, 12, 16), jnp.float32)
  y, inter = nnx.capture(layer, nnx.Intermediate)(x)
  assert np.all(np.isfinite(np.asarray(y)))
  leaves = jax.tree_util.tree_flatten_with_path(inter)[0]
  assert any("aux_loss" in jax.tree_util.keystr(p) for p, _ in leaves)
