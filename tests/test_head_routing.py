"""Head routing besides MoH (moa, mae_h1): the fast paths equal float64 numpy oracles (values)
and the float64 reference (gradients), the routing equations, the catalog checks, the NNX
layers with MoA's sown auxiliary loss, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import SegmentMask, registry
from attn_jax.attention import head_routing as routing
from attn_jax.attention import heads as heads_lib
from attn_jax.nn.head_routing import MAEAttention, MoAAttention
from attn_jax.nn.transformer import Transformer

D = 16
BASE = ("w_q", "w_k", "w_v", "w_o")


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def init(kind, key, num_heads, **options):
  params = registry.init_layer(
    kind, key, d_model=D, num_heads=num_heads, dtype=jnp.float64, **options
  )
  params["w_gate"] = 3 * normal(jax.random.fold_in(key, 7), params["w_gate"].shape, jnp.float64)
  return params


def np_softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_heads(p, x, context, *, causal, ids=None):
  """Per-head outputs [B, T, N, Hv] of the projections, written out (no positions)."""
  src = x if context is None else context
  N = p["w_q"].shape[1]
  G = N // p["w_k"].shape[1]
  q = np.einsum("btd,dnh->btnh", x, p["w_q"])
  k = np.repeat(np.einsum("bsd,dkh->bskh", src, p["w_k"]), G, 2)
  v = np.repeat(np.einsum("bsd,dkv->bskv", src, p["w_v"]), G, 2)
  s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  T, S = q.shape[1], k.shape[1]
  ok = np.ones((x.shape[0], T, S), bool)
  if causal:
    ok &= np.tril(np.ones((T, S), bool), S - T)
  if ids is not None:
    ids = np.asarray(ids)
    ok &= (ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] != 0)
  s = np.where(ok[:, None], s, -np.inf)
  m = s.max(-1, keepdims=True)
  e = np.where(ok[:, None], np.exp(s - np.where(np.isfinite(m), m, 0)), 0)
  probs = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
  return np.einsum("bnts,bsnv->btnv", probs, v)


def moa_oracle(params, x, context=None, *, k, causal, ids=None):
  """Routing token by token, then each kept expert's attention and output projection."""
  p = {n: np.asarray(a, np.float64) for n, a in params.items()}
  x = np.asarray(x, np.float64)
  context = None if context is None else np.asarray(context, np.float64)
  o = np_heads(p, x, context, causal=causal, ids=ids)  # [B, T, E, Hv]
  B, T, E, _ = o.shape
  y = np.zeros((B, T, D))
  gates = np.zeros((B, T, E))
  for b in range(B):
    for t in range(T):
      probs = np_softmax(x[b, t] @ p["w_gate"])
      kept = np.argsort(-probs)[:k]
      for e in kept:
        gates[b, t, e] = probs[e] / probs[kept].sum()
        y[b, t] += gates[b, t, e] * o[b, t, e] @ p["w_o"][e]
  return y, gates


@pytest.mark.parametrize("case", ["causal_segments", "cross_bidirectional"])
def test_moa_equals_float64_oracle_with_gradients(rng, case):
  kp, kx, kc, kw = jax.random.split(rng, 4)
  E, k = 6, 2
  params = init("moa", kp, E)
  x = normal(kx, (2, 11, D), jnp.float64)
  cross = case.startswith("cross")
  context = normal(kc, (2, 8, D), jnp.float64) if cross else None
  ids = None if cross else jnp.array([[1] * 5 + [2] * 4 + [0] * 2, [1] * 11])
  mask = None if ids is None else SegmentMask(ids, ids)
  causal = not cross
  want_np, gates_np = moa_oracle(params, x, context, k=k, causal=causal, ids=ids)
  w_out = normal(kw, want_np.shape, jnp.float64)

  def loss(p, x, impl, dense):
    kw = dict(context_BSD=context, causal=causal, mask=mask, implementation=impl, moa_top_k=k)
    if context is not None:
      kw["context_BSD"] = context.astype(x.dtype)
    y = routing.moa_dense(p, x, **kw) if dense else routing.moa(p, x, **kw)
    _, _, aux = routing.moa_route(p, x, moa_top_k=k)
    return jnp.sum(y * w_out.astype(y.dtype)) + aux["load_balance"] + aux["z_loss"], y

  grad = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True), static_argnums=(2, 3))
  (_, want), want_g = grad(params, x, "reference", True)  # the dense form, float64
  close(want, want_np, 1e-10)
  (_, got64), got64_g = grad(params, x, "reference", False)  # gathered top-k, float64
  close(got64, want_np, 1e-10)
  for g, w in zip(jax.tree.leaves(got64_g), jax.tree.leaves(want_g), strict=True):
    close(g, w, 1e-9)
  f32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  (_, got), got_g = grad(f32, x.astype(jnp.float32), "xla", False)
  assert got.dtype == jnp.float32
  close(got, want_np, 3e-5)
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
    close(g, w, 2e-4)
  _, aux = routing.moa(params, x, causal=causal, context_BSD=context, moa_top_k=k, return_aux=True)
  close(aux["gates"], gates_np, 1e-12)


def test_moa_routing_and_losses(rng):
  """k distinct experts per token with weights summing to 1; load balance E Σ f P (1 for a
  uniform router); z-loss the mean squared router log-normaliser."""
  kp, kx = jax.random.split(rng)
  E, k = 5, 2
  params = init("moa", kp, E)
  x = normal(kx, (3, 9, D), jnp.float64)
  w, idx, aux = routing.moa_route(params, x, moa_top_k=k)
  close(w.sum(-1), 1.0, 1e-12)
  i = np.asarray(idx)
  assert i.shape == (3, 9, k) and np.all(i[..., 0] != i[..., 1])
  logits = np.asarray(x @ params["w_gate"])
  probs = np_softmax(logits)
  kept = np.zeros_like(probs)
  np.put_along_axis(kept, i, 1, -1)
  want = E * np.sum(kept.reshape(-1, E).mean(0) / k * probs.reshape(-1, E).mean(0))
  close(aux["load_balance"], want, 1e-12)
  lse = np.log(np.exp(logits).sum(-1))
  close(aux["z_loss"], np.mean(lse**2), 1e-12)
  uniform = dict(params, w_gate=jnp.zeros_like(params["w_gate"]))
  _, _, aux = routing.moa_route(uniform, x, moa_top_k=k)
  close(aux["load_balance"], 1.0, 1e-12)
  close(aux["z_loss"], np.log(E) ** 2, 1e-12)


def test_moa_top_all_equals_gated_mqa(rng):
  """k = E keeps every expert: the layer is an MQA whose head outputs are weighted by the
  router probabilities."""
  kp, kx = jax.random.split(rng)
  E = 4
  params = init("moa", kp, E)
  x = normal(kx, (2, 7, D), jnp.float64)
  probs = jax.nn.softmax(x @ params["w_gate"], -1)
  base = {n: params[n] for n in BASE}
  call = heads_lib._check_call(D, x, None, True, None, None, None)
  want = heads_lib.gated_heads(base, x, probs, call, "reference")
  close(routing.moa(params, x, causal=True, moa_top_k=E), want, 1e-12)


def mae_oracle(params, x, context=None, *, causal):
  """The mixture form: Σ_i g_i · (N/(N−1)) · (the layer without head i)."""
  p = {n: np.asarray(a, np.float64) for n, a in params.items()}
  x = np.asarray(x, np.float64)
  context = None if context is None else np.asarray(context, np.float64)
  o = np_heads(p, x, context, causal=causal)  # [B, T, N, Hv]
  B, T, N, _ = o.shape
  head_out = np.einsum("btnv,nvd->btnd", o, p["w_o"])
  if causal:
    pooled = np.cumsum(x, 1) / np.arange(1, T + 1)[:, None]
  else:
    pooled = np.broadcast_to(x.mean(1, keepdims=True), x.shape)
  g = np_softmax(pooled @ p["w_gate"])
  y = np.zeros((B, T, D))
  for i in range(N):
    expert = (N / (N - 1)) * (head_out.sum(2) - head_out[:, :, i])
    y += g[..., i : i + 1] * expert
  return y


@pytest.mark.parametrize("case", ["causal_gqa", "cross_bidirectional"])
def test_mae_mixture_form_equals_reweighting_form_with_gradients(rng, case):
  kp, kx, kc, kw = jax.random.split(rng, 4)
  cross = case.startswith("cross")
  params = init("mae_h1", kp, 4, num_kv_heads=None if cross else 2)
  x = normal(kx, (2, 10, D), jnp.float64)
  context = normal(kc, (2, 6, D), jnp.float64) if cross else None
  causal = not cross
  want_np = mae_oracle(params, x, context, causal=causal)
  w_out = normal(kw, want_np.shape, jnp.float64)

  def loss(p, x, impl):
    ctx = None if context is None else context.astype(x.dtype)
    y = routing.mae_h1(p, x, context_BSD=ctx, causal=causal, implementation=impl)
    return jnp.sum(y * w_out.astype(y.dtype)), y

  grad = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True), static_argnums=2)
  (_, want), want_g = grad(params, x, "reference")
  close(want, want_np, 1e-10)
  f32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  (_, got), got_g = grad(f32, x.astype(jnp.float32), "xla")
  close(got, want_np, 3e-5)
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
    close(g, w, 2e-4)


def test_mae_uniform_gate_equals_mha(rng):
  kp, kx = jax.random.split(rng)
  params = init("mae_h1", kp, 4)
  params["w_gate"] = jnp.zeros_like(params["w_gate"])
  x = normal(kx, (2, 9, D), jnp.float64)
  base = {n: params[n] for n in BASE}
  for causal in (True, False):
    want = heads_lib.head_dims(base, x, causal=causal)
    close(routing.mae_h1(params, x, causal=causal), want, 1e-12)


@pytest.mark.parametrize("kind", ["moa", "mae_h1"])
def test_causal_through_gradients(rng, kind):
  kp, kx = jax.random.split(rng)
  params, x = init(kind, kp, 4), normal(kx, (2, 11, D), jnp.float64)
  fn = routing.moa if kind == "moa" else routing.mae_h1
  t = 4
  g_x = jax.jit(jax.grad(lambda x: jnp.sum(fn(params, x, causal=True)[:, t])))(x)
  g_x = np.asarray(g_x)
  assert np.all(g_x[:, t + 1 :] == 0) and np.any(g_x[:, : t + 1] != 0)


def test_bad_input_messages(rng):
  x = normal(rng, (2, 5, D), jnp.float32)
  moa_p = registry.init_layer("moa", rng, d_model=D, num_heads=4)
  with pytest.raises(ValueError, match="moa_top_k must be <= the experts E=4"):
    routing.moa(moa_p, x, causal=True, moa_top_k=5)
  with pytest.raises(ValueError, match="moa params must hold"):
    routing.moa({n: moa_p[n] for n in BASE}, x, causal=True)
  with pytest.raises(ValueError, match=r"params\['w_gate'\] must have shape \(16, 4\)"):
    routing.moa(dict(moa_p, w_gate=moa_p["w_gate"][:, :3]), x, causal=True)
  with pytest.raises(ValueError, match="moa shares one key and one value head"):
    registry.init_layer("moa", rng, d_model=D, num_heads=4, num_kv_heads=2)
  with pytest.raises(ValueError, match=r"moa_top_k must be in \[1, 4\]"):
    MoAAttention(d_model=D, num_heads=4, options={"moa_top_k": 5}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_heads must be >= 2"):
    registry.init_layer("mae_h1", rng, d_model=D, num_heads=1)
  mae_p = registry.init_layer("mae_h1", rng, d_model=D, num_heads=4)
  with pytest.raises(ValueError, match="mae_h1 params must hold"):
    routing.mae_h1({n: mae_p[n] for n in BASE}, x, causal=True)
  with pytest.raises(ValueError, match="x_BTD must have model dim D=16"):
    routing.mae_h1(mae_p, x[..., :8], causal=True)


def test_nnx_layers_in_a_transformer_and_moa_aux_loss(rng):
  model = Transformer(
    num_layers=2,
    attention=["moa", "mae_h1"],
    d_model=D,
    num_heads=4,
    mlp="none",
    options={**MoAAttention.DEFAULT_OPTIONS, "moa_top_k": 2},
    rngs=nnx.Rngs(0),
  )
  assert isinstance(model.blocks[0].attn, MoAAttention)
  assert isinstance(model.blocks[1].attn, MAEAttention)
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
  (sown,) = aux_losses(inter)  # the moa layer sows one loss, mae_h1 none
  layer = model.blocks[0].attn
  h = model.blocks[0].attn_norm(x)
  _, _, aux = routing.moa_route(layer.param_tree(), h, moa_top_k=2)
  close(sown, aux["load_balance"] + 0.1 * aux["z_loss"], 1e-6)
  for g in (grads.blocks[0].attn.w_gate[...], grads.blocks[1].attn.w_gate[...]):
    assert np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g) != 0)
