"""BiFormer bi-level routing attention (``attn_jax.attention.biformer``).

Oracle: float64 naive softmax attention under the dense token mask of the same routes
(``pallas_kernels.block_sparse.dense_mask``), plus the LCE term; the routes themselves are
checked against a numpy top-k of the float64 region affinity.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx
from test_block_sparse import assert_matches_oracle, oracle

from attn_jax.attention import biformer as bf
from attn_jax.attention import dot_product_attention
from attn_jax.nn import Attention
from pallas_kernels import block_sparse as kernel_lists


def _qkv(key, B=2, T=40, S=40, N=4, K=2, H=8, Hv=6, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(key, 3)
  return (
    normal(kq, (B, T, N, H), dtype),
    normal(kk, (B, S, K, H), dtype),
    normal(kv, (B, S, K, Hv), dtype),
  )


def _reference(q, k, v, region, routes, lce):
  B, T = q.shape[:2]
  S = k.shape[1]
  count = jnp.full(routes.shape[:3], routes.shape[-1], jnp.int32)
  vis = kernel_lists.dense_mask(count, routes, q_len=T, kv_len=S, block_size=region)
  out, _ = oracle(q, k, v, vis)
  if lce is not None:
    out = out + jnp.repeat(bf.local_context(v, lce), q.shape[2] // k.shape[2], axis=2)
  return out


@pytest.mark.parametrize(
  "dims, region, top_k", [((2, 40, 40, 4, 2, 8, 6), 8, 2), ((1, 37, 53, 2, 1, 8, 8), 5, 3)]
)
def test_matches_dense_masked_oracle_forward_and_grads(rng, dims, region, top_k):
  B, T, S, N, K, H, Hv = dims
  q, k, v = _qkv(rng, B, T, S, N, K, H, Hv)
  lce = 0.3 * normal(jax.random.fold_in(rng, 7), (5, K, Hv), jnp.float32) if S == T else None
  _, routes = bf.biformer(
    q, k, v, biformer_region=region, biformer_top_k=top_k, lce_weight=lce, return_routes=True
  )
  w = normal(jax.random.fold_in(rng, 3), (B, T, N, Hv), jnp.float32)

  assert_matches_oracle(
    lambda q, k, v: bf.biformer(
      q, k, v, biformer_region=region, biformer_top_k=top_k, lce_weight=lce
    ),
    lambda q, k, v: _reference(
      q, k, v, region, routes, None if lce is None else lce.astype(q.dtype)
    ),
    (q, k, v),
    w,
  )


def test_routes_are_the_top_k_region_affinities(rng):
  q, k, _ = _qkv(rng, B=2, T=48, S=48)
  idx, count = bf.biformer_route(q, k, region=8, top_k=3)
  assert idx.shape == (2, 1, 6, 3) and np.all(np.asarray(count) == 3)
  q64, k64 = np.asarray(q, np.float64), np.asarray(k, np.float64)
  qr = q64.reshape(2, 6, 8, 4, 8).mean(2)
  kr = np.repeat(k64.reshape(2, 6, 8, 2, 8).mean(2), 2, axis=2)
  aff = np.einsum("bqnh,bcnh->bqc", qr, kr)
  want = np.argsort(-aff, axis=-1)[..., :3]
  np.testing.assert_array_equal(np.sort(np.asarray(idx)[:, 0], -1), np.sort(want, -1))
  for row in np.asarray(idx).reshape(-1, 3):
    assert len(set(row.tolist())) == 3


def test_all_regions_routed_equals_full_attention_plus_lce(rng):
  """Catalog check: k = the number of regions equals full attention plus the conv term."""
  q, k, v = _qkv(rng, T=40, S=40)
  lce = normal(jax.random.fold_in(rng, 1), (5, 2, 6), jnp.float32)
  out = bf.biformer(q, k, v, biformer_region=8, biformer_top_k=99, lce_weight=lce)
  full = dot_product_attention(q, k, v, implementation="reference")
  want = full + jnp.repeat(bf.local_context(v, lce), 2, axis=2)
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)


def test_pallas_interpret_equals_xla(rng):
  """The routes as per-head lists on the TPU block-sparse kernel (TPU memory simulated)."""
  q, k, v = _qkv(rng, B=1, T=256, S=384, N=2, K=1, H=16, Hv=16)
  kw = dict(biformer_region=128, biformer_top_k=2)
  out = bf.biformer(q, k, v, implementation="pallas_interpret", **kw)
  ref = bf.biformer(q, k, v, implementation="xla", **kw)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


def test_regions_2d_round_trip_and_image_use(rng):
  x = normal(rng, (2, 8, 12, 3, 4), jnp.float32)  # [B, Hi, Wi, N, H]
  seq = bf.regions_2d(x, (4, 4))
  assert seq.shape == (2, 96, 3, 4)
  np.testing.assert_array_equal(seq[:, :16].reshape(2, 4, 4, 3, 4), x[:, :4, :4])
  np.testing.assert_array_equal(bf.unregions_2d(seq, (8, 12), (4, 4)), x)
  out = bf.biformer(seq, seq, seq, biformer_region=16, biformer_top_k=2)
  assert bf.unregions_2d(out, (8, 12), (4, 4)).shape == x.shape
  with pytest.raises(ValueError, match="must split into whole 5x4 regions"):
    bf.regions_2d(x, (5, 4))


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(biformer_region=0), "biformer_region must be an int >= 1"),
    (dict(biformer_top_k=True), "biformer_top_k must be an int >= 1"),
    (dict(lce_weight=jnp.zeros((5, 3, 6))), r"lce_weight must have shape \[W, K, Hv\]"),
    (dict(implementation="pallas"), "implementation must be one of"),
  ],
)
def test_bad_inputs(rng, kwargs, match):
  q, k, v = _qkv(rng)
  kw = {"biformer_region": 8, "biformer_top_k": 2, **kwargs}
  with pytest.raises(ValueError, match=match):
    bf.biformer(q, k, v, **kw)


def test_lce_needs_self_attention(rng):
  q, k, v = _qkv(rng, T=16, S=24)
  with pytest.raises(ValueError, match="needs S == T"):
    bf.biformer(
      q, k, v, biformer_region=8, biformer_top_k=2, lce_weight=jnp.zeros((5, 2, 6), jnp.float32)
    )


def test_nnx_layer(rng):
  opts = {"biformer_region": 4, "biformer_top_k": 2}
  layer = Attention(
    d_model=16, num_heads=2, kind="biformer", causal=False, options=opts, rngs=nnx.Rngs(0)
  )
  assert layer.lce[...].shape == (5, 2, 8)
  x = normal(rng, (2, 12, 16), jnp.float32)
  y = nnx.jit(lambda m, x: m(x))(layer, x)
  assert y.shape == x.shape and np.all(np.isfinite(np.asarray(y)))
  with pytest.raises(ValueError, match="bidirectional-only"):
    Attention(d_model=16, num_heads=2, kind="biformer", causal=True, rngs=nnx.Rngs(0))
  with pytest.raises(NotImplementedError, match="takes no segment ids"):
    layer(x, segment_ids_BT=jnp.ones((2, 12), jnp.int32))
