"""Efficient probe (multi-query attention pooling): the flash path equals a float64 per-query
oracle (values and gradients, with padding and an all-padding sample); M = 1 without value
splitting is single-query attention pooling; fewer parameters than an MHA probe; the
encoder's pooling option ignores padding; bad input and interface errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax import models
from attn_jax.attention import probe as probe_lib
from attn_jax.attention import registry
from attn_jax.nn import transformer


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def oracle(params, x, valid):
  """Float64 numpy, one query at a time: softmax over the valid tokens, own value slice."""
  q, w = np.asarray(params["queries"], np.float64), np.asarray(params["w_v"], np.float64)
  x = np.asarray(x, np.float64)
  M, D = q.shape
  C = w.shape[1] // M
  out = np.zeros((x.shape[0], w.shape[1]))
  for b in range(x.shape[0]):
    keep = np.asarray(valid[b])
    if not keep.any():
      continue
    xs = x[b][keep]
    for m in range(M):
      s = xs @ q[m] / math.sqrt(D)
      a = np.exp(s - s.max())
      a /= a.sum()
      out[b, m * C : (m + 1) * C] = a @ (xs @ w[:, m * C : (m + 1) * C])
  return out


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_equals_float64_oracle_with_gradients(rng, implementation):
  kp, kx, kv = jax.random.split(rng, 3)
  B, S, D, M = 3, 37, 24, 6
  params = registry.init_pool("efficient_probe", kp, d_model=D, num_queries=M, v_dim=18)
  x = normal(kx, (B, S, D), jnp.float32)
  valid = jax.random.uniform(kv, (B, S)) < 0.7
  valid = valid.at[1].set(False)  # a sample with nothing to pool
  out = registry.run_pool(
    "efficient_probe", params, x, valid_BS=valid, implementation=implementation
  )
  assert out.shape == (B, 18)
  close(out, oracle(params, x, valid), 2e-5)
  assert float(jnp.abs(out[1]).max()) == 0.0

  def loss(impl, p, xx):
    y = probe_lib.efficient_probe(p, xx, valid_BS=valid, implementation=impl)
    return jnp.sum(jnp.sin(y))

  p64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
  grad = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)
  g = grad(implementation, params, x)
  g64 = grad("reference", p64, x.astype(jnp.float64))
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g64), strict=True):
    assert np.all(np.isfinite(np.asarray(a)))
    close(a, b, 1e-4)


def test_pallas_interpret_forward_equals_the_oracle(rng):
  kp, kx = jax.random.split(rng)
  params = registry.init_pool("efficient_probe", kp, d_model=16, num_queries=4, v_dim=16)
  x = normal(kx, (1, 20, 16), jnp.float32)
  out = registry.run_pool("efficient_probe", params, x, implementation="pallas_interpret")
  close(out, oracle(params, x, np.ones((1, 20), bool)), 2e-5)


def test_one_query_without_splitting_is_attention_pooling(rng):
  kp, kx = jax.random.split(rng)
  D = 20
  params = registry.init_pool(
    "efficient_probe", kp, d_model=D, num_queries=1, v_dim=D, dtype=jnp.float64
  )
  x = normal(kx, (2, 15, D), jnp.float64)
  a = jax.nn.softmax(jnp.einsum("d,bsd->bs", params["queries"][0], x) / math.sqrt(D), axis=-1)
  pooled = jnp.einsum("bs,bsd->bd", a, x) @ params["w_v"]
  close(probe_lib.efficient_probe(params, x), pooled, 1e-12)


@pytest.mark.parametrize("D", [64, 384, 768])
def test_fewer_parameters_than_an_mha_probe(rng, D):
  params = probe_lib.init_efficient_probe(rng, d_model=D, num_queries=32, v_dim=D)
  count = sum(a.size for a in jax.tree.leaves(params))
  assert count == 32 * D + D * D
  assert count < probe_lib.mha_probe_param_count(D)


def test_encoder_pooling_ignores_padding_and_trains(rng):
  kx, kn = jax.random.split(rng)
  model = models.build(
    "encoder",
    rngs=nnx.Rngs(0),
    input_dim=5,
    num_outputs=3,
    d_model=32,
    num_layers=1,
    num_heads=2,
    max_len=16,
    pooling="efficient_probe",
    probe_queries=4,
  )
  x = normal(kx, (2, 12, 5), jnp.float32)
  seg = jnp.array([[1] * 12, [1] * 7 + [0] * 5], jnp.int32)
  forward = nnx.jit(lambda m, xx: m(xx, segment_ids_BT=seg))
  y = forward(model, x)
  assert y.shape == (2, 3) and np.all(np.isfinite(np.asarray(y)))
  # Changing the padded tokens of sample 1 leaves its output unchanged.
  x2 = x.at[1, 7:].set(normal(kn, (5, 5), jnp.float32) * 10)
  close(forward(model, x2), y, 1e-5)
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x, segment_ids_BT=seg) ** 2)))(model)
  g = grads.probe.queries[...]
  assert g.shape == (4, 32) and float(jnp.abs(g).max()) > 0


def test_bad_inputs(rng):
  params = probe_lib.init_efficient_probe(rng, d_model=8, num_queries=4)
  x = jnp.ones((2, 5, 8))
  with pytest.raises(ValueError, match="must be divisible by the number of queries M=4"):
    probe_lib.efficient_probe({**params, "w_v": jnp.ones((8, 6))}, x)
  with pytest.raises(ValueError, match=r"x must have shape \[B, S, D=8\]"):
    probe_lib.efficient_probe(params, jnp.ones((2, 5, 7)))
  with pytest.raises(ValueError, match="valid_BS must be a bool array of shape"):
    probe_lib.efficient_probe(params, x, valid_BS=jnp.ones((2, 4), bool))
  with pytest.raises(ValueError, match="efficient_probe params must hold"):
    probe_lib.efficient_probe({"queries": params["queries"]}, x)
  with pytest.raises(ValueError, match="v_dim must be a positive multiple of num_queries=32"):
    probe_lib.init_efficient_probe(rng, d_model=16)
  with pytest.raises(ValueError, match="has the 'pool' interface: use init_pool / run_pool"):
    registry.init_layer("efficient_probe", rng, d_model=8, num_heads=2)
  with pytest.raises(ValueError, match="is a pooling head, not a token mixer"):
    transformer.attention_module_class("efficient_probe")
  with pytest.raises(ValueError, match="pooling must be one of"):
    models.build(
      "encoder",
      rngs=nnx.Rngs(0),
      input_dim=2,
      num_outputs=1,
      d_model=8,
      num_layers=1,
      num_heads=2,
      pooling="probe",
    )
