"""Differential attention (diff_attn): the one-call fast path equals a float64 numpy oracle
that materialises A_1 − λ A_2 (values, float32 and bfloat16) and the float64 reference
(gradients); λ = 0 without the normalisation is plain attention on the first half; λ_init's
depth schedule reaches the layers of a stack; bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import SegmentMask, dot_product_attention, registry
from attn_jax.attention import differential as diff_lib
from attn_jax.nn.differential import DiffAttention
from attn_jax.nn.transformer import Transformer

D, N = 16, 4


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def init(key, **kw):
  params = registry.init_layer("diff_attn", key, d_model=D, num_heads=N, dtype=jnp.float64, **kw)
  params["norm"] = 1 + 0.3 * normal(jax.random.fold_in(key, 5), params["norm"].shape, jnp.float64)
  return params


def np_softmax_masked(s, ok):
  s = np.where(ok, s, -np.inf)
  m = s.max(-1, keepdims=True)
  e = np.where(ok, np.exp(s - np.where(np.isfinite(m), m, 0)), 0)
  return e / np.maximum(e.sum(-1, keepdims=True), 1e-300)


def oracle(params, x, context=None, *, causal, layer, ids=None):
  """The materialised maps: (A_1 − λ A_2) v, RMSNorm per head, × (1 − λ_init), W_O."""
  p = {n: np.asarray(a, np.float64) for n, a in params.items()}
  x = np.asarray(x, np.float64)
  src = x if context is None else np.asarray(context, np.float64)
  G = N // p["w_k"].shape[1]
  h = p["w_q"].shape[-1]
  q = np.einsum("btd,dnih->btnih", x, p["w_q"])
  k = np.repeat(np.einsum("bsd,dkih->bskih", src, p["w_k"]), G, 2)
  v = np.repeat(np.einsum("bsd,dkv->bskv", src, p["w_v"]), G, 2)
  T, S = q.shape[1], k.shape[1]
  ok = np.ones((x.shape[0], T, S), bool)
  if causal:
    ok &= np.tril(np.ones((T, S), bool), S - T)
  if ids is not None:
    ids = np.asarray(ids)
    ok &= (ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] != 0)
  maps = [
    np_softmax_masked(
      np.einsum("btnh,bsnh->bnts", q[..., i, :], k[..., i, :]) / np.sqrt(h), ok[:, None]
    )
    for i in (0, 1)
  ]
  lam_init = 0.8 - 0.6 * math.exp(-0.3 * (layer - 1))
  lam = np.exp(p["lambda_q1"] @ p["lambda_k1"]) - np.exp(p["lambda_q2"] @ p["lambda_k2"]) + lam_init
  o = np.einsum("bnts,bsnv->btnv", maps[0] - lam * maps[1], v)
  o = o / np.sqrt(np.mean(o**2, -1, keepdims=True) + 1e-5) * p["norm"] * (1 - lam_init)
  return np.einsum("btnv,nvd->btd", o, p["w_o"])


@pytest.mark.parametrize("case", ["causal_gqa_segments", "cross_bidirectional"])
def test_one_call_equals_materialised_difference_with_gradients(rng, case):
  kp, kx, kc, kw = jax.random.split(rng, 4)
  cross = case.startswith("cross")
  params = init(kp, num_kv_heads=None if cross else 2)
  x = normal(kx, (2, 11, D), jnp.float64)
  context = normal(kc, (2, 7, D), jnp.float64) if cross else None
  ids = None if cross else jnp.array([[1] * 6 + [2] * 5, [1] * 9 + [0] * 2])
  mask = None if ids is None else SegmentMask(ids, ids)
  causal, layer = not cross, 3
  want_np = oracle(params, x, context, causal=causal, layer=layer, ids=ids)
  w_out = normal(kw, want_np.shape, jnp.float64)

  def loss(p, x, impl):
    ctx = None if context is None else context.astype(x.dtype)
    y = diff_lib.diff_attn(
      p, x, context_BSD=ctx, causal=causal, mask=mask, implementation=impl, layer_index=layer
    )
    return jnp.sum(y * w_out.astype(y.dtype)), y

  grad = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True), static_argnums=2)
  (_, want), want_g = grad(params, x, "reference")
  close(want, want_np, 1e-10)
  f32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  (_, got), got_g = grad(f32, x.astype(jnp.float32), "xla")
  assert got.dtype == jnp.float32
  close(got, want_np, 5e-5)
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
    close(g, w, 5e-4)
  bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  (_, got), _ = grad(bf16, x.astype(jnp.bfloat16), "xla")
  close(got, want_np, 6e-2)  # bfloat16: 8 mantissa bits through two maps and a difference


def test_zero_lambda_is_plain_attention_on_the_first_half(rng):
  kq, kk, kv = jax.random.split(rng, 3)
  q1, q2 = normal(kq, (2, 2, 13, 6, 8), jnp.float32)
  k1, k2 = normal(kk, (2, 2, 13, 3, 8), jnp.float32)
  v = normal(kv, (2, 13, 3, 16), jnp.float32)
  for impl in ("reference", "xla"):
    got = diff_lib.differential_heads(q1, k1, q2, k2, v, 0.0, implementation=impl)
    close(got, dot_product_attention(q1, k1, v, implementation="reference"), 2e-6)
  # λ = 1 with identical halves cancels exactly.
  close(diff_lib.differential_heads(q1, k1, q1, k1, v, 1.0), 0.0, 1e-6)


def test_lambda_init_schedule_reaches_the_stack_layers(rng):
  assert diff_lib.lambda_init(1) == pytest.approx(0.2)
  assert diff_lib.lambda_init(100) == pytest.approx(0.8, abs=1e-9)
  model = Transformer(
    num_layers=3, attention="diff_attn", d_model=D, num_heads=N, mlp="none", rngs=nnx.Rngs(0)
  )
  assert [b.attn.layer_index for b in model.blocks] == [1, 2, 3]
  x = normal(rng, (2, 5, D), jnp.float32)
  layer = model.blocks[2].attn
  want = diff_lib.diff_attn(layer.param_tree(), x, causal=True, layer_index=3, rope=layer.rope)
  close(layer(x), want, 1e-6)
  other = diff_lib.diff_attn(layer.param_tree(), x, causal=True, layer_index=1, rope=layer.rope)
  assert not np.allclose(np.asarray(want), np.asarray(other), atol=1e-4)


def test_bad_input_messages(rng):
  params = registry.init_layer("diff_attn", rng, d_model=D, num_heads=N)
  x = normal(rng, (2, 5, D), jnp.float32)
  with pytest.raises(ValueError, match="diff_attn params must hold"):
    diff_lib.diff_attn({k: params[k] for k in ("w_q", "w_k")}, x, causal=True)
  with pytest.raises(ValueError, match=r"params\['norm'\] must have shape \(4,\)"):
    diff_lib.diff_attn(dict(params, norm=params["norm"][:3]), x, causal=True)
  with pytest.raises(ValueError, match="layer_index must be >= 1; got 0"):
    diff_lib.diff_attn(params, x, causal=True, layer_index=0)
  with pytest.raises(ValueError, match="the two halves must have equal shapes"):
    q = normal(rng, (1, 4, 2, 8), jnp.float32)
    diff_lib.differential_heads(q, q, q[..., :4], q, q, 0.5)
  with pytest.raises(ValueError, match="needs an even head width"):
    DiffAttention(d_model=15, num_heads=5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_kv_heads=3 must divide num_heads=4"):
    registry.init_layer("diff_attn", rng, d_model=D, num_heads=N, num_kv_heads=3)


def grouped_init(key, ratio):
  params = registry.init_layer(
    "grouped_diff_attn", key, d_model=D, num_heads=N, dtype=jnp.float64, gdiff_ratio=ratio
  )
  params["norm"] = 1 + 0.3 * normal(jax.random.fold_in(key, 5), params["norm"].shape, jnp.float64)
  return params


def as_diff_params(g, ratio):
  """The diff_attn parameters whose second halves are the noise heads repeated ratio times."""
  rep = lambda w: jnp.repeat(w, ratio, axis=1)  # noqa: E731
  return {
    "w_q": jnp.stack([g["w_q_s"], rep(g["w_q_n"])], axis=2),
    "w_k": jnp.stack([g["w_k_s"], rep(g["w_k_n"])], axis=2),
    **{n: g[n] for n in ("w_v", "w_o", "norm", "lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")},
  }


@pytest.mark.parametrize("ratio", [1, 2, 4])
def test_grouped_equals_diff_attn_with_repeated_noise_heads(rng, ratio):
  """Ratio 1:1 is diff_attn; r:1 equals diff_attn whose noise halves repeat each noise head r
  times (each noise map computed once in the fast path)."""
  kp, kx = jax.random.split(rng)
  params = grouped_init(kp, ratio)
  assert params["w_q_n"].shape[1] == N // ratio
  x = normal(kx, (2, 10, D), jnp.float64)
  kw = dict(causal=True, layer_index=2, implementation="reference")
  want = diff_lib.diff_attn(as_diff_params(params, ratio), x, **kw)
  close(diff_lib.grouped_diff_attn(params, x, **kw), want, 1e-12)


def test_grouped_fast_path_gradients(rng):
  kp, kx, kw = jax.random.split(rng, 3)
  params = grouped_init(kp, 2)
  x = normal(kx, (2, 11, D), jnp.float64)
  w_out = normal(kw, (2, 11, D), jnp.float64)

  def loss(p, x, impl):
    y = diff_lib.grouped_diff_attn(p, x, causal=True, implementation=impl, layer_index=4)
    return jnp.sum(y * w_out.astype(y.dtype)), y

  grad = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True), static_argnums=2)
  (_, want), want_g = grad(params, x, "reference")
  f32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  (_, got), got_g = grad(f32, x.astype(jnp.float32), "xla")
  close(got, want, 5e-5)
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
    close(g, w, 5e-4)
  with pytest.raises(ValueError, match="gdiff_ratio=3 must divide num_heads=4"):
    registry.init_layer("grouped_diff_attn", kp, d_model=D, num_heads=N, gdiff_ratio=3)
  with pytest.raises(ValueError, match="not num_kv_heads; got num_kv_heads=2"):
    DiffAttention(
      d_model=D, num_heads=N, num_kv_heads=2, kind="grouped_diff_attn", rngs=nnx.Rngs(0)
    )


def test_captured_map_reproduces_the_layer_and_rows_sum_to_one_minus_lambda(rng):
  layer = DiffAttention(d_model=D, num_heads=N, positions="none", layer_index=2, rngs=nnx.Rngs(3))
  x = normal(rng, (2, 7, D), jnp.float32)
  out, inter = nnx.capture(layer, nnx.Intermediate)(x, capture=True)
  close(out, layer(x), 1e-6)
  amap = inter["probs"].get_value()[0]
  p = layer.param_tree()
  lam = diff_lib.diff_lambda(p, 2)
  assert amap.shape == (2, N, 7, 7)
  close(amap.sum(-1), jnp.broadcast_to(1 - lam, (2, N, 7)), 1e-5)
  assert float(jnp.abs(jnp.triu(amap, 1)).max()) == 0.0  # causal
  G = N // p["w_k"].shape[1]
  v = jnp.repeat(jnp.einsum("bsd,dkv->bskv", x, p["w_v"]), G, 2)
  o = jnp.einsum("bnts,bsnv->btnv", amap, v)
  o = o / jnp.sqrt(jnp.mean(o**2, -1, keepdims=True) + 1e-5) * p["norm"]
  o = o * (1 - diff_lib.lambda_init(2))
  close(jnp.einsum("btnv,nvd->btd", o, p["w_o"]), out, 1e-5)
