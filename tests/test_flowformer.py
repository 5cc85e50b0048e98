"""Flow-Attention (flowformer): the factored forms equal the flows summed on the materialised
capacity matrix (non-causal self and cross, causal; float64 and float32; gradients); the
causal prefix-sum form equals recomputing the non-causal formula on each prefix where its
prefix means are exact (stationary queries and keys), forward and gradients, and only
approximates it otherwise; causality through gradients; the NNX layer both ways; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import flowformer as ff
from attn_jax.nn.transformer import Transformer

flow = jax.jit(ff.flowformer_attention, static_argnames=("causal", "chunk_size", "implementation"))


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def qkv(key, B=2, T=23, S=23, N=4, K=2, H=8, Hv=6, dtype=jnp.float64):
  kq, kk, kv = jax.random.split(key, 3)
  return (
    normal(kq, (B, T, N, H), dtype) * 2,
    normal(kk, (B, S, K, H), dtype) * 2,
    normal(kv, (B, S, K, Hv), dtype),
  )


@pytest.mark.parametrize(
  "causal,T,S,dtype,tol",
  [
    (False, 23, 23, jnp.float64, 1e-12),
    (False, 9, 30, jnp.float64, 1e-12),
    (True, 23, 23, jnp.float64, 1e-10),
    (True, 29, 29, jnp.float32, 1e-5),
  ],
)
def test_factored_equals_materialised(rng, causal, T, S, dtype, tol):
  q, k, v = qkv(rng, T=T, S=S, dtype=dtype)
  fast = flow(q, k, v, causal=causal, chunk_size=8)
  oracle = flow(q, k, v, causal=causal, implementation="reference")
  assert fast.shape == (2, T, 4, 6) and fast.dtype == dtype
  close(fast, oracle, tol)
  if dtype == jnp.float32:  # float32 against the float64 oracle
    q64, k64, v64 = (a.astype(jnp.float64) for a in (q, k, v))
    close(fast, flow(q64, k64, v64, causal=causal, implementation="reference"), tol)


def test_causal_gradients_equal_the_materialised_flows(rng):
  q, k, v = qkv(rng, T=19, S=19)
  w = normal(jax.random.fold_in(rng, 1), (2, 19, 4, 6), jnp.float64)

  def loss(q, k, v, impl):
    return jnp.sum(
      jnp.sin(ff.flowformer_attention(q, k, v, causal=True, chunk_size=8, implementation=impl)) * w
    )

  grad = jax.jit(jax.grad(loss, (0, 1, 2)), static_argnums=3)
  for a, b in zip(grad(q, k, v, "xla"), grad(q, k, v, "reference"), strict=True):
    assert np.all(np.isfinite(np.asarray(a))) and float(jnp.abs(a).max()) > 0
    close(a, b, 1e-9)


def _per_prefix(q, k, v):
  """Row t of the non-causal formula on the prefix [0, t], for every t (the catalog's check)."""
  T = q.shape[1]
  return jnp.stack(
    [ff.flowformer_attention(q[:, : t + 1], k[:, : t + 1], v[:, : t + 1])[:, t] for t in range(T)],
    axis=1,
  )


def test_causal_equals_per_prefix_noncausal_for_stationary_queries_and_keys(rng):
  T = 5
  kq, kk, kv = jax.random.split(rng, 3)
  q0 = normal(kq, (2, 1, 4, 8), jnp.float64) * 2  # one query row per (batch, head), any value
  k0 = normal(kk, (2, 1, 2, 8), jnp.float64) * 2
  v = normal(kv, (2, T, 2, 6), jnp.float64)
  w = normal(jax.random.fold_in(rng, 3), (2, T, 4, 6), jnp.float64)

  def tied(q0, k0):
    return jnp.broadcast_to(q0, (2, T, 4, 8)), jnp.broadcast_to(k0, (2, T, 2, 8))

  def causal(q0, k0, v):
    return ff.flowformer_attention(*tied(q0, k0), v, causal=True, chunk_size=4)

  def prefix(q0, k0, v):
    return _per_prefix(*tied(q0, k0), v)

  close(jax.jit(causal)(q0, k0, v), jax.jit(prefix)(q0, k0, v), 1e-12)
  grads = [
    jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * w), (0, 1, 2)))(q0, k0, v)
    for f in (causal, prefix)
  ]
  for a, b in zip(*grads, strict=True):
    assert np.all(np.isfinite(np.asarray(a))) and float(jnp.abs(a).max()) > 0
    close(a, b, 1e-10)


def test_causal_only_approximates_per_prefix_on_general_inputs(rng):
  """The per-prefix means differ from the means up to each token: an approximation there
  (documented), exact at t = 0 where both see one token."""
  q, k, v = qkv(rng, T=6, S=6)
  causal = flow(q, k, v, causal=True, chunk_size=4)
  prefix = jax.jit(_per_prefix)(q, k, v)
  close(causal[:, 0], prefix[:, 0], 1e-12)
  gap = float(jnp.abs(causal[:, 1:] - prefix[:, 1:]).max())
  assert 1e-4 < gap < 0.5 * float(jnp.abs(prefix).max())


def test_causal_through_gradients(rng):
  q, k, v = qkv(rng, T=10, S=10)
  t = 6

  def row(q, k, v):
    return jnp.sum(ff.flowformer_attention(q, k, v, causal=True, chunk_size=4)[:, t])

  for g in jax.jit(jax.grad(row, (0, 1, 2)))(q, k, v):
    assert float(jnp.abs(g[:, t + 1 :]).max()) == 0.0
    assert float(jnp.abs(g[:, t]).max()) > 0.0


@pytest.mark.parametrize("causal", [True, False])
def test_nnx_layer(rng, causal):
  model = Transformer(
    num_layers=1,
    attention="flowformer",
    d_model=16,
    num_heads=2,
    causal=causal,
    positions="none",
    mlp="none",
    options={"flow_chunk": 4},
    rngs=nnx.Rngs(0),
  )
  x = normal(rng, (2, 10, 16), jnp.float32)
  y = nnx.jit(lambda m, xx: m(xx))(model, x)
  assert y.shape == (2, 10, 16) and np.all(np.isfinite(np.asarray(y)))
  attn = model.blocks[0].attn
  h = model.blocks[0].attn_norm(x)
  call = nnx.jit(lambda m, h: m(h))
  fast = call(attn, h)
  attn.implementation = "reference"
  close(call(attn, h), fast, 1e-5)
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(model)
  assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(nnx.state(grads)))
  with pytest.raises(NotImplementedError, match="segment ids"):
    attn(h, segment_ids_BT=jnp.ones((2, 10), jnp.int32))


def test_bad_inputs(rng):
  q, k, v = qkv(rng, T=8, S=8)
  with pytest.raises(ValueError, match="needs S == T"):
    ff.flowformer_attention(q, k[:, :5], v[:, :5], causal=True)
  with pytest.raises(ValueError, match="implementation must be one of"):
    ff.flowformer_attention(q, k, v, implementation="pallas_tpu")
  with pytest.raises(ValueError, match="chunk_size must be"):
    ff.flowformer_attention(q, k, v, causal=True, chunk_size=0)
  with pytest.raises(ValueError, match="causal must be a bool"):
    ff.flowformer_attention(q, k, v, causal=1)
  with pytest.raises(ValueError, match="multiple of the number of kv heads"):
    ff.flowformer_attention(q[:, :, :3], k, v)
  with pytest.raises(ValueError, match="v must have shape"):
    ff.flowformer_attention(q, k, v[:, :7])
  with pytest.raises(ValueError, match="positions must be one of"):
    Transformer(
      num_layers=1,
      attention="flowformer",
      d_model=16,
      num_heads=2,
      positions="rope",
      rngs=nnx.Rngs(0),
    )
