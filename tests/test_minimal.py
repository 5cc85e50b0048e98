"""Attention with fewer projections (minimal_attn, pay_better; tier-3 rows built): the flash
path equals a float64 numpy oracle (values and gradients, causal and cross); the symmetric
minimal form has symmetric logits; Optimised equals MHA with a block-diagonal value
projection folded into W_O; Efficient is minimal attention plus W_O; NNX layers; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import heads as heads_lib
from attn_jax.attention import minimal as minimal_lib
from attn_jax.attention import registry
from attn_jax.nn.transformer import Transformer

D, N = 16, 4
h = D // N


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def np_softmax(s):
  e = np.exp(s - s.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_minimal(p, x, ctx=None, causal=False):
  x = np.asarray(x, np.float64)
  src = x if ctx is None else np.asarray(ctx, np.float64)
  B, T, _ = x.shape
  S = src.shape[1]
  out = np.zeros((B, T, D))
  for n in range(N):
    xs, ss = x[..., n * h : (n + 1) * h], src[..., n * h : (n + 1) * h]
    if "w_a" in p:
      A = np.asarray(p["w_a"][n], np.float64)
      W = A.T @ A
    else:
      W = np.asarray(p["w_q"][n], np.float64)
    s = np.einsum("bth,hg,bsg->bts", xs, W, ss) / np.sqrt(h)
    if causal:
      s = np.where(np.tril(np.ones((T, S), bool), S - T), s, -np.inf)
    out[..., n * h : (n + 1) * h] = np_softmax(s) @ ss
  return out


@pytest.mark.parametrize("symmetric", [False, True])
def test_minimal_equals_oracle_with_gradients(rng, symmetric):
  kp, kx, kc = jax.random.split(rng, 3)
  params = registry.init_layer(
    "minimal_attn", kp, d_model=D, num_heads=N, minimal_symmetric=symmetric, dtype=jnp.float64
  )
  assert set(params) == ({"w_a"} if symmetric else {"w_q"})
  x = normal(kx, (2, 11, D), jnp.float64)
  ctx = normal(kc, (2, 7, D), jnp.float64)
  for kw, want in (
    (dict(causal=True), np_minimal(params, x, causal=True)),
    (dict(causal=False, context_BSD=ctx), np_minimal(params, x, ctx)),
  ):
    close(minimal_lib.minimal_attn(params, x, implementation="xla", **kw), want, 1e-10)

  def loss(p, xx, impl):
    return jnp.sum(jnp.sin(minimal_lib.minimal_attn(p, xx, causal=True, implementation=impl)))

  grad = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)
  f32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  got = grad(f32, x.astype(jnp.float32), "xla")
  want = grad(params, x, "reference")
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    close(g, r, 2e-4)
  logits = np.asarray(minimal_lib.minimal_logits(params, x))
  assert np.allclose(logits, logits.transpose(0, 1, 3, 2)) == symmetric


def test_optimised_is_mha_with_block_diagonal_values_folded(rng):
  kp, kx, kb = jax.random.split(rng, 3)
  mha = registry.init_layer("head_dims", kp, d_model=D, num_heads=N, dtype=jnp.float64)
  blocks = normal(kb, (N, h, h), jnp.float64)
  w_v = jnp.zeros((D, N, h), jnp.float64)
  for n in range(N):
    w_v = w_v.at[n * h : (n + 1) * h, n].set(blocks[n])
  mha["w_v"] = w_v
  x = normal(kx, (2, 9, D), jnp.float64)
  want = heads_lib.head_dims(mha, x, causal=True, implementation="reference")
  got = minimal_lib.pay_better(minimal_lib.fold_mha(mha), x, causal=True)
  close(got, want, 1e-10)


def test_efficient_is_minimal_plus_output_projection(rng):
  kp, kx = jax.random.split(rng)
  p = registry.init_layer(
    "pay_better", kp, d_model=D, num_heads=N, pay_better_variant="efficient", dtype=jnp.float64
  )
  assert set(p) == {"w_q", "w_o"}
  x = normal(kx, (2, 9, D), jnp.float64)
  inner = minimal_lib.minimal_attn({"w_q": p["w_q"]}, x, causal=True)
  want = jnp.einsum("btnh,nhd->btd", inner.reshape(2, 9, N, h), p["w_o"])
  close(minimal_lib.pay_better(p, x, causal=True), want, 1e-12)


@pytest.mark.parametrize(
  "kind,options",
  [
    ("minimal_attn", {"minimal_symmetric": True, "minimal_rank": 2}),
    ("pay_better", {"pay_better_variant": "efficient"}),
  ],
)
def test_nnx_layers(rng, kind, options):
  model = Transformer(
    num_layers=2,
    attention=kind,
    d_model=D,
    num_heads=N,
    positions="learned",
    mlp="none",
    options=options,
    rngs=nnx.Rngs(0),
  )
  layer = model.blocks[0].attn
  x = normal(rng, (2, 6, D), jnp.float32)
  fn = minimal_lib.minimal_attn if kind == "minimal_attn" else minimal_lib.pay_better
  close(layer(x), fn(layer.param_tree(), x, causal=True), 1e-6)
  if kind == "minimal_attn":
    assert layer.param_tree()["w_a"].shape == (N, 2, h)


def test_bad_inputs(rng):
  p = registry.init_layer("minimal_attn", rng, d_model=D, num_heads=N)
  x = jnp.ones((1, 5, D))
  with pytest.raises(ValueError, match="must hold \\['w_q'\\] or \\['w_a'\\]"):
    minimal_lib.minimal_attn({"w_k": p["w_q"]}, x, causal=True)
  with pytest.raises(ValueError, match="take no rope"):
    minimal_lib.minimal_attn(p, x, causal=True, rope={"base": 10000.0, "rotary_dim": None})
  with pytest.raises(ValueError, match="pay_better_variant must be one of"):
    registry.init_layer("pay_better", rng, d_model=D, num_heads=N, pay_better_variant="super")
  with pytest.raises(ValueError, match="num_heads=3 must divide D=16"):
    registry.init_layer("minimal_attn", rng, d_model=D, num_heads=3)
