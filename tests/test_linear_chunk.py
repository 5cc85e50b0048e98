"""The chunked linear-attention Pallas kernels (pallas_kernels/linear_chunk.py), TPU and GPU:
in interpret mode (the TPU kernel with TPU memory simulated, the GPU kernel generically)
they equal the float64 token-scan oracle — output, final state and the gradients of q, k,
v, the gates and the initial state — for plain, fixed, data-dependent (mild to g ≈ −10)
and per-dimension gates, chunk sizes 16/32/64, T = 63, 100 and 500, packed documents and a
carried state; through ``attn_jax.attention.linear.linear_attention`` with feature maps,
the normaliser and GQA; they lower for ``("tpu",)`` and ``("cuda",)``, forward and
backward; bad chunk sizes and shapes raise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from jax.experimental.pallas import tpu as pltpu
from test_block_sparse import assert_close

from attn_jax.attention import linear as lin
from pallas_kernels import linear_chunk as kernel


def make(key, B, T, N, H, Hv, gates, docs):
  ks = jax.random.split(key, 6)
  q, k = normal(ks[0], (B, T, N, H), jnp.float32), normal(ks[1], (B, T, N, H), jnp.float32)
  v = normal(ks[2], (B, T, N, Hv), jnp.float32)
  u = jax.random.uniform(ks[3], (B, T, N) + ((H,) if gates == "dims" else ()), jnp.float32)
  g = {
    "none": jnp.zeros((B, T, N), jnp.float32),
    "fixed": jnp.broadcast_to(jnp.asarray(lin.lightning_log_decay(N)), (B, T, N)),
    "mild": -0.1 * u,
    "strong": -10.0 * u,
    "dims": -3.0 * u,
  }[gates]
  s0 = normal(ks[4], (B, N, H, Hv), jnp.float32)
  starts = np.zeros((B, T), bool)
  if docs:
    starts[0, [T // 3, T // 3 + 1, (3 * T) // 4]] = True  # incl. a one-token document
  return (q, k, v, g, s0), jnp.asarray(starts), ks[5]


def scan_oracle(q, k, v, g, s0, starts):
  """Float64 token-by-token recurrence (attn_jax's reference implementation)."""
  seg = jnp.cumsum(starts.astype(jnp.int32), axis=1)
  return lin.linear_attention(
    q,
    k,
    v,
    g,
    scale=1.0,
    initial_state=s0,
    segment_ids=seg,
    return_final_state=True,
    implementation="reference",
  )


INTERPRET = {"tpu": pltpu.InterpretParams(), "gpu": True}


# (backend, B, T, N, H, Hv, gates, C, docs)
CASES = [
  ("tpu", 2, 63, 2, 16, 8, "mild", 16, True),
  ("gpu", 2, 63, 2, 16, 8, "mild", 16, True),
  ("tpu", 1, 500, 1, 16, 16, "strong", 64, True),
  ("gpu", 1, 500, 1, 8, 16, "none", 32, False),
  ("tpu", 1, 100, 2, 16, 16, "fixed", 32, False),
  ("gpu", 1, 100, 2, 16, 16, "strong", 64, True),
  ("tpu", 2, 63, 1, 16, 8, "dims", 32, True),
  ("gpu", 1, 63, 2, 12, 8, "dims", 16, True),
]


@pytest.mark.parametrize("backend,B,T,N,H,Hv,gates,C,docs", CASES)
def test_kernel_matches_scan_oracle(rng, backend, B, T, N, H, Hv, gates, C, docs):
  args, starts, kw = make(rng, B, T, N, H, Hv, gates, docs)
  w_o, w_s = jax.random.split(kw)
  w_o = normal(w_o, (B, T, N, Hv), jnp.float32)
  w_s = normal(w_s, (B, N, H, Hv), jnp.float32)

  def loss(fn):
    def f(*a):
      out, S = fn(*a)
      return jnp.sum(out * w_o.astype(out.dtype)) + jnp.sum(S * w_s.astype(S.dtype)), (out, S)

    return f

  def fast(q, k, v, g, s0):
    return kernel.chunked_linear_attention(
      q, k, v, g, starts, s0, chunk_size=C, backend=backend, interpret=INTERPRET[backend]
    )

  def ref(q, k, v, g, s0):
    return scan_oracle(q, k, v, g, s0, starts)

  argnums = tuple(range(5))
  grads, (out, S) = jax.jit(jax.grad(loss(fast), argnums, has_aux=True))(*args)
  args64 = [a.astype(jnp.float64) for a in args]
  want_grads, (want, want_S) = jax.grad(loss(ref), argnums, has_aux=True)(*args64)
  assert out.dtype == jnp.float32 and out.shape == (B, T, N, Hv)
  assert_close("out", out, want, 2e-5)
  assert_close("final state", S, want_S, 2e-5)
  for name, got, exp in zip(("dq", "dk", "dv", "dg", "ds0"), grads, want_grads, strict=True):
    assert_close(name, got, exp, 5e-5)
  if docs:  # a gate at a document start multiplies a zeroed state: exactly no gradient
    assert np.all(np.asarray(grads[3])[np.asarray(starts)] == 0)


def test_two_halves_with_carried_state_equal_one_pass(rng):
  (q, k, v, g, s0), starts, _ = make(rng, 1, 96, 2, 16, 16, "mild", True)

  def run(sl, state):
    return kernel.chunked_linear_attention(
      q[:, sl],
      k[:, sl],
      v[:, sl],
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


@pytest.mark.parametrize("impl", ["pallas_interpret", "pallas_gpu_interpret"])
def test_front_door_feature_maps_normaliser_gqa(rng, impl, monkeypatch):
  """``linear_attention(implementation=<kernel>)`` with elu+1 features, the z normaliser
  and GQA (K < N) equals the xla chunked form, forward and gradients."""
  if impl == "pallas_gpu_interpret":  # the GPU kernel in interpret mode (no GPU here)
    real = kernel.chunked_linear_attention
    monkeypatch.setattr(
      kernel,
      "chunked_linear_attention",
      lambda *a, **kw: real(*a, **{**kw, "interpret": True}),
    )
    impl = "pallas_gpu"
  ks = jax.random.split(rng, 4)
  q = normal(ks[0], (2, 50, 4, 8), jnp.float32)
  k = normal(ks[1], (2, 50, 2, 8), jnp.float32)
  v = normal(ks[2], (2, 50, 2, 8), jnp.float32)
  g = -jax.nn.softplus(normal(ks[3], (2, 50, 4), jnp.float32))
  seg = jnp.asarray(np.repeat([[0] * 20 + [1] * 30], 2, axis=0))

  def f(impl):
    def run(q, k, v, g):
      out = lin.linear_attention(
        q,
        k,
        v,
        g,
        feature_map="elu1",
        normalize=True,
        segment_ids=seg,
        chunk_size=16,
        implementation=impl,
      )
      return jnp.sum(out * jnp.cos(out)), out

    return jax.jit(jax.grad(run, (0, 1, 2, 3), has_aux=True))

  grads, out = f(impl)(q, k, v, g)
  want_grads, want = f("xla")(q, k, v, g)
  assert_close("out", out, want, 2e-5)
  for name, got, exp in zip(("dq", "dk", "dv", "dg"), grads, want_grads, strict=True):
    assert_close(name, got, exp, 5e-5)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("gates", ["scalar", "dims"])
def test_lowers_for_hardware_forward_and_backward(backend, gates):
  B, T, N, H = 1, 256, 2, 64
  q = jnp.ones((B, T, N, H), jnp.float32)
  g = jnp.zeros((B, T, N) + ((H,) if gates == "dims" else ()), jnp.float32)
  s0 = jnp.zeros((B, N, H, H), jnp.float32)
  starts = jnp.zeros((B, T), bool)

  def f(q, k, v, g, s0):
    out, S = kernel.chunked_linear_attention(
      q, k, v, g, starts, s0, chunk_size=64 if gates == "scalar" else 32, backend=backend
    )
    return jnp.sum(out) + jnp.sum(S)

  platform = {"tpu": "tpu", "gpu": "cuda"}[backend]
  marker = {"tpu": "tpu_custom_call", "gpu": "triton"}[backend]
  for fn, calls in ((f, 1), (jax.grad(f, argnums=(0, 1, 2, 3, 4)), 2)):
    text = jax.jit(fn).trace(q, q, q, g, s0).lower(lowering_platforms=(platform,)).as_text()
    assert text.count(marker) >= calls


def test_bad_inputs():
  x = jnp.zeros((1, 32, 1, 16), jnp.float32)
  g, r, s0 = jnp.zeros((1, 32, 1)), jnp.zeros((1, 32), bool), jnp.zeros((1, 1, 16, 16))
  run = kernel.chunked_linear_attention
  with pytest.raises(ValueError, match="multiple of 8"):
    run(x, x, x, g, r, s0, chunk_size=12, backend="tpu")
  with pytest.raises(ValueError, match="power of two >= 16"):
    run(x, x, x, g, r, s0, chunk_size=8, backend="gpu")
  with pytest.raises(ValueError, match="backend must be one of"):
    run(x, x, x, g, r, s0, backend="cpu")
  with pytest.raises(ValueError, match="log_decay must be"):
    run(x, x, x, jnp.zeros((1, 32)), r, s0)
  with pytest.raises(ValueError, match="initial_state must be"):
    run(x, x, x, g, r, jnp.zeros((1, 1, 16, 8)))
  with pytest.raises(ValueError, match="implementation must be one of"):
    lin.linear_attention(x, x, x, implementation="pallas_cpu")
