"""Transformer-XL relative scores with a depthwise convolution (rel_xl, a tier-3 row built):
the one-call form with position-augmented q and k equals a float64 numpy oracle of the four
score terms (causal with packing, cross-attention) and the explicit-bias reference with
gradients; W_R = 0, u = w = 0 and an identity convolution give MHA; the convolution is causal
and stays inside documents; the NNX layer; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import SegmentMask, registry, sliding_window
from attn_jax.attention import heads as heads_lib
from attn_jax.attention import rel_xl as rel_xl_lib
from attn_jax.nn.transformer import Transformer

D, N, K = 16, 4, 2


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def init(key, **kw):
  p = registry.init_layer(
    "rel_xl", key, d_model=D, num_heads=N, num_kv_heads=K, dtype=jnp.float64, **kw
  )
  ks = jax.random.split(jax.random.fold_in(key, 7), 3)
  p["u"] = normal(ks[0], p["u"].shape, jnp.float64)
  p["w"] = normal(ks[1], p["w"].shape, jnp.float64)
  p["conv"] = p["conv"] + 0.3 * normal(ks[2], p["conv"].shape, jnp.float64)
  return p


def np_oracle(p, x, ctx=None, ids=None, causal=True):
  p = {n: np.asarray(a, np.float64) for n, a in p.items()}
  x = np.asarray(x, np.float64)

  def conv(z, seg=None):
    C, T = p["conv"].shape[0], z.shape[1]
    out = np.zeros_like(z)
    for t in range(T):
      for c in range(C):
        s = t - (C - 1 - c)
        if s >= 0:
          keep = np.ones(z.shape[0]) if seg is None else (seg[:, s] == seg[:, t])
          out[:, t] += keep[:, None] * z[:, s] * p["conv"][c]
    return out

  xc = conv(x, ids)
  src = xc if ctx is None else conv(np.asarray(ctx, np.float64))
  B, T, _ = x.shape
  S = src.shape[1]
  G = N // K
  H = p["w_q"].shape[-1]
  R = p["w_r"].shape[1]
  q = np.einsum("btd,dnh->btnh", xc, p["w_q"])
  k = np.repeat(np.einsum("bsd,dkh->bskh", src, p["w_k"]), G, 2)
  v = np.repeat(np.einsum("bsd,dkv->bskv", src, p["w_v"]), G, 2)
  om = 10000.0 ** (-2.0 * np.arange(R // 2) / R)
  out = np.zeros((B, T, N, v.shape[-1]))
  for b in range(B):
    for n in range(N):
      for i in range(T):
        pi = S - T + i
        js = [j for j in range(S) if (not causal or j <= pi)]
        if ids is not None:
          js = [j for j in js if ids[b, j] == ids[b, i] and ids[b, i] != 0]
        if not js:
          continue
        s = []
        for j in js:
          r = np.concatenate([np.sin((pi - j) * om), np.cos((pi - j) * om)])
          wr = p["w_r"][n].T @ r  # W_R r in R^H
          s.append(
            q[b, i, n] @ k[b, j, n] + q[b, i, n] @ wr + p["u"][n] @ k[b, j, n] + p["w"][n] @ wr
          )
        s = np.array(s) / np.sqrt(H)
        a = np.exp(s - s.max())
        out[b, i, n] = (a / a.sum()) @ v[b, js, n]
  return np.einsum("btnv,nvd->btd", out, p["w_o"])


def test_one_call_equals_oracle_and_reference_with_gradients(rng):
  kp, kx, kc, kw = jax.random.split(rng, 4)
  p = init(kp, rel_xl_dim=6)
  x = normal(kx, (2, 11, D), jnp.float64)
  ids = np.array([[1] * 6 + [2] * 5, [1] * 9 + [0] * 2])
  mask = SegmentMask(jnp.asarray(ids), jnp.asarray(ids))
  want = np_oracle(p, x, ids=ids)
  for impl in ("reference", "xla"):
    close(rel_xl_lib.rel_xl(p, x, causal=True, mask=mask, implementation=impl), want, 1e-10)
  ctx = normal(kc, (2, 7, D), jnp.float64)
  close(
    rel_xl_lib.rel_xl(p, x[:, :5], context_BSD=ctx, causal=False),
    np_oracle(p, x[:, :5], ctx=ctx, causal=False),
    1e-10,
  )
  w = normal(kw, (2, 11, D), jnp.float64)

  def loss(p, x, impl):
    return jnp.sum(rel_xl_lib.rel_xl(p, x, causal=True, mask=mask, implementation=impl) * w)

  grad = jax.jit(jax.value_and_grad(loss, (0, 1)), static_argnums=2)
  want_v, want_g = grad(p, x, "reference")
  f32 = jax.tree.map(lambda a: a.astype(jnp.float32), p)
  got_v, got_g = grad(f32, x.astype(jnp.float32), "xla")
  close(got_v, want_v, 1e-4)
  for g, r in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
    close(g, r, 5e-4)


def test_zero_relative_terms_and_identity_conv_give_mha(rng):
  kp, kx = jax.random.split(rng)
  p = registry.init_layer("rel_xl", kp, d_model=D, num_heads=N, num_kv_heads=K, dtype=jnp.float64)
  p["w_r"] = jnp.zeros_like(p["w_r"])
  x = normal(kx, (2, 9, D), jnp.float64)
  base = {k: p[k] for k in ("w_q", "w_k", "w_v", "w_o")}
  close(
    rel_xl_lib.rel_xl(p, x, causal=True),
    heads_lib.head_dims(base, x, causal=True, implementation="reference"),
    1e-12,
  )


def test_nnx_layer_and_bad_input(rng):
  model = Transformer(
    num_layers=2,
    attention="rel_xl",
    d_model=D,
    num_heads=N,
    positions="none",
    mlp="none",
    options={"rel_xl_conv": 2},
    rngs=nnx.Rngs(0),
  )
  layer = model.blocks[0].attn
  assert layer.conv[...].shape == (2, D)
  x = normal(rng, (2, 6, D), jnp.float32)
  close(layer(x), rel_xl_lib.rel_xl(layer.param_tree(), x, causal=True), 1e-6)
  p = registry.init_layer("rel_xl", rng, d_model=D, num_heads=N)
  with pytest.raises(ValueError, match="takes no rope"):
    rel_xl_lib.rel_xl(p, x, causal=True, rope={"base": 1e4, "rotary_dim": None})
  with pytest.raises(ValueError, match="takes only a SegmentMask"):
    rel_xl_lib.rel_xl(p, x, causal=True, mask=sliding_window(3))
  with pytest.raises(ValueError, match="rel_xl_dim must be even"):
    registry.init_layer("rel_xl", rng, d_model=D, num_heads=N, rel_xl_dim=5)
