"""HGRN-2 (hgrn2): equals gla (linear_attention with per-dimension gates) under k = 1 − f,
α = f, v = i, q = g; the chunked form equals the token-scan oracle (mild and strong gates,
GQA, T = 45); two halves with the carried state and token-by-token decoding equal one pass;
gradients are finite and equal between implementations; the gates stay accurate near f = 0
and f = 1; the lower bounds rise strictly with depth; the NNX layer in a stack; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import linear as lin
from attn_jax.nn.transformer import Transformer

_STATIC = ("return_final_state", "chunk_size", "mode", "implementation")
# One compiled program per call signature (op-by-op dispatch is slower on this CPU).
hgrn2 = jax.jit(lin.hgrn2_attention, static_argnames=_STATIC)
linear = jax.jit(lin.linear_attention, static_argnames=_STATIC + ("scale",))


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def inputs(key, B=2, T=45, N=4, K=2, H=8, Hv=6, dtype=jnp.float64, strong=False):
  kq, kz, ki, kl = jax.random.split(key, 4)
  q = normal(kq, (B, T, N, H), dtype)
  z = normal(kz, (B, T, K, H), dtype) * (6.0 if strong else 1.0)
  i = normal(ki, (B, T, K, Hv), dtype)
  gamma = jax.random.uniform(kl, (N, H), dtype, maxval=0.95)
  return q, z, i, gamma


def gla_substitution(q, z, i, gamma):
  """The gla call written out: f = γ + (1 − γ)σ(z) the naive way, k = 1 − f, α = f, v = i."""
  G = q.shape[2] // z.shape[2]
  z, i = jnp.repeat(z, G, axis=2), jnp.repeat(i, G, axis=2)
  f = gamma + (1 - gamma) / (1 + jnp.exp(-z))
  return q, 1 - f, i, jnp.log(f)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_equals_gla_under_the_substitution(rng, impl):
  q, z, i, gamma = inputs(rng)
  out, S = hgrn2(
    q, z, i, lower_bound=gamma, chunk_size=16, implementation=impl, return_final_state=True
  )
  gq, gk, gv, gg = gla_substitution(q, z, i, gamma)
  want, S_want = linear(
    gq, gk, gv, gg, scale=1.0, implementation="reference", return_final_state=True
  )
  close(out, want, 1e-10)
  close(S, S_want, 1e-10)
  if impl == "xla":  # against the materialised quadratic form too (independent of both)
    close(lin.materialised(gq, gk, gv, gg, scale=1.0), out, 1e-10)
  # A scalar and a per-head lower bound broadcast like the [N, H] one.
  scalar = hgrn2(q, z, i, lower_bound=0.3, chunk_size=16, implementation=impl)
  full = hgrn2(q, z, i, lower_bound=jnp.full((4, 8), 0.3), chunk_size=16, implementation=impl)
  close(scalar, full, 1e-12)


@pytest.mark.parametrize(
  "strong,C,dtype,tol",
  [(False, 16, jnp.float64, 1e-9), (True, 32, jnp.float64, 1e-9), (True, 7, jnp.float32, 1e-5)],
)
def test_chunk_equals_token_scan(rng, strong, C, dtype, tol):
  q, z, i, gamma = inputs(rng, strong=strong, dtype=dtype)
  gamma = gamma * 0 if strong else gamma  # strong: f ≈ 0 on many tokens and dims
  scan, S1 = hgrn2(q, z, i, lower_bound=gamma, implementation="reference", return_final_state=True)
  chunk, S2 = hgrn2(q, z, i, lower_bound=gamma, chunk_size=C, return_final_state=True)
  assert chunk.dtype == dtype
  close(chunk, scan, tol)
  close(S2, S1, tol)
  assert np.all(np.isfinite(np.asarray(chunk)))


def test_carried_state_and_decoding(rng):
  h = hgrn2
  q, z, i, gamma = inputs(rng, T=40)
  full, S_full = h(q, z, i, lower_bound=gamma, return_final_state=True, chunk_size=16)
  a, S_a = h(
    q[:, :23], z[:, :23], i[:, :23], lower_bound=gamma, return_final_state=True, chunk_size=16
  )
  b, S_b = h(
    q[:, 23:],
    z[:, 23:],
    i[:, 23:],
    lower_bound=gamma,
    initial_state=S_a,
    return_final_state=True,
    chunk_size=16,
  )
  close(jnp.concatenate([a, b], 1), full, 1e-10)
  close(S_b, S_full, 1e-10)
  S = S_a
  for t in range(23, 26):  # decoding one token at a time from the prefill's state
    o, S = h(
      q[:, t : t + 1],
      z[:, t : t + 1],
      i[:, t : t + 1],
      lower_bound=gamma,
      initial_state=S,
      return_final_state=True,
      mode="recurrent",
    )
    close(o[:, 0], full[:, t], 1e-10)
  # Packed documents equal separate runs.
  ids = jnp.asarray([[1] * 17 + [2] * 23] * 2)
  packed = h(q, z, i, lower_bound=gamma, segment_ids=ids, chunk_size=16)
  for lo, hi in ((0, 17), (17, 40)):
    close(packed[:, lo:hi], h(q[:, lo:hi], z[:, lo:hi], i[:, lo:hi], lower_bound=gamma), 1e-10)


def test_gradients_finite_and_equal_between_implementations(rng):
  q, z, i, gamma = inputs(rng, T=37)
  s0 = normal(jax.random.fold_in(rng, 9), (2, 4, 8, 6), jnp.float64)
  w = normal(jax.random.fold_in(rng, 8), (2, 37, 4, 6), jnp.float64)

  def loss(q, z, i, gamma, s0, impl):
    out, S = hgrn2(
      q,
      z,
      i,
      lower_bound=gamma,
      initial_state=s0,
      return_final_state=True,
      chunk_size=16,
      implementation=impl,
    )
    return jnp.sum(out * w) + jnp.sum(jnp.sin(S))

  grad = jax.jit(jax.grad(loss, (0, 1, 2, 3, 4)), static_argnums=5)
  chunk, scan = grad(q, z, i, gamma, s0, "xla"), grad(q, z, i, gamma, s0, "reference")
  for a, b in zip(chunk, scan, strict=True):
    assert np.all(np.isfinite(np.asarray(a))) and float(jnp.abs(a).max()) > 0
    close(a, b, 1e-8)


def test_gates_are_accurate_at_both_ends():
  z = jnp.asarray([-60.0, -20.0, -3.0, 0.0, 3.0, 20.0, 40.0], jnp.float32)
  for gamma in (0.0, 0.5, 0.999):
    log_f, one_minus_f = lin.hgrn2_gates(z, gamma)
    z64 = np.asarray(z, np.float64)
    gamma = np.float64(np.float32(gamma))  # the γ the float32 computation sees
    om64 = (1 - gamma) / (1 + np.exp(z64))  # 1 − f = (1 − γ)σ(−z), exact in float64
    f64 = gamma + (1 - gamma) / (1 + np.exp(-z64))
    logf64 = np.where(om64 < 0.5, np.log1p(-np.minimum(om64, 0.5)), np.log(f64))
    np.testing.assert_allclose(np.asarray(one_minus_f), om64, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(log_f), logf64, rtol=1e-5)
  grads = jax.grad(lambda z: jnp.sum(lin.hgrn2_gates(z, 0.0)[0]))(z)
  assert np.all(np.isfinite(np.asarray(grads)))


@pytest.mark.parametrize("num_layers", [0, 6])
def test_lower_bounds_rise_strictly_with_depth(rng, num_layers):
  depth = num_layers or 6
  # Adversarial θ: large in shallow layers, small in deep ones.
  thetas = 8.0 - 3.0 * jnp.arange(depth)[:, None] + normal(rng, (depth, 5), jnp.float32)
  gammas = [lin.hgrn2_lower_bound(thetas[l - 1], l, num_layers) for l in range(1, depth + 1)]
  for lo, hi in zip(gammas[:-1], gammas[1:], strict=True):
    assert np.all(np.asarray(hi) > np.asarray(lo))
  assert np.all(np.asarray(gammas[0]) >= 0) and np.all(np.asarray(gammas[-1]) < 1)
  with pytest.raises(ValueError, match="layer_index"):
    lin.hgrn2_lower_bound(0.0, 0, num_layers)
  with pytest.raises(ValueError, match="layer_index <= num_layers"):
    lin.hgrn2_lower_bound(0.0, 7, 6)


def test_nnx_stack(rng):
  model = Transformer(
    num_layers=2,
    attention="hgrn2",
    d_model=16,
    num_heads=2,
    positions="none",
    mlp="none",
    options={"linear_chunk": 4, "hgrn2_num_layers": 3},
    rngs=nnx.Rngs(0),
  )
  assert [b.attn.layer_index for b in model.blocks] == [1, 2]
  bounds = [
    lin.hgrn2_lower_bound(b.attn.hgrn2_theta[...], b.attn.layer_index, 3) for b in model.blocks
  ]
  assert float(bounds[0].max()) < float(bounds[1].min()) <= float(bounds[1].max()) < 2 / 3
  x = normal(rng, (2, 10, 16), jnp.float32)
  forward = nnx.jit(lambda m, xx: m(xx))
  y = forward(model, x)
  assert y.shape == (2, 10, 16) and np.all(np.isfinite(np.asarray(y)))
  x2 = x.at[:, 6:].set(normal(jax.random.fold_in(rng, 1), (2, 4, 16), jnp.float32))
  close(forward(model, x2)[:, :6], y[:, :6], 1e-6)  # causal
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(model)
  leaves = jax.tree.leaves(nnx.state(grads))
  assert all(np.all(np.isfinite(np.asarray(a))) for a in leaves)
  assert float(jnp.abs(model.blocks[1].attn.hgrn2_theta[...]).max()) == 0.0  # init mid-band
  theta_grad = grads.blocks[1].attn.hgrn2_theta[...]
  assert float(jnp.abs(theta_grad).max()) > 0  # the lower bound is learned


def test_bad_inputs(rng):
  q, z, i, gamma = inputs(rng, T=8)
  with pytest.raises(ValueError, match="forget_logits must be"):
    lin.hgrn2_attention(q, z[..., :5], i)
  with pytest.raises(ValueError, match="forget_logits must be"):
    lin.hgrn2_attention(q, z, i[:, :7])
  with pytest.raises(ValueError, match="must divide the query heads"):
    lin.hgrn2_attention(q[:, :, :3], z, i)
  with pytest.raises(ValueError, match="lower_bound must be a float scalar"):
    lin.hgrn2_attention(q, z, i, lower_bound=jnp.zeros((2,)))
  with pytest.raises(ValueError, match=r"lower_bound must lie in \[0, 1\)"):
    lin.hgrn2_attention(q, z, i, lower_bound=1.0)
  with pytest.raises(ValueError, match="rank 4"):
    lin.hgrn2_attention(q[0], z, i)
  with pytest.raises(ValueError, match="mode must be one of"):
    lin.hgrn2_attention(q, z, i, mode="parallel")
  with pytest.raises(ValueError, match="layer_index <= num_layers"):
    Transformer(
      num_layers=3,
      attention="hgrn2",
      d_model=16,
      num_heads=2,
      positions="none",
      options={"hgrn2_num_layers": 2},
      rngs=nnx.Rngs(0),
    )


def test_pallas_interpret_kernel_serves_hgrn2(rng):
  """The chunked Pallas kernel (interpret mode) takes the per-dimension gates of hgrn2."""
  q, z, i, gamma = inputs(rng, T=21, dtype=jnp.float32)
  gamma = gamma.astype(jnp.float32)
  kernel = lin.hgrn2_attention(
    q, z, i, lower_bound=gamma, chunk_size=8, implementation="pallas_interpret"
  )
  close(kernel, hgrn2(q, z, i, lower_bound=gamma, implementation="reference"), 1e-5)
