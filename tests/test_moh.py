"""Mixture-of-head attention (moh): the fast path equals a float64 numpy oracle (values) and
the float64 reference (gradients), the gate and load-balance equations, the catalog checks,
causality, the NNX layer with its sown auxiliary loss, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import SegmentMask, registry
from attn_jax.attention import heads as heads_lib
from attn_jax.attention import moh as moh_lib
from attn_jax.nn.moh import MoHAttention
from attn_jax.nn.transformer import Transformer

D, N = 16, 6  # Ns = 1 shared, Nr = 5 routed (top 2 by default)


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def init(key, **options):
  params = registry.init_layer("moh", key, d_model=D, num_heads=N, dtype=jnp.float64, **options)
  for i, name in enumerate(("w_shared", "w_routed", "w_stage")):  # decisive router scores
    params[name] = 3 * normal(jax.random.fold_in(key, i), params[name].shape, jnp.float64)
  return params


def np_softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def oracle(params, x, *, k, causal=True, ids=None):
  """Gates and output written out in float64 numpy, token by token."""
  p = {n: np.asarray(a, np.float64) for n, a in params.items()}
  x = np.asarray(x, np.float64)
  B, T, _ = x.shape
  Ns = p["w_shared"].shape[1]
  gates = np.zeros((B, T, N))
  for b in range(B):
    for t in range(T):
      shared, routed = np_softmax(x[b, t] @ p["w_shared"]), np_softmax(x[b, t] @ p["w_routed"])
      a1, a2 = np_softmax(x[b, t] @ p["w_stage"])
      gates[b, t, :Ns] = a1 * shared
      for j in np.argsort(-routed)[:k]:
        gates[b, t, Ns + j] = a2 * routed[j]
  q = np.einsum("btd,dnh->btnh", x, p["w_q"])
  G = N // p["w_k"].shape[1]
  kk = np.repeat(np.einsum("btd,dkh->btkh", x, p["w_k"]), G, 2)
  v = np.repeat(np.einsum("btd,dkv->btkv", x, p["w_v"]), G, 2)
  s = np.einsum("btnh,bsnh->bnts", q, kk) / np.sqrt(q.shape[-1])
  ok = np.tril(np.ones((T, T), bool)) if causal else np.ones((T, T), bool)
  ok = np.broadcast_to(ok, (B, T, T))
  if ids is not None:
    ids = np.asarray(ids)
    ok = ok & (ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] != 0)
  s = np.where(ok[:, None], s, -np.inf)
  m = s.max(-1, keepdims=True)
  e = np.where(ok[:, None], np.exp(s - np.where(np.isfinite(m), m, 0)), 0)
  probs = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
  o = np.einsum("bnts,bsnv->btnv", probs, v) * gates[..., None]
  return np.einsum("btnv,nvd->btd", o, p["w_o"]), gates


@pytest.mark.parametrize("case", ["gqa_segments", "mha_top3_bidirectional"])
def test_fast_path_equals_float64_oracle_with_gradients(rng, case):
  kp, kx, kw = jax.random.split(rng, 3)
  gqa = case.startswith("gqa")
  params = init(kp, num_kv_heads=2 if gqa else None)
  k, causal = (2, True) if gqa else (3, False)
  x = normal(kx, (2, 11, D), jnp.float64)
  ids = jnp.array([[1] * 5 + [2] * 4 + [0] * 2, [1] * 11]) if gqa else None
  mask = None if ids is None else SegmentMask(ids, ids)
  want_np, gates_np = oracle(params, x, k=k, causal=causal, ids=ids)
  w_out = normal(kw, want_np.shape, jnp.float64)

  def loss(p, x, impl):
    y, aux = moh_lib.moh(
      p, x, causal=causal, mask=mask, implementation=impl, moh_top_k=k, return_aux=True
    )
    return jnp.sum(y * w_out.astype(y.dtype)) + aux["load_balance"], (y, aux["gates"])

  grad = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True), static_argnums=2)
  (_, (want, gates)), want_g = grad(params, x, "reference")
  close(want, want_np, 1e-10)
  close(gates, gates_np, 1e-12)
  f32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  (_, (got, _)), got_g = grad(f32, x.astype(jnp.float32), "xla")
  assert got.dtype == jnp.float32
  close(got, want_np, 3e-5)
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
    close(g, w, 1e-4)


def test_gate_structure_and_load_balance(rng):
  """Shared heads always on, exactly k routed heads per token, gates sum to 1; the balance
  loss equals Nr Σ f_j P_j and is 1 for a uniform router."""
  kp, kx = jax.random.split(rng)
  params = init(kp)
  x = normal(kx, (3, 9, D), jnp.float64)
  gates, balance = moh_lib.moh_gates(params, x, moh_top_k=2)
  g = np.asarray(gates)
  assert np.all(g[..., :1] > 0) and np.all((g[..., 1:] > 0).sum(-1) == 2)
  stage = np.asarray(jax.nn.softmax(x @ params["w_stage"]))
  close(g[..., 0], stage[..., 0], 1e-12)  # one shared head: its gate is α1
  assert np.all(g[..., 1:].sum(-1) <= stage[..., 1] + 1e-12)  # kept routed scores, not renormalised
  routed = np_softmax(np.asarray(x @ params["w_routed"]))
  kept = g[..., 1:] > 0
  want = 5 * np.sum(kept.reshape(-1, 5).mean(0) / 2 * routed.reshape(-1, 5).mean(0))
  close(balance, want, 1e-12)
  uniform = dict(params, w_routed=jnp.zeros_like(params["w_routed"]))
  _, balance = moh_lib.moh_gates(uniform, x, moh_top_k=2)
  close(balance, 1.0, 1e-12)


def test_gates_forced_to_one_equal_mha_and_zero_gated_heads_are_inert(rng):
  kp, kx, kv = jax.random.split(rng, 3)
  params = init(kp, num_kv_heads=3)
  x = normal(kx, (2, 10, D), jnp.float64)
  base = {n: params[n] for n in ("w_q", "w_k", "w_v", "w_o")}
  kw = dict(causal=True, implementation="reference")
  ones = jnp.ones((2, 10, N), jnp.float64)
  close(moh_lib.moh_from_gates(params, x, ones, **kw), heads_lib.gqa(base, x, **kw), 1e-12)
  # Head 5 (its own kv head with head 4) gated to 0 for every query: its output projection
  # can change without changing the output.
  gates = jnp.ones((2, 10, N), jnp.float64).at[..., 5].set(0)
  changed = dict(
    params, w_o=params["w_o"].at[5].set(normal(kv, params["w_o"][5].shape, jnp.float64))
  )
  close(
    moh_lib.moh_from_gates(changed, x, gates, **kw),
    moh_lib.moh_from_gates(params, x, gates, **kw),
    1e-12,
  )


def test_causal_through_gradients(rng):
  kp, kx = jax.random.split(rng)
  params, x = init(kp), normal(kx, (2, 11, D), jnp.float64)
  t = 4
  g_x = jax.jit(jax.grad(lambda x: jnp.sum(moh_lib.moh(params, x, causal=True)[:, t])))(x)
  g_x = np.asarray(g_x)
  assert np.all(g_x[:, t + 1 :] == 0) and np.any(g_x[:, : t + 1] != 0)


def test_bad_input_messages(rng):
  params = registry.init_layer("moh", rng, d_model=D, num_heads=N)
  x = normal(rng, (2, 5, D), jnp.float32)
  with pytest.raises(ValueError, match="moh_top_k must be <= the routed heads Nr=5"):
    moh_lib.moh(params, x, causal=True, moh_top_k=6)
  with pytest.raises(ValueError, match="moh params must hold"):
    moh_lib.moh({k: params[k] for k in ("w_q", "w_k", "w_v", "w_o")}, x, causal=True)
  with pytest.raises(ValueError, match="sum to N=6"):
    moh_lib.moh(dict(params, w_routed=params["w_routed"][:, :3]), x, causal=True)
  with pytest.raises(ValueError, match="gates_BTN must have shape"):
    moh_lib.moh_from_gates(params, x, jnp.ones((2, 5, 5)), causal=True)
  with pytest.raises(ValueError, match="moh_shared_heads must leave"):
    registry.init_layer("moh", rng, d_model=D, num_heads=N, moh_shared_heads=6)
  with pytest.raises(ValueError, match=r"moh_top_k must be in \[1, 5\]"):
    MoHAttention(d_model=D, num_heads=N, options={"moh_top_k": 7}, rngs=nnx.Rngs(0))


def test_nnx_layer_in_a_transformer_sows_its_load_balance_loss(rng):
  model = Transformer(
    num_layers=2,
    attention=["moh", "mha"],
    d_model=D,
    num_heads=N,
    num_kv_heads=2,
    mlp="none",
    options={**MoHAttention.DEFAULT_OPTIONS, "moh_top_k": 2},
    rngs=nnx.Rngs(0),
  )
  assert isinstance(model.blocks[0].attn, MoHAttention)
  x = normal(rng, (2, 7, D), jnp.float32)

  def aux_losses(inter):
    return [v for p, v in jax.tree_util.tree_flatten_with_path(inter)[0] if "aux_loss" in str(p)]

  @nnx.jit
  def run(model, x):
    def loss(m):
      y, inter = nnx.capture(m, nnx.Intermediate)(x)
      return jnp.sum(y**2) + 0.01 * sum(jnp.sum(a) for a in aux_losses(inter))

    return nnx.value_and_grad(loss)(model)

  loss, grads = run(model, x)
  assert np.isfinite(float(loss))
  _, inter = nnx.capture(model, nnx.Intermediate)(x)
  (balance,) = aux_losses(inter)  # one moh layer, one loss; the mha layer sows none
  assert np.isfinite(float(balance)) and float(balance) >= 1 - 1e-6  # Nr Σ f P >= 1
  g_router = np.asarray(grads.blocks[0].attn.w_routed[...])
  assert np.all(np.isfinite(g_router)) and np.any(g_router != 0)
