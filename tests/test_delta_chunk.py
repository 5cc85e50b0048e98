"""The chunked (gated) delta-rule Pallas kernels (pallas_kernels/delta_chunk.py), TPU and GPU:
in interpret mode they equal the float64 token-scan oracle — output, final state and the
gradients of q, k, v, β, the log decay and the initial state — with no decay, mild and
strong (g ≈ −10) decays, β up to 2 (negative eigenvalues), chunk sizes 16/32/64, T = 63,
100 and 500, packed documents and a carried state; through
``attn_jax.attention.delta.delta_rule_attention`` (L2-normalised q/k, GQA); they lower for
``("tpu",)`` and ``("cuda",)``, forward and backward; bad shapes raise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from jax.experimental.pallas import tpu as pltpu
from test_block_sparse import assert_close

from attn_jax.attention import delta as dl
from pallas_kernels import delta_chunk as kernel

INTERPRET = {"tpu": pltpu.InterpretParams(), "gpu": True}


def make(key, B, T, N, H, Hv, gates, beta_max, docs):
  ks = jax.random.split(key, 7)
  q = normal(ks[0], (B, T, N, H), jnp.float32)
  k = normal(ks[1], (B, T, N, H), jnp.float32)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = normal(ks[2], (B, T, N, Hv), jnp.float32)
  beta = beta_max * jax.random.uniform(ks[3], (B, T, N), jnp.float32)
  u = jax.random.uniform(ks[4], (B, T, N), jnp.float32)
  g = {"none": 0.0 * u, "mild": -0.1 * u, "strong": -10.0 * u}[gates]
  s0 = normal(ks[5], (B, N, H, Hv), jnp.float32)
  starts = np.zeros((B, T), bool)
  if docs:
    starts[0, [T // 3, T // 3 + 1, (3 * T) // 4]] = True
  return (q, k, v, beta, g, s0), jnp.asarray(starts), ks[6]


# (backend, B, T, N, H, Hv, gates, beta_max, C, docs)
CASES = [
  ("tpu", 2, 63, 2, 16, 8, "mild", 1.0, 16, True),
  ("gpu", 2, 63, 2, 16, 8, "mild", 1.0, 16, True),
  ("tpu", 1, 500, 1, 16, 16, "strong", 1.0, 64, True),
  ("gpu", 1, 100, 2, 12, 16, "none", 2.0, 32, False),
  ("tpu", 1, 100, 2, 16, 16, "none", 2.0, 32, True),
]


@pytest.mark.parametrize("backend,B,T,N,H,Hv,gates,beta_max,C,docs", CASES)
def test_kernel_matches_scan_oracle(rng, backend, B, T, N, H, Hv, gates, beta_max, C, docs):
  args, starts, kw = make(rng, B, T, N, H, Hv, gates, beta_max, docs)
  w_o, w_s = jax.random.split(kw)
  w_o = normal(w_o, (B, T, N, Hv), jnp.float32)
  w_s = normal(w_s, (B, N, H, Hv), jnp.float32)

  def loss(fn):
    def f(*a):
      out, S = fn(*a)
      return jnp.sum(out * w_o.astype(out.dtype)) + jnp.sum(S * w_s.astype(S.dtype)), (out, S)

    return f

  def fast(q, k, v, beta, g, s0):
    return kernel.chunked_delta_rule(
      q, k, v, beta, g, starts, s0, chunk_size=C, backend=backend, interpret=INTERPRET[backend]
    )

  def ref(q, k, v, beta, g, s0):
    seg = jnp.cumsum(starts.astype(jnp.int32), axis=1)
    return dl.delta_rule_attention(
      q,
      k,
      v,
      beta,
      g,
      scale=1.0,
      initial_state=s0,
      segment_ids=seg,
      return_final_state=True,
      implementation="reference",
    )

  argnums = tuple(range(6))
  grads, (out, S) = jax.jit(jax.grad(loss(fast), argnums, has_aux=True))(*args)
  args64 = [a.astype(jnp.float64) for a in args]
  want_grads, (want, want_S) = jax.grad(loss(ref), argnums, has_aux=True)(*args64)
  assert_close("out", out, want, 2e-5)
  assert_close("final state", S, want_S, 2e-5)
  for name, got, exp in zip(
    ("dq", "dk", "dv", "dbeta", "dg", "ds0"), grads, want_grads, strict=True
  ):
    assert_close(name, got, exp, 1e-4)


def test_beta_zero_leaves_the_state_and_two_halves_equal_one_pass(rng):
  (q, k, v, beta, g, s0), starts, _ = make(rng, 1, 96, 2, 16, 16, "mild", 1.0, True)

  def run(sl, state, beta=beta, g=g):
    return kernel.chunked_delta_rule(
      q[:, sl],
      k[:, sl],
      v[:, sl],
      beta[:, sl],
      g[:, sl],
      starts[:, sl],
      state,
      chunk_size=32,
      backend="gpu",
      interpret=True,
    )

  out, S = run(slice(None), s0)
  out1, S1 = run(slice(0, 40), s0)
  out2, S2 = run(slice(40, None), S1)
  assert_close("out", jnp.concatenate([out1, out2], axis=1), out, 1e-5)
  assert_close("state", S2, S, 1e-5)
  no_docs = jnp.zeros_like(starts)
  _, S0 = kernel.chunked_delta_rule(
    q, k, v, 0 * beta, 0 * g, no_docs, s0, chunk_size=32, backend="gpu", interpret=True
  )
  assert_close("β = 0, g = 0: state unchanged", S0, s0, 1e-6)


def test_front_door_l2_normalised_gqa(rng):
  ks = jax.random.split(rng, 5)
  q = normal(ks[0], (2, 50, 4, 8), jnp.float32)
  k = normal(ks[1], (2, 50, 2, 8), jnp.float32)
  v = normal(ks[2], (2, 50, 2, 8), jnp.float32)
  beta = jax.nn.sigmoid(normal(ks[3], (2, 50, 4), jnp.float32))
  g = -jax.nn.softplus(normal(ks[4], (2, 50, 4), jnp.float32))
  seg = jnp.asarray(np.repeat([[0] * 20 + [1] * 30], 2, axis=0))

  def f(impl):
    def run(q, k, v, beta, g):
      out = dl.delta_rule_attention(
        q, k, v, beta, g, segment_ids=seg, chunk_size=16, implementation=impl, l2_normalize=True
      )
      return jnp.sum(out * jnp.cos(out)), out

    return jax.jit(jax.grad(run, (0, 1, 2, 3, 4), has_aux=True))

  grads, out = f("pallas_interpret")(q, k, v, beta, g)
  want_grads, want = f("xla")(q, k, v, beta, g)
  assert_close("out", out, want, 2e-5)
  for name, got, exp in zip(("dq", "dk", "dv", "dbeta", "dg"), grads, want_grads, strict=True):
    assert_close(name, got, exp, 5e-5)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_lowers_for_hardware_forward_and_backward(backend):
  B, T, N, H = 1, 256, 2, 64
  x = jnp.ones((B, T, N, H), jnp.float32)
  beta, g = jnp.ones((B, T, N), jnp.float32), jnp.zeros((B, T, N), jnp.float32)
  s0, starts = jnp.zeros((B, N, H, H), jnp.float32), jnp.zeros((B, T), bool)

  def f(q, k, v, beta, g, s0):
    out, S = kernel.chunked_delta_rule(q, k, v, beta, g, starts, s0, chunk_size=64, backend=backend)
    return jnp.sum(out) + jnp.sum(S)

  platform = {"tpu": "tpu", "gpu": "cuda"}[backend]
  marker = {"tpu": "tpu_custom_call", "gpu": "triton"}[backend]
  for fn, calls in ((f, 1), (jax.grad(f, argnums=tuple(range(6))), 2)):
    text = jax.jit(fn).trace(x, x, x, beta, g, s0).lower(lowering_platforms=(platform,)).as_text()
    assert text.count(marker) >= calls


def test_bad_inputs():
  x = jnp.zeros((1, 32, 1, 16), jnp.float32)
  b, r, s0 = jnp.zeros((1, 32, 1)), jnp.zeros((1, 32), bool), jnp.zeros((1, 1, 16, 16))
  run = kernel.chunked_delta_rule
  with pytest.raises(ValueError, match="multiple of 8"):
    run(x, x, x, b, b, r, s0, chunk_size=20, backend="tpu")
  with pytest.raises(ValueError, match="beta must be"):
    run(x, x, x, b[:, :4], b, r, s0)
  with pytest.raises(ValueError, match="log_decay must be"):
    run(x, x, x, b, jnp.zeros((1, 32, 1, 16)), r, s0)
  with pytest.raises(ValueError, match="reset must be"):
    run(x, x, x, b, b, r[:, :4], s0)
