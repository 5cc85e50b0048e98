"""Learned-α entmax (entmax): α = 2 equals sparsemax's sort-based closed form, α → 1
approaches softmax, rows have exact zeros and sum to 1, the custom gradients (scores and α)
equal finite differences, the attention and layer against a float64 numpy oracle, masks,
the NNX layer, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import CausalMask, SegmentMask, registry
from attn_jax.attention import entmax as em
from attn_jax.nn.entmax import EntmaxAttention
from attn_jax.nn.transformer import Transformer


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def test_limits_sparsity_and_normalisation(rng):
  z = 2 * normal(rng, (4, 9), jnp.float64)
  close(em.entmax(z, 2.0), em.sparsemax(z), 1e-12)
  close(em.entmax(z, 1.0 + 1e-5), jax.nn.softmax(z), 2e-5)
  for alpha in (1.2, 1.5, 2.0):
    p = np.asarray(em.entmax(z, alpha))
    close(p.sum(-1), 1.0, 1e-12)
    assert np.all(p >= 0)
  p15, p2 = np.asarray(em.entmax(z, 1.5)), np.asarray(em.entmax(z, 2.0))
  assert (p15 == 0).any() and (p2 == 0).sum() >= (p15 == 0).sum()  # exact zeros, more at α=2
  # The fixed point: p_i = [(α−1) z_i − τ]_+^(1/(α−1)) with one τ per row.
  support = p15 > 0
  tau = 0.5 * np.asarray(z) - p15**0.5
  for row in range(4):
    vals = tau[row][support[row]]
    assert np.ptp(vals) < 1e-10
    assert np.all(0.5 * np.asarray(z)[row][~support[row]] <= vals[0] + 1e-10)


@pytest.mark.parametrize("alpha", [1.3, 1.5, 1.9])
def test_custom_gradients_equal_finite_differences(rng, alpha):
  kz, kg = jax.random.split(rng)
  z = 1.5 * normal(kz, (3, 8), jnp.float64)
  g = normal(kg, (3, 8), jnp.float64)
  valid = jnp.ones((3, 8), bool).at[0, 5:].set(False)

  @jax.jit
  def f(z, a):
    return jnp.sum(em.entmax(z, a, valid=valid) * g)

  gz, ga = jax.grad(f, (0, 1))(z, alpha)
  eps = 1e-6
  fd = np.zeros(z.shape)
  for i in range(3):
    for j in range(8):
      d = jnp.zeros(z.shape).at[i, j].set(eps)
      fd[i, j] = (f(z + d, alpha) - f(z - d, alpha)) / (2 * eps)
  close(gz, fd, 1e-7)
  close(ga, (f(z, alpha + eps) - f(z, alpha - eps)) / (2 * eps), 1e-7)
  assert np.all(np.asarray(gz)[0, 5:] == 0)  # invalid entries take no gradient


def np_entmax(z, alpha):
  """Per-row bisection written out in numpy float64."""
  x = (alpha - 1) * z
  lo, hi = x.max() - 1, x.max()
  for _ in range(60):
    tau = (lo + hi) / 2
    if (np.maximum(x - tau, 0) ** (1 / (alpha - 1))).sum() >= 1:
      lo = tau
    else:
      hi = tau
  p = np.maximum(x - lo, 0) ** (1 / (alpha - 1))
  return p / p.sum()


def test_attention_equals_float64_oracle(rng):
  kq, kk, kv, ka = jax.random.split(rng, 4)
  B, T, N, K, H = 2, 9, 4, 2, 8
  q = normal(kq, (B, T, N, H), jnp.float64)
  k = normal(kk, (B, T, K, H), jnp.float64)
  v = normal(kv, (B, T, K, 5), jnp.float64)
  alpha = em.alpha_from_logit(normal(ka, (N,), jnp.float64))
  ids = jnp.array([[1] * 5 + [2] * 4, [1] * 9])
  mask = CausalMask() & SegmentMask(ids, ids)
  run = jax.jit(lambda q, k, v, a: em.entmax_attention(q, k, v, a, mask=mask, return_probs=True))
  out, probs = run(q, k, v, alpha)
  qn, kn, vn = (np.asarray(a) for a in (q, k, v))
  ok = np.tril(np.ones((T, T), bool)) & (np.asarray(ids)[:, :, None] == np.asarray(ids)[:, None])
  for b in range(B):
    for n in range(N):
      for t in range(T):
        keys = np.nonzero(ok[b, t])[0]
        z = kn[b, keys, n // 2] @ qn[b, t, n] / np.sqrt(H)
        p = np_entmax(z, float(alpha[n]))
        close(probs[b, n, t, keys], p, 1e-9)
        close(out[b, t, n], p @ vn[b, keys, n // 2], 1e-9)
  assert float(np.asarray(probs)[~np.broadcast_to(ok[:, None], probs.shape)].max()) == 0


def test_layer_gradients_flow_to_alpha_and_stack(rng):
  params = registry.init_layer("entmax", rng, d_model=16, num_heads=2, dtype=jnp.float64)
  x = normal(rng, (2, 7, 16), jnp.float64)
  g = jax.jit(jax.grad(lambda p: jnp.sum(em.entmax_layer(p, x, causal=True) ** 2)))(params)
  assert np.all(np.isfinite(np.asarray(g["alpha_logit"]))) and np.any(g["alpha_logit"] != 0)
  model = Transformer(
    num_layers=2, attention="entmax", d_model=16, num_heads=2, mlp="none", rngs=nnx.Rngs(0)
  )
  assert np.all(np.isfinite(np.asarray(nnx.jit(lambda m, x: m(x))(model, x.astype(jnp.float32)))))


def test_bad_input_messages(rng):
  z = normal(rng, (2, 5), jnp.float32)
  with pytest.raises(ValueError, match="alpha must be > 1"):
    em.entmax(z, 1.0)
  params = registry.init_layer("entmax", rng, d_model=16, num_heads=2)
  x = normal(rng, (2, 5, 16), jnp.float32)
  with pytest.raises(NotImplementedError, match="'xla' is not built"):
    em.entmax_layer(params, x, causal=True, implementation="xla")
  with pytest.raises(ValueError, match=r"params\['alpha_logit'\] must have shape \(2,\)"):
    em.entmax_layer(dict(params, alpha_logit=jnp.zeros(3)), x, causal=True)
  with pytest.raises(NotImplementedError, match="materialised 'reference' path only"):
    EntmaxAttention(d_model=16, num_heads=2, implementation="xla", rngs=nnx.Rngs(0))
