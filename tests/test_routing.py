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
  _check_nnx_kind(rng, {"routing_clusters": 3})


def _check_nnx_kind(rng, options):
  """The NNX kind runs finite and sows the k-means loss; returns the layer and its input."""
  layer = Attention(
    d_model=16, num_heads=2, kind="routing_transformer", options=options, rngs=nnx.Rngs(0)
  )
  x = normal(rng, (2, 12, 16), jnp.float32)
  y, inter = nnx.capture(layer, nnx.Intermediate)(x)
  assert np.all(np.isfinite(np.asarray(y)))
  leaves = jax.tree_util.tree_flatten_with_path(inter)[0]
  assert any("aux_loss" in jax.tree_util.keystr(p) for p, _ in leaves)
  return layer, x


# -- nearest mode (strictly causal) ----------------------------------------------------


def _nearest_oracle(q, k, v, mu, window):
  """Dense float64 softmax over same-cluster causal keys (plus the window), from scratch."""
  q, k, v, mu = (np.asarray(a, np.float64) for a in (q, k, v, mu))
  B, T, N, H = q.shape
  G = N // k.shape[2]
  k, v = np.repeat(k, G, 2), np.repeat(v, G, 2)

  def nearest(x):
    x = x - x.mean(-1, keepdims=True)
    x = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)
    return np.einsum("btnh,nch->bntc", x, mu).argmax(-1)  # [B, N, T]

  cq, ck = nearest(q), nearest(k)
  i, j = np.arange(T)[:, None], np.arange(T)[None, :]
  out = np.zeros(q.shape)
  for b in range(B):
    for n in range(N):
      vis = (cq[b, n][:, None] == ck[b, n][None, :]) & (j <= i)
      if window:
        vis |= (j <= i) & (j > i - window)
      s = np.where(vis, q[b, :, n] @ k[b, :, n].T / np.sqrt(H), -np.inf)
      top = np.where(vis.any(-1), s.max(-1), 0.0)[:, None]
      e = np.where(vis, np.exp(s - top), 0.0)
      out[b, :, n] = e @ v[b, :, n] / np.maximum(e.sum(-1, keepdims=True), 1e-300)
  return out, cq, ck


@pytest.mark.parametrize("window", [0, 5])
def test_nearest_matches_oracle_with_gradients(rng, window):
  q, k, v = _qkv(rng)
  mu = normal(jax.random.fold_in(rng, 1), (4, 3, 8), jnp.float32)
  want, cq, ck = _nearest_oracle(q, k, v, mu, window)
  out, (rq, rk) = rt.routing_attention(
    q, k, v, centroids=mu, routing_mode="nearest", routing_window=window, return_routes=True
  )
  np.testing.assert_array_equal(rq, cq)
  np.testing.assert_array_equal(rk, ck)
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
  assert len(np.unique(cq)) > 1  # several clusters are in use
  w = normal(jax.random.fold_in(rng, 2), q.shape, jnp.float32)

  def loss(impl, dtype):
    def f(q, k, v):
      o = rt.routing_attention(
        q,
        k,
        v,
        centroids=mu.astype(dtype),
        routing_mode="nearest",
        routing_window=window,
        implementation=impl,
      )
      return jnp.sum(o * w.astype(o.dtype))

    return f

  grads = jax.jit(jax.grad(loss("xla", jnp.float32), (0, 1, 2)))(q, k, v)
  r_grads = jax.grad(loss("reference", jnp.float64), (0, 1, 2))(
    *(a.astype(jnp.float64) for a in (q, k, v))
  )
  for g, rg in zip(grads, r_grads, strict=True):
    np.testing.assert_allclose(g, rg, atol=5e-5, rtol=5e-5)


def test_nearest_is_strictly_causal_and_one_cluster_is_causal(rng):
  q, k, v = _qkv(rng)
  mu = normal(jax.random.fold_in(rng, 1), (4, 3, 8), jnp.float32)
  t = 13  # replace every token after t: outputs up to t must not move
  q2, k2, v2 = (
    a.at[:, t + 1 :].set(normal(jax.random.fold_in(rng, 9 + i), a[:, t + 1 :].shape, a.dtype))
    for i, a in enumerate((q, k, v))
  )
  for mode, moved in (("nearest", False), ("balanced", True)):
    a = rt.routing_attention(q, k, v, centroids=mu, routing_mode=mode)
    b = rt.routing_attention(q2, k2, v2, centroids=mu, routing_mode=mode)
    change = float(jnp.abs(a[:, : t + 1] - b[:, : t + 1]).max())
    assert (change > 1e-3) == moved, (mode, change)  # balanced membership sees the future
  one = normal(rng, (4, 1, 8), jnp.float32)
  want = dot_product_attention(q, k, v, mask=CausalMask(), implementation="reference")
  for impl in ("xla", "reference"):
    out = rt.routing_attention(q, k, v, centroids=one, routing_mode="nearest", implementation=impl)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)


def test_nearest_centroid_updates_and_nnx_kind(rng):
  q, k, _ = _qkv(rng)
  mu = normal(rng, (4, 3, 8), jnp.float32)
  routes = (rt.assign(q, mu), rt.assign(k, mu))
  gq, gmu = jax.grad(lambda q, m: rt.kmeans_loss(q, k, m, routes), (0, 1))(q, mu)
  assert float(jnp.abs(gq).max()) == 0.0 and float(jnp.abs(gmu).max()) > 0.0
  new = rt.ema_update(q, k, mu, routes, decay=0.5)
  loss = lambda m: float(rt.kmeans_loss(q, k, m, routes))  # noqa: E731
  assert loss(new) < loss(mu)
  # A centroid nobody is routed to keeps its value.
  routes = (jnp.minimum(routes[0], 1), jnp.minimum(routes[1], 1))  # centroid 2 unused
  np.testing.assert_array_equal(rt.ema_update(q, k, mu, routes, decay=0.5)[:, 2], mu[:, 2])
  options = {"routing_clusters": 3, "routing_mode": "nearest", "routing_window": 4}
  layer, x = _check_nnx_kind(rng, options)
  # Causal through the layer: the gradient of output t reaches no later input.
  g = jax.grad(lambda x: layer(x)[:, 5].sum())(x)
  assert float(jnp.abs(g[:, 6:]).max()) == 0.0 and float(jnp.abs(g[:, :6]).max()) > 0.0


def test_nearest_bad_options(rng):
  q, k, v = _qkv(rng)
  mu = jnp.zeros((4, 3, 8))
  with pytest.raises(ValueError, match="routing_mode must be one of"):
    rt.routing_attention(q, k, v, centroids=mu, routing_mode="argmax")
  with pytest.raises(ValueError, match="routing_window must be >= 0"):
    rt.routing_attention(q, k, v, centroids=mu, routing_mode="nearest", routing_window=-1)
  with pytest.raises(ValueError, match="routing_window must be an int"):
    rt.routing_attention(q, k, v, centroids=mu, routing_mode="nearest", routing_window=2.5)
  with pytest.raises(ValueError, match="applies to routing_mode='nearest' only"):
    rt.routing_attention(q, k, v, centroids=mu, routing_window=4)
