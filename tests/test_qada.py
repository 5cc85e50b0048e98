"""Query-adaptive long-context heads (qada): the fast path equals a float64 numpy oracle that
fits the Gaussian with an explicit covariance; τ = 0 is full and τ = 1 local attention; the
Gaussian estimate matches the exact bulk log-sum-exp for Gaussian keys; the NNX kind; bad
input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import CausalMask, SinkKeysMask, dot_product_attention, sliding_window
from attn_jax.attention import qada as qada_lib
from attn_jax.nn.attention import Attention


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def qkv(key, B=2, T=24, S=24, N=4, K=2, H=8, Hv=6, dtype=jnp.float64):
  kq, kk, kv = jax.random.split(key, 3)
  return (
    normal(kq, (B, T, N, H), dtype),
    normal(kk, (B, S, K, H), dtype),
    normal(kv, (B, S, K, Hv), dtype),
  )


def oracle(q, k, v, *, sinks, window, tau):
  """Query by query: bulk mean and covariance from the keys, the Gaussian log-mass, the exact
  local log-sum-exp, the choice, and the chosen softmax. Returns output, choice, margin."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  c = H**-0.5
  out = np.zeros((B, T, N, v.shape[-1]))
  local_choice = np.zeros((B, N, T), bool)
  margin = np.zeros((B, N, T))
  for b in range(B):
    for n in range(N):
      kh = n // (N // K)
      for t in range(T):
        p = S - T + t
        local = [s for s in range(p + 1) if s < sinks or s > p - window]
        bulk = [s for s in range(p + 1) if s not in local]
        z = c * k[b, : p + 1, kh] @ q[b, t, n]
        lse_local = np.log(np.exp(z[local] - z[local].max()).sum()) + z[local].max()
        if bulk:
          mu = k[b, bulk, kh].mean(0)
          cov = np.cov(k[b, bulk, kh].T, bias=True).reshape(H, H)
          log_bulk = (
            np.log(len(bulk)) + c * q[b, t, n] @ mu + c**2 * q[b, t, n] @ cov @ q[b, t, n] / 2
          )
        else:
          log_bulk = -np.inf
        margin[b, n, t] = log_bulk - lse_local
        share = 1 / (1 + np.exp(-margin[b, n, t]))
        use_local = tau >= 1 or (tau > 0 and share < tau)
        local_choice[b, n, t] = use_local
        keys = local if use_local else list(range(p + 1))
        w = np.exp(z[keys] - z[keys].max())
        out[b, t, n] = (w / w.sum()) @ v[b, keys, kh]
  return out, local_choice, margin


@pytest.mark.parametrize("case", [("self", 24, 24, 2, 4, 0.3), ("decode_block", 3, 40, 2, 10, 0.7)])
def test_equals_float64_oracle_with_gradients(rng, case):
  _, T, S, sinks, window, tau = case
  q, k, v = qkv(rng, T=T, S=S)
  want, choice, margin = oracle(q, k, v, sinks=sinks, window=window, tau=tau)
  assert choice.any() and not choice.all()  # both branches are exercised
  kw = dict(qada_sinks=sinks, qada_window=window, qada_tau=tau)
  out, aux = qada_lib.qada(q, k, v, implementation="reference", return_aux=True, **kw)
  close(out, want, 1e-10)
  assert np.array_equal(np.asarray(aux["local"]), choice)
  close(aux["bulk_share"], 1 / (1 + np.exp(-margin)), 1e-9)
  # float32 xla: equal wherever the float64 decision is not within 1e-3 of the threshold.
  got = qada_lib.qada(*(a.astype(jnp.float32) for a in (q, k, v)), implementation="xla", **kw)
  logit = np.log(tau) - np.log1p(-tau)
  clear = np.swapaxes(np.abs(margin - logit) > 1e-3, 1, 2)  # [B, T, N]
  close(np.asarray(got)[clear], want[clear], 3e-5)
  w_out = normal(jax.random.fold_in(rng, 1), want.shape, jnp.float64)

  def loss(q, k, v, impl):
    return jnp.sum(qada_lib.qada(q, k, v, implementation=impl, **kw) * w_out)

  grad = jax.jit(jax.grad(loss, (0, 1, 2)), static_argnums=3)
  for g, w in zip(grad(q, k, v, "xla"), grad(q, k, v, "reference"), strict=True):
    close(g, w, 1e-9)


def test_tau_zero_is_full_and_tau_one_is_local(rng):
  q, k, v = qkv(rng, dtype=jnp.float32)
  kw = dict(qada_sinks=2, qada_window=5)
  full = dot_product_attention(q, k, v, mask=CausalMask(), implementation="reference")
  local = dot_product_attention(
    q, k, v, mask=sliding_window(5) | (SinkKeysMask(2) & CausalMask()), implementation="reference"
  )
  for impl in ("reference", "xla"):
    close(qada_lib.qada(q, k, v, qada_tau=0.0, implementation=impl, **kw), full, 2e-5)
    close(qada_lib.qada(q, k, v, qada_tau=1.0, implementation=impl, **kw), local, 2e-5)


def test_gaussian_estimate_matches_exact_bulk_lse(rng):
  """Keys drawn from a Gaussian: the moment estimate of the bulk's log-mass is within 0.02
  of the exact log-sum-exp over 8000 bulk keys."""
  H, S = 16, 8192
  kmu, kl, kk, kq = jax.random.split(rng, 4)
  mu = 0.5 * normal(kmu, (H,), jnp.float64)
  L = 0.3 * normal(kl, (H, H), jnp.float64)
  k = mu + normal(kk, (1, S, 1, H), jnp.float64) @ L.T
  q = normal(kq, (1, 1, 1, H), jnp.float64)
  n, mean, var = qada_lib.bulk_logit_moments(q, k, sinks=4, window=64, scale=H**-0.5)
  bulk = np.asarray(k[0, 4 : S - 64, 0])  # keys 4 .. p - window, p = S - 1
  z = H**-0.5 * bulk @ np.asarray(q[0, 0, 0])
  exact = np.log(np.exp(z - z.max()).sum()) + z.max()
  estimate = np.log(float(n[0])) + float(mean[0, 0, 0]) + float(var[0, 0, 0]) / 2
  assert float(n[0]) == len(bulk) and float(var[0, 0, 0]) > 0.05  # a non-trivial spread
  assert abs(estimate - exact) < 0.02, (estimate, exact)


def test_nnx_kind_reads_its_options(rng):
  x = normal(rng, (2, 13, 16), jnp.float32)

  def layer(tau):
    opts = {"window": 3, "qada_sinks": 1, "qada_tau": tau}
    return Attention(d_model=16, num_heads=2, kind="qada", options=opts, rngs=nnx.Rngs(1))

  plain = Attention(d_model=16, num_heads=2, kind="mha", rngs=nnx.Rngs(1))
  close(layer(0.0)(x), plain(x), 2e-5)  # τ = 0: full causal attention
  assert not np.allclose(layer(1.0)(x), plain(x), atol=1e-4)  # τ = 1: sinks + window only
  with pytest.raises(ValueError, match="causal-only"):
    Attention(d_model=16, num_heads=2, kind="qada", causal=False, rngs=nnx.Rngs(1))


def test_bad_input_messages(rng):
  q, k, v = qkv(rng, dtype=jnp.float32)
  with pytest.raises(ValueError, match="qada is causal only"):
    qada_lib.qada(q, k, v, causal=False)
  with pytest.raises(ValueError, match=r"qada_tau must be in \[0, 1\]; got 1.5"):
    qada_lib.qada(q, k, v, qada_tau=1.5)
  with pytest.raises(ValueError, match="qada_window must be an int >= 1; got 0"):
    qada_lib.qada(q, k, v, qada_window=0)
  with pytest.raises(ValueError, match="qada_sinks must be an int >= 0; got -1"):
    qada_lib.qada(q, k, v, qada_sinks=-1)
  with pytest.raises(NotImplementedError, match="'pallas_gpu' is not built"):
    qada_lib.qada(q, k, v, implementation="pallas_gpu")
  with pytest.raises(ValueError, match="SinkKeysMask num_keys must be"):
    SinkKeysMask(-2)
