"""Query/value temperature (query_temperature): τ ≡ 1 equals MHA; a very large temperature
makes rows one-hot on their argmax; the temperatures follow their formula; the flash path
equals the float64 reference with gradients; the NNX layer; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import CausalMask, dot_product_attention, registry
from attn_jax.attention import heads as heads_lib
from attn_jax.attention import temperature as temp_lib
from attn_jax.nn.transformer import Transformer

D, N = 16, 4
BASE = ("w_q", "w_k", "w_v", "w_o")


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def init(key, **kw):
  return registry.init_layer(
    "query_temperature", key, d_model=D, num_heads=N, dtype=jnp.float64, **kw
  )


def test_unit_temperature_is_mha_and_large_is_argmax(rng):
  kp, kx = jax.random.split(rng)
  params = init(kp, num_kv_heads=2)
  x = normal(kx, (2, 9, D), jnp.float64)
  base = {k: params[k] for k in BASE}
  unit = dict(params, a_pos=jnp.full((N,), -jnp.inf))  # u = 0 and softplus(-inf) = 0
  close(
    temp_lib.query_temperature(unit, x, causal=True),
    heads_lib.gqa(base, x, causal=True),
    1e-12,
  )
  # τ_q → ∞ (position term with a huge scale; query 0 stays at τ = 1 since log 1 = 0).
  hot = dict(params, a_pos=jnp.full((N,), 1e6))
  _, aux = temp_lib.query_temperature(hot, x, causal=True, return_aux=True)
  assert float(aux["tau_q"][:, 1:].min()) > 1e5
  call = heads_lib._check_call(D, x, None, True, None, None, None)
  q, k, v = heads_lib._static_qkv(base, x, x, call)
  s = jnp.einsum("btnh,bsnh->bnts", q, jnp.repeat(k, 2, 2))
  s = jnp.where(jnp.tril(jnp.ones((9, 9), bool)), s, -jnp.inf)
  onehot = jax.nn.one_hot(jnp.argmax(s, -1), 9, dtype=jnp.float64)  # [B, N, T, S]
  tau_v = aux["tau_v"][..., None]
  want = jnp.einsum("bnts,bsnv->btnv", onehot, jnp.repeat(v * tau_v, 2, 2))
  got = heads_lib.attend_kv_heads(
    q * aux["tau_q"][..., None], k, v * tau_v, mask=CausalMask(), implementation="reference"
  )
  close(got[:, 1:], want[:, 1:], 1e-6)


def test_formula_and_flash_path_with_gradients(rng):
  kp, kx, ku, kw = jax.random.split(rng, 4)
  params = init(kp)
  params["u_q"] = normal(ku, params["u_q"].shape, jnp.float64)
  params["u_v"] = normal(jax.random.fold_in(ku, 1), params["u_v"].shape, jnp.float64)
  params["a_pos"] = jnp.array([-1.0, 0.0, 0.5, 1.0])
  x = normal(kx, (2, 11, D), jnp.float64)
  y, aux = temp_lib.query_temperature(params, x, causal=True, return_aux=True)
  base = {k: params[k] for k in BASE}
  call = heads_lib._check_call(D, x, None, True, None, None, None)
  q, k, v = heads_lib._static_qkv(base, x, x, call)
  pos = np.log1p(np.arange(11))[None, :, None]
  want_tq = (
    1
    + np.tanh(np.einsum("btnh,nh->btn", q, params["u_q"]))
    + np.log1p(np.exp(np.asarray(params["a_pos"]))) * pos
  )
  close(aux["tau_q"], want_tq, 1e-12)
  close(aux["tau_v"], 1 + np.tanh(np.einsum("bskv,kv->bsk", v, params["u_v"])), 1e-12)
  want_y = heads_lib.output_projection(
    base,
    dot_product_attention(
      q * want_tq[..., None],
      k,
      v * aux["tau_v"][..., None],
      mask=CausalMask(),
      implementation="reference",
    ),
  )
  close(y, want_y, 1e-12)
  w = normal(kw, y.shape, jnp.float64)

  def loss(p, x, impl):
    return jnp.sum(temp_lib.query_temperature(p, x, causal=True, implementation=impl) * w)

  want, want_g = jax.value_and_grad(loss, (0, 1))(params, x, "reference")
  f32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  got, got_g = jax.jit(jax.value_and_grad(loss, (0, 1)), static_argnums=2)(
    f32, x.astype(jnp.float32), "xla"
  )
  close(got, want, 1e-4)
  for g, r in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
    close(g, r, 5e-4)


def test_nnx_layer_and_bad_input(rng):
  model = Transformer(
    num_layers=2,
    attention="query_temperature",
    d_model=D,
    num_heads=N,
    mlp="none",
    rngs=nnx.Rngs(0),
  )
  layer = model.blocks[0].attn
  x = normal(rng, (2, 6, D), jnp.float32)
  close(
    layer(x), temp_lib.query_temperature(layer.param_tree(), x, causal=True, rope=layer.rope), 1e-6
  )
  params = registry.init_layer("query_temperature", rng, d_model=D, num_heads=N)
  with pytest.raises(ValueError, match="query_temperature params must hold"):
    temp_lib.query_temperature({k: params[k] for k in BASE}, x, causal=True)
  with pytest.raises(ValueError, match=r"params\['u_q'\] must have shape \(4, 4\)"):
    temp_lib.query_temperature(dict(params, u_q=jnp.zeros((4, 3))), x, causal=True)
