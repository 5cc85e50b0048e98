"""Music Transformer relative attention (rel_skew): the skew equals an explicit gather of
q_i·e_(i−j); the skew's extra memory is linear in T (the gather's is T²·H); the layer equals
a float64 numpy oracle, and the band + far form (blocked xla and Pallas-interpret flash for
the far keys) equals the dense reference with gradients and compiles without a T×T tensor;
the NNX layer; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import SegmentMask, registry, sliding_window
from attn_jax.attention import rel_skew as rel_lib
from attn_jax.nn.rel_skew import RelSkewAttention
from attn_jax.nn.transformer import Transformer

D, N = 16, 4


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def gathered(q, rel):
  """q_i · e_(min(i−j, L−1)) for j <= i by an explicit [T, T, H] gather (0 above)."""
  T, L = q.shape[1], rel.shape[1]
  dist = jnp.clip(jnp.arange(T)[:, None] - jnp.arange(T)[None, :], 0, L - 1)
  e = rel[:, dist]  # [N, T, T, H]
  s = jnp.einsum("btnh,ntsh->bnts", q, e)
  return jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, 0)


@pytest.mark.parametrize("L", [40, 7])
def test_skew_equals_gather(rng, L):
  kq, ke = jax.random.split(rng)
  q = normal(kq, (2, 23, N, 8), jnp.float64)
  rel = normal(ke, (N, L, 8), jnp.float64)
  close(rel_lib.relative_logits(q, rel), gathered(q, rel), 1e-12)


def test_skew_memory_is_linear_beyond_the_logits(rng):
  T, H = 512, 32
  q = jax.ShapeDtypeStruct((1, T, 1, H), jnp.float32)
  rel = jax.ShapeDtypeStruct((1, T, H), jnp.float32)
  logits_bytes = T * T * 4

  def temp_bytes(fn):
    return jax.jit(fn).lower(q, rel).compile().memory_analysis().temp_size_in_bytes

  skew_extra = temp_bytes(rel_lib.relative_logits) - 2 * logits_bytes
  gather = temp_bytes(gathered)
  assert skew_extra <= 4 * T * (H + 2) * 4  # O(T·H) beyond (at most two) T×T buffers
  assert gather >= T * T * H * 4 // 2  # the gather holds a T×T×H tensor


def np_oracle(params, x, ids=None):
  p = {n: np.asarray(a, np.float64) for n, a in params.items()}
  x = np.asarray(x, np.float64)
  B, T, _ = x.shape
  K = p["w_k"].shape[1]
  G = N // K
  H = p["w_q"].shape[-1]
  L = p["rel"].shape[1]
  q = np.einsum("btd,dnh->btnh", x, p["w_q"])
  k = np.repeat(np.einsum("btd,dkh->btkh", x, p["w_k"]), G, 2)
  v = np.repeat(np.einsum("btd,dkv->btkv", x, p["w_v"]), G, 2)
  out = np.zeros((B, T, N, v.shape[-1]))
  for b in range(B):
    for n in range(N):
      for i in range(T):
        js = [j for j in range(i + 1) if ids is None or (ids[b, j] == ids[b, i] and ids[b, i])]
        if not js:
          continue
        s = np.array([q[b, i, n] @ (k[b, j, n] + p["rel"][n, min(i - j, L - 1)]) for j in js])
        w = np.exp((s - s.max()) / np.sqrt(H))
        out[b, i, n] = (w / w.sum()) @ v[b, js, n]
  return np.einsum("btnv,nvd->btd", out, p["w_o"])


@pytest.mark.parametrize("rel_max", [6, 1, 20])
def test_layer_equals_oracle_and_band_and_far_gradients(rng, rel_max):
  """rel_max 6 < T: band + far; 1: far only (constant relative term); 20 > T: band only."""
  kp, kx, kw = jax.random.split(rng, 3)
  params = registry.init_layer(
    "rel_skew", kp, d_model=D, num_heads=N, num_kv_heads=2, rel_max=rel_max, dtype=jnp.float64
  )
  x = normal(kx, (2, 12, D), jnp.float64)
  ids = np.array([[1] * 7 + [2] * 5, [1] * 10 + [0] * 2])
  mask = SegmentMask(jnp.asarray(ids), jnp.asarray(ids))
  close(
    rel_lib.rel_skew(params, x, causal=True, mask=mask, implementation="reference"),
    np_oracle(params, x, ids),
    1e-10,
  )
  w = normal(kw, (2, 12, D), jnp.float64)

  def loss(p, x, impl):
    return jnp.sum(rel_lib.rel_skew(p, x, causal=True, mask=mask, implementation=impl) * w)

  want, want_g = jax.value_and_grad(loss, (0, 1))(params, x, "reference")
  f32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  got, got_g = jax.jit(jax.value_and_grad(loss, (0, 1)), static_argnums=2)(
    f32, x.astype(jnp.float32), "xla"
  )
  close(got, want, 1e-4)
  for g, r in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
    close(g, r, 5e-4)
  # Padding rows (id 0) stay exactly zero and finite.
  out = rel_lib.rel_skew(f32, x.astype(jnp.float32), causal=True, mask=mask)
  assert np.all(np.isfinite(np.asarray(out))) and float(jnp.abs(out[1, 10:]).max()) == 0.0


def test_band_blocks_and_far_part_at_a_longer_length(rng):
  """T = 290 spans three band blocks of 128 rows (the last one padded)."""
  kq, kk, kv, ke, kw = jax.random.split(rng, 5)
  T = 290
  q = normal(kq, (1, T, 2, 8), jnp.float64)
  k, v = normal(kk, (1, T, 1, 8), jnp.float64), normal(kv, (1, T, 1, 8), jnp.float64)
  rel = normal(ke, (2, 40, 8), jnp.float64)
  ids = jnp.asarray([[1] * 150 + [2] * 130 + [0] * 10])
  mask = SegmentMask(ids, ids)
  w = normal(kw, (1, T, 2, 8), jnp.float64)

  def loss(q, k, v, rel, impl):
    return jnp.sum(rel_lib.rel_skew_attention(q, k, v, rel, mask=mask, implementation=impl) * w)

  grad = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3)), static_argnums=4)
  want, want_g = grad(q, k, v, rel, "reference")
  f32 = [a.astype(jnp.float32) for a in (q, k, v, rel)]
  got, got_g = grad(*f32, "xla")
  close(got, want, 1e-4)
  for g, r in zip(got_g, want_g, strict=True):
    close(g, r, 5e-4)


def test_far_part_runs_on_the_pallas_kernel(rng):
  kp, kx = jax.random.split(rng)
  params = registry.init_layer("rel_skew", kp, d_model=D, num_heads=N, rel_max=5)
  x = normal(kx, (1, 20, D), jnp.float32)
  close(
    rel_lib.rel_skew(params, x, causal=True, implementation="pallas_interpret"),
    rel_lib.rel_skew(params, x, causal=True, implementation="reference"),
    2e-5,
  )


def test_band_and_far_form_holds_no_t_by_t_tensor():
  T, N_, H, L = 2048, 2, 32, 64
  q = jax.ShapeDtypeStruct((1, T, N_, H), jnp.float32)
  rel = jax.ShapeDtypeStruct((N_, L, H), jnp.float32)

  def fast(q, rel):
    return rel_lib.rel_skew_attention(q, q, q, rel)

  temp = jax.jit(fast).lower(q, rel).compile().memory_analysis().temp_size_in_bytes
  assert temp < N_ * T * T * 4 // 4, temp  # a quarter of one [N, T, T] float32 tensor


def test_nnx_layer_and_bad_input(rng):
  model = Transformer(
    num_layers=2,
    attention="rel_skew",
    d_model=D,
    num_heads=N,
    positions="learned",
    mlp="none",
    options={**RelSkewAttention.DEFAULT_OPTIONS, "rel_max": 8},
    rngs=nnx.Rngs(0),
  )
  layer = model.blocks[0].attn
  assert layer.rel[...].shape == (N, 8, D // N)
  x = normal(rng, (2, 6, D), jnp.float32)
  close(layer(x), rel_lib.rel_skew(layer.param_tree(), x, causal=True), 1e-6)
  params = registry.init_layer("rel_skew", rng, d_model=D, num_heads=N)
  with pytest.raises(ValueError, match="rel_skew is causal self-attention"):
    rel_lib.rel_skew(params, x, causal=False)
  with pytest.raises(ValueError, match="implementation must be one of"):
    rel_lib.rel_skew(params, x, causal=True, implementation="flash")
  with pytest.raises(ValueError, match="takes only a SegmentMask as an extra mask"):
    rel_lib.rel_skew(params, x, causal=True, mask=sliding_window(3))
  with pytest.raises(ValueError, match="not 'rope'"):
    RelSkewAttention(d_model=D, num_heads=N, positions="rope", rngs=nnx.Rngs(0))
