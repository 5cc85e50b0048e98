"""Mixture of Gaussian keys (mgk): the per-component flash form equals the materialised
mixture in float64 numpy (values) and the float64 reference (gradients); M = 1 is softmax
with the key bias; the NNX layer; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import CausalMask, SegmentMask, dot_product_attention, registry
from attn_jax.attention import mgk as mgk_lib
from attn_jax.nn.mgk import MGKAttention
from attn_jax.nn.transformer import Transformer

D, N = 16, 4


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def init(key, **kw):
  params = registry.init_layer("mgk", key, d_model=D, num_heads=N, dtype=jnp.float64, **kw)
  params["w_pi"] = normal(jax.random.fold_in(key, 1), params["w_pi"].shape, jnp.float64)
  params["log_sigma"] = params["log_sigma"] + 0.3 * normal(
    jax.random.fold_in(key, 2), params["log_sigma"].shape, jnp.float64
  )
  return params


def oracle(params, x, context=None, *, causal, ids=None):
  """w_ij = Σ_r π_jr exp(−‖q_i − k_jr‖²/(2σ_r²)), normalised over visible j."""
  p = {n: np.asarray(a, np.float64) for n, a in params.items()}
  x = np.asarray(x, np.float64)
  src = x if context is None else np.asarray(context, np.float64)
  K = p["w_k"].shape[1]
  G = N // K
  q = np.einsum("btd,dnh->btnh", x, p["w_q"])
  k = np.einsum("bsd,dkmh->bskmh", src, p["w_k"])
  v = np.einsum("bsd,dkv->bskv", src, p["w_v"])
  logits = np.einsum("bsd,dkm->bskm", src, p["w_pi"])
  pi = np.exp(logits - logits.max(-1, keepdims=True))
  pi = pi / pi.sum(-1, keepdims=True)
  var = np.exp(2 * p["log_sigma"])  # [K, M]
  B, T, S = x.shape[0], x.shape[1], src.shape[1]
  ok = np.ones((B, T, S), bool)
  if causal:
    ok &= np.tril(np.ones((T, S), bool), S - T)
  if ids is not None:
    ids = np.asarray(ids)
    ok &= (ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] != 0)
  out = np.zeros((B, T, N, v.shape[-1]))
  for n in range(N):
    kh = n // G
    d2 = ((q[:, :, n, None, None, :] - k[:, None, :, kh]) ** 2).sum(-1)  # [B, T, S, M]
    w = (pi[:, None, :, kh] * np.exp(-d2 / (2 * var[kh]))).sum(-1)  # [B, T, S]
    w = np.where(ok, w, 0)
    norm = np.maximum(w.sum(-1, keepdims=True), 1e-300)  # fully masked rows give 0
    out[:, :, n] = np.einsum("bts,bsv->btv", w / norm, v[:, :, kh])
  return np.einsum("btnv,nvd->btd", out, p["w_o"])


@pytest.mark.parametrize("case", ["causal_gqa_segments", "cross_bidirectional"])
def test_flash_form_equals_materialised_mixture_with_gradients(rng, case):
  kp, kx, kc, kw = jax.random.split(rng, 4)
  cross = case.startswith("cross")
  params = init(kp, num_kv_heads=None if cross else 2, mgk_keys=3 if cross else 2)
  x = 0.5 * normal(kx, (2, 10, D), jnp.float64)
  context = 0.5 * normal(kc, (2, 7, D), jnp.float64) if cross else None
  ids = None if cross else jnp.array([[1] * 6 + [2] * 4, [1] * 8 + [0] * 2])
  mask = None if ids is None else SegmentMask(ids, ids)
  causal = not cross
  want_np = oracle(params, x, context, causal=causal, ids=ids)
  w_out = normal(kw, want_np.shape, jnp.float64)

  def loss(p, x, impl):
    ctx = None if context is None else context.astype(x.dtype)
    y = mgk_lib.mgk(p, x, context_BSD=ctx, causal=causal, mask=mask, implementation=impl)
    return jnp.sum(y * w_out.astype(y.dtype)), y

  grad = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True), static_argnums=2)
  (_, want), want_g = grad(params, x, "reference")
  close(want, want_np, 1e-10)
  f32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  (_, got), got_g = grad(f32, x.astype(jnp.float32), "xla")
  close(got, want_np, 5e-5)
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
    close(g, w, 5e-4)


def test_one_key_is_softmax_with_the_key_bias(rng):
  kq, kk, kv, ks = jax.random.split(rng, 4)
  q = normal(kq, (2, 9, 4, 8), jnp.float64)
  k = normal(kk, (2, 9, 2, 1, 8), jnp.float64)
  v = normal(kv, (2, 9, 2, 5), jnp.float64)
  log_sigma = 0.3 * normal(ks, (2, 1), jnp.float64)
  got = mgk_lib.mixture_attention(
    q, k, v, jnp.zeros((2, 9, 2, 1)), log_sigma, mask=CausalMask(), implementation="reference"
  )
  inv_var = jnp.exp(-2 * log_sigma[:, 0])  # [K]
  bias = -0.5 * jnp.sum(k[:, :, :, 0] ** 2, -1) * inv_var  # [B, S, K]
  bias_BNTS = jnp.repeat(jnp.swapaxes(bias, 1, 2), 2, axis=1)[:, :, None, :]
  want = dot_product_attention(
    q * jnp.repeat(inv_var, 2)[None, None, :, None],
    k[:, :, :, 0],
    v,
    mask=CausalMask(),
    bias=jnp.broadcast_to(bias_BNTS, (2, 4, 9, 9)),
    scale=1.0,
    implementation="reference",
  )
  close(got, want, 1e-12)


def test_nnx_layer_in_a_stack(rng):
  model = Transformer(
    num_layers=2,
    attention="mgk",
    d_model=D,
    num_heads=N,
    mlp="none",
    options={**MGKAttention.DEFAULT_OPTIONS, "mgk_keys": 3},
    rngs=nnx.Rngs(0),
  )
  layer = model.blocks[0].attn
  assert layer.w_k[...].shape == (D, N, 3, D // N)
  x = normal(rng, (2, 6, D), jnp.float32)
  want = mgk_lib.mgk(layer.param_tree(), x, causal=True, rope=layer.rope)
  close(layer(x), want, 1e-6)


def test_bad_input_messages(rng):
  params = registry.init_layer("mgk", rng, d_model=D, num_heads=N)
  x = normal(rng, (2, 5, D), jnp.float32)
  with pytest.raises(ValueError, match="mgk params must hold"):
    mgk_lib.mgk({n: params[n] for n in ("w_q", "w_k")}, x, causal=True)
  with pytest.raises(ValueError, match=r"params\['log_sigma'\] must have shape"):
    mgk_lib.mgk(dict(params, log_sigma=params["log_sigma"][:, :1]), x, causal=True)
  with pytest.raises(ValueError, match="mgk_keys must be >= 1; got 0"):
    registry.init_layer("mgk", rng, d_model=D, num_heads=N, mgk_keys=0)
