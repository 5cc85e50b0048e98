"""The (gated) delta rule (delta_rule, gated_delta): the WY chunk form equals the token-scan
oracle (chunk sizes, strong gates, GQA, packing) with gradients of q, k, v, β, the decay and
the initial state; two halves with the carried state equal one pass and decoding equals the
prefill; β = 0 leaves the state unchanged (gated: pure decay); α = 1 is delta_rule; with
orthonormal keys and β = 1 a read returns the stored value and a rewrite replaces it (linear
attention adds); bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal

from attn_jax.attention import delta as dl
from attn_jax.attention import linear as lin


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def inputs(key, B=2, T=63, N=4, K=2, H=8, Hv=6, g=None):
  ks = jax.random.split(key, 5)
  q = normal(ks[0], (B, T, N, H), jnp.float64)
  k = normal(ks[1], (B, T, K, H), jnp.float64)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = normal(ks[2], (B, T, K, Hv), jnp.float64)
  beta = jax.nn.sigmoid(normal(ks[3], (B, T, N), jnp.float64))
  if g == "data":
    g = -jax.nn.softplus(normal(ks[4], (B, T, N), jnp.float64))
  elif g == "strong":
    g = -10.0 * jax.random.uniform(ks[4], (B, T, N), jnp.float64)
  return q, k, v, beta, g


@pytest.mark.parametrize("g,C", [(None, 16), ("data", 32), ("strong", 16), (None, 64)])
def test_chunk_equals_scan(rng, g, C):
  q, k, v, beta, g = inputs(rng, g=g)
  ids = jnp.asarray([[1] * 20 + [2] * 43, [1] * 63])
  for seg in (None, ids):
    a, Sa = dl.delta_rule_attention(
      q, k, v, beta, g, segment_ids=seg, implementation="reference", return_final_state=True
    )
    b, Sb = dl.delta_rule_attention(
      q, k, v, beta, g, segment_ids=seg, chunk_size=C, return_final_state=True
    )
    close(b, a, 1e-9)
    close(Sb, Sa, 1e-9)


def test_gradients_chunk_equal_scan(rng):
  q, k, v, beta, g = inputs(rng, T=37, g="data")
  s0 = normal(jax.random.fold_in(rng, 9), (2, 4, 8, 6), jnp.float64)
  w = normal(jax.random.fold_in(rng, 8), (2, 37, 4, 6), jnp.float64)

  def loss(q, k, v, beta, g, s0, impl):
    out, S = dl.delta_rule_attention(
      q,
      k,
      v,
      beta,
      g,
      initial_state=s0,
      chunk_size=16,
      return_final_state=True,
      implementation=impl,
    )
    return jnp.sum(out * w) + jnp.sum(jnp.sin(S))

  grad = jax.jit(jax.grad(loss, (0, 1, 2, 3, 4, 5)), static_argnums=6)
  for a, b in zip(
    grad(q, k, v, beta, g, s0, "xla"), grad(q, k, v, beta, g, s0, "reference"), strict=True
  ):
    close(a, b, 1e-8)


def test_state_carry_decode_and_limits(rng):
  q, k, v, beta, g = inputs(rng, T=40, g="data")
  run = jax.jit(
    dl.delta_rule_attention,
    static_argnames=("return_final_state", "chunk_size", "mode", "implementation"),
  )
  full, S_full = run(q, k, v, beta, g, return_final_state=True, chunk_size=16)
  a, S_a = run(
    q[:, :23], k[:, :23], v[:, :23], beta[:, :23], g[:, :23], return_final_state=True, chunk_size=16
  )
  b, S_b = run(
    q[:, 23:],
    k[:, 23:],
    v[:, 23:],
    beta[:, 23:],
    g[:, 23:],
    initial_state=S_a,
    return_final_state=True,
    chunk_size=16,
  )
  close(jnp.concatenate([a, b], 1), full, 1e-9)
  close(S_b, S_full, 1e-9)
  S = S_a
  for t in range(23, 30):
    sl = slice(t, t + 1)
    o, S = run(
      q[:, sl],
      k[:, sl],
      v[:, sl],
      beta[:, sl],
      g[:, sl],
      initial_state=S,
      return_final_state=True,
      mode="recurrent",
    )
    close(o[:, 0], full[:, t], 1e-9)
  # β = 0: nothing is written; the delta rule keeps S_0, the gated rule only decays it.
  zero = jnp.zeros_like(beta)
  _, S0 = run(q, k, v, zero, None, initial_state=S_full, return_final_state=True)
  close(S0, S_full, 1e-12)
  _, Sg = run(q, k, v, zero, g, initial_state=S_full, return_final_state=True)
  close(Sg, S_full * jnp.exp(g.sum(1))[..., None, None], 1e-12)
  # α = 1 is the delta rule.
  close(run(q, k, v, beta, jnp.zeros_like(g)), run(q, k, v, beta, None), 1e-12)


def test_exact_retrieval_and_overwrite():
  H = 8
  keys = jnp.eye(H, dtype=jnp.float64)[None, :, None, :]  # orthonormal, [1, 8, 1, 8]
  vals = jnp.arange(H * 3, dtype=jnp.float64).reshape(1, H, 1, 3)
  new = vals[:, :1] + 100.0
  k = jnp.concatenate([keys, keys[:, :1]], 1)  # key 0 written twice
  v = jnp.concatenate([vals, new], 1)
  ones = jnp.ones((1, H + 1, 1), jnp.float64)
  _, S = dl.delta_rule_attention(k, k, v, ones, scale=1.0, return_final_state=True)
  read = jnp.einsum("bnhv,ih->iv", S, jnp.eye(H))
  close(read[1:], vals[0, 1:, 0], 1e-12)
  close(read[0], new[0, 0, 0], 1e-12)  # the rewrite replaced the value
  _, S_lin = lin.linear_attention(k, k, v, scale=1.0, return_final_state=True)
  read_lin = jnp.einsum("bnhv,ih->iv", S_lin, jnp.eye(H))
  close(read_lin[0], vals[0, 0, 0] + new[0, 0, 0], 1e-12)  # linear attention adds


def test_bad_inputs(rng):
  q, k, v, beta, _ = inputs(rng, T=8)
  with pytest.raises(ValueError, match="beta must be a float array"):
    dl.delta_rule_attention(q, k, v, beta[:, :4])
  with pytest.raises(ValueError, match="implementation must be one of"):
    dl.delta_rule_attention(q, k, v, beta, implementation="flash")
  with pytest.raises(ValueError, match="takes log_decay"):
    dl.delta_rule_attention(q, k, v, beta, jnp.zeros(q.shape[:3] + (q.shape[-1],)))
