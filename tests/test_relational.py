"""Dual attention (relational_attn): the stacked-value flash form equals the materialised
Σ_j α_ij (r(x_i, x_j) W_r + s_j W_s) in float64 numpy (values) and the float64 reference
(gradients); all-sensory and all-relational splits; the NNX layer; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import SegmentMask, registry
from attn_jax.attention import relational as rel_lib
from attn_jax.nn.relational import RelationalAttention
from attn_jax.nn.transformer import Transformer

D, N = 16, 4


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def softmax_rows(s, ok):
  s = np.where(ok, s, -np.inf)
  m = s.max(-1, keepdims=True)
  e = np.where(ok, np.exp(s - np.where(np.isfinite(m), m, 0)), 0)
  return e / np.maximum(e.sum(-1, keepdims=True), 1e-300)


def oracle(params, x, context=None, *, causal, ids=None):
  p = {n: np.asarray(a, np.float64) for n, a in params.items()}
  x = np.asarray(x, np.float64)
  src = x if context is None else np.asarray(context, np.float64)
  B, T, S = x.shape[0], x.shape[1], src.shape[1]
  H = p["w_qa"].shape[-1]
  ok = np.ones((B, T, S), bool)
  if causal:
    ok &= np.tril(np.ones((T, S), bool), S - T)
  if ids is not None:
    ids = np.asarray(ids)
    ok &= (ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] != 0)
  heads = []
  for n in range(p["w_q"].shape[1]):  # sensory
    q, k, v = (
      np.einsum("bld,dh->blh", a, p[w][:, n]) for a, w in ((x, "w_q"), (src, "w_k"), (src, "w_v"))
    )
    a = softmax_rows(np.einsum("bth,bsh->bts", q, k) / np.sqrt(H), ok)
    heads.append(np.einsum("bts,bsv->btv", a, v))
  P = p["symbols"].shape[0]
  sym = np.stack([p["symbols"][j] if j < P else np.zeros(p["symbols"].shape[1]) for j in range(S)])
  for n in range(p["w_qa"].shape[1]):  # relational, materialised r(i, j)
    qa = np.einsum("btd,dh->bth", x, p["w_qa"][:, n])
    ka = np.einsum("bsd,dh->bsh", src, p["w_ka"][:, n])
    a = softmax_rows(np.einsum("bth,bsh->bts", qa, ka) / np.sqrt(H), ok)
    fq = np.einsum("btd,drf->btrf", x, p["w_fq"][:, n])
    fk = np.einsum("bsd,drf->bsrf", src, p["w_fk"][:, n])
    r = np.einsum("btrf,bsrf->btsr", fq, fk)  # [B, T, S, R]
    msg = np.einsum("btsr,rv->btsv", r, p["w_r"][n]) + (sym @ p["w_s"][n])[None, None]
    heads.append(np.einsum("bts,btsv->btv", a, msg))
  return np.einsum("btnv,nvd->btd", np.stack(heads, 2), p["w_o"])


@pytest.mark.parametrize("case", [("causal_segments", 2), ("cross", 4), ("all_sensory_but_one", 1)])
def test_flash_form_equals_materialised_relations_with_gradients(rng, case):
  name, nr = case
  kp, kx, kc, kw = jax.random.split(rng, 4)
  params = registry.init_layer(
    "relational_attn",
    kp,
    d_model=D,
    num_heads=N,
    dtype=jnp.float64,
    rel_heads=nr,
    rel_dim=3,
    rel_symbols=9,
  )
  x = normal(kx, (2, 11, D), jnp.float64)
  cross = name == "cross"
  context = normal(kc, (2, 13, D), jnp.float64) if cross else None  # S > P: zero symbols
  ids = jnp.array([[1] * 6 + [2] * 5, [1] * 9 + [0] * 2]) if name.startswith("causal") else None
  mask = None if ids is None else SegmentMask(ids, ids)
  causal = not cross
  want_np = oracle(params, x, context, causal=causal, ids=ids)
  w_out = normal(kw, want_np.shape, jnp.float64)

  def loss(p, x, impl):
    ctx = None if context is None else context.astype(x.dtype)
    y = rel_lib.relational_attn(
      p, x, context_BSD=ctx, causal=causal, mask=mask, implementation=impl
    )
    return jnp.sum(y * w_out.astype(y.dtype)), y

  grad = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True), static_argnums=2)
  (_, want), want_g = grad(params, x, "reference")
  close(want, want_np, 1e-10)
  f32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  (_, got), got_g = grad(f32, x.astype(jnp.float32), "xla")
  close(got, want_np, 5e-5)
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
    close(g, w, 5e-4)


def test_nnx_layer_and_bad_input(rng):
  model = Transformer(
    num_layers=2,
    attention="relational_attn",
    d_model=D,
    num_heads=N,
    mlp="none",
    options={**RelationalAttention.DEFAULT_OPTIONS, "rel_heads": 1, "rel_symbols": 16},
    rngs=nnx.Rngs(0),
  )
  layer = model.blocks[0].attn
  assert layer.w_q[...].shape == (D, 3, D // N) and layer.symbols[...].shape == (16, D // N)
  x = normal(rng, (2, 6, D), jnp.float32)
  close(
    layer(x), rel_lib.relational_attn(layer.param_tree(), x, causal=True, rope=layer.rope), 1e-6
  )
  params = registry.init_layer("relational_attn", rng, d_model=D, num_heads=N)
  with pytest.raises(ValueError, match="relational_attn params must hold"):
    rel_lib.relational_attn({k: params[k] for k in ("w_q", "w_k")}, x, causal=True)
  with pytest.raises(ValueError, match="rel_heads must be <= num_heads=4; got 5"):
    registry.init_layer("relational_attn", rng, d_model=D, num_heads=N, rel_heads=5)
  with pytest.raises(ValueError, match="no kv-head sharing"):
    registry.init_layer("relational_attn", rng, d_model=D, num_heads=N, num_kv_heads=2)
