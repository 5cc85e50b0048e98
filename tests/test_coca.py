"""Collinear constrained attention (coca): the separable dot product equals the direct
formula Σ_j ‖q^(j)‖ t^(j) cos((m − n)θ_j); logits depend only on m − n when the magnitudes
do not depend on position; distance 0 is non-negative per plane; the flash path equals the
reference with gradients; the NNX kind."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import normal
from flax import nnx

from attn_jax.attention import CausalMask
from attn_jax.attention import coca as coca_lib
from attn_jax.nn.attention import Attention


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def test_separable_form_equals_direct_formula(rng):
  kq, kk = jax.random.split(rng)
  T, H = 9, 8
  q = normal(kq, (1, T, 1, H), jnp.float64)
  k = normal(kk, (1, T, 1, H), jnp.float64)
  pos = jnp.arange(T)[None]
  q_hat, k_hat = coca_lib.coca_qk(q, k, pos, pos, base=100.0)
  got = np.einsum("th,sh->ts", np.asarray(q_hat[0, :, 0]), np.asarray(k_hat[0, :, 0]))
  R = H // 2
  theta = 100.0 ** (-2.0 * np.arange(R) / H)
  qn = np.hypot(np.asarray(q[0, :, 0, :R]), np.asarray(q[0, :, 0, R:]))  # [T, R]
  kn = np.hypot(np.asarray(k[0, :, 0, :R]), np.asarray(k[0, :, 0, R:]))
  want = np.zeros((T, T))
  for m in range(T):
    for n in range(T):
      want[m, n] = np.sum(qn[m] * kn[n] * np.cos((m - n) * theta))
      assert np.all(qn[m] * kn[m] >= 0)  # distance 0: every plane's term is >= 0
  close(got, want, 1e-12)
  # The same vectors at every position: logits depend only on m − n.
  qc, kc = jnp.broadcast_to(q[:, :1], q.shape), jnp.broadcast_to(k[:, :1], k.shape)
  qh, kh = coca_lib.coca_qk(qc, kc, pos, pos, base=100.0)
  s = np.einsum("th,sh->ts", np.asarray(qh[0, :, 0]), np.asarray(kh[0, :, 0]))
  for d in range(-T + 1, T):
    diag = np.diagonal(s, offset=d)
    assert np.ptp(diag) < 1e-12


def test_flash_path_equals_reference_with_gradients(rng):
  kq, kk, kv, kw = jax.random.split(rng, 4)
  q = normal(kq, (2, 21, 4, 8), jnp.float64)
  k = normal(kk, (2, 21, 2, 8), jnp.float64)
  v = normal(kv, (2, 21, 2, 6), jnp.float64)
  w = normal(kw, (2, 21, 4, 6), jnp.float64)

  def loss(q, k, v, impl):
    return jnp.sum(coca_lib.coca(q, k, v, mask=CausalMask(), implementation=impl) * w)

  want, want_g = jax.value_and_grad(loss, (0, 1, 2))(q, k, v, "reference")
  f32 = [a.astype(jnp.float32) for a in (q, k, v)]
  got, got_g = jax.jit(jax.value_and_grad(loss, (0, 1, 2)), static_argnums=3)(*f32, "xla")
  close(got, want, 1e-4)
  for g, r in zip(got_g, want_g, strict=True):
    close(g, r, 2e-4)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in want_g)


def test_nnx_kind(rng):
  x = normal(rng, (2, 9, 16), jnp.float32)
  layer = Attention(d_model=16, num_heads=2, kind="coca", positions="none", rngs=nnx.Rngs(1))
  q = jnp.einsum("btd,dnh->btnh", x, layer.wq[...])
  k = jnp.einsum("btd,dkh->btkh", x, layer.wk[...])
  v = jnp.einsum("btd,dkh->btkh", x, layer.wv[...])
  o = coca_lib.coca(q, k, v, mask=CausalMask())
  close(layer(x), jnp.einsum("btnh,nhd->btd", o, layer.wo[...]), 1e-5)
