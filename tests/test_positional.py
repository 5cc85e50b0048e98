"""Positional attention (positional_attn): the weights do not change when the input does and
equal MHA with q/k computed from the encodings; the fast path equals the float64 reference
(values and gradients); the NNX layer; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import CausalMask, dot_product_attention, registry
from attn_jax.attention import positional as pos_lib
from attn_jax.nn.positional import PositionalAttention
from attn_jax.nn.transformer import Transformer

D, N = 16, 4


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def init(key, **kw):
  return registry.init_layer(
    "positional_attn", key, d_model=D, num_heads=N, dtype=jnp.float64, positional_dim=32, **kw
  )


@pytest.mark.parametrize("encoding", ["onehot", "sinusoidal"])
def test_weights_ignore_the_input_and_equal_mha_on_the_encodings(rng, encoding):
  kp, kx, ky = jax.random.split(rng, 3)
  params = init(kp, num_kv_heads=2)
  x, x2 = normal(kx, (2, 13, D), jnp.float64), normal(ky, (2, 13, D), jnp.float64)
  kw = dict(causal=True, positional_encoding=encoding)
  probs = pos_lib.positional_probs(params, x, **kw)
  close(pos_lib.positional_probs(params, x2, **kw), probs, 0.0)  # A(x) = A(x')
  # y = A (x W_V) W_O for both inputs, with the same A.
  for inp in (x, x2):
    v = jnp.repeat(jnp.einsum("btd,dkv->btkv", inp, params["w_v"]), 2, axis=2)
    want = jnp.einsum("bnts,bsnv,nvd->btd", probs, v, params["w_o"])
    close(pos_lib.positional_attn(params, inp, implementation="reference", **kw), want, 1e-12)
  # A equals MHA's weights with the q/k inputs replaced by the encodings P.
  P = pos_lib.encode_positions(jnp.broadcast_to(jnp.arange(13), (2, 13)), 32, encoding)
  q = jnp.einsum("btp,pnh->btnh", P.astype(jnp.float64), params["w_q"])
  k = jnp.einsum("btp,pkh->btkh", P.astype(jnp.float64), params["w_k"])
  eye = jnp.broadcast_to(
    jnp.eye(13)[:, None, :], (2, 13, 2, 13)
  )  # values = one-hot keys read out A
  got = dot_product_attention(q, k, eye, mask=CausalMask(), implementation="reference")
  close(jnp.einsum("btns->bnts", got), probs, 1e-12)


@pytest.mark.parametrize("cross", [False, True])
def test_fast_path_equals_float64_reference_with_gradients(rng, cross):
  kp, kx, kc, kw = jax.random.split(rng, 4)
  params = init(kp)
  x = normal(kx, (2, 11, D), jnp.float64)
  context = normal(kc, (2, 17, D), jnp.float64) if cross else None
  w_out = normal(kw, (2, 11, D), jnp.float64)

  def loss(p, x, impl):
    ctx = None if context is None else context.astype(x.dtype)
    y = pos_lib.positional_attn(p, x, context_BSD=ctx, causal=not cross, implementation=impl)
    return jnp.sum(y * w_out.astype(y.dtype)), y

  grad = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True), static_argnums=2)
  (_, want), want_g = grad(params, x, "reference")
  f32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  (_, got), got_g = grad(f32, x.astype(jnp.float32), "xla")
  close(got, want, 3e-5)
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
    close(g, w, 2e-4)


def test_nnx_layer_in_a_stack(rng):
  model = Transformer(
    num_layers=2,
    attention=["positional_attn", "mha"],
    d_model=D,
    num_heads=N,
    positions="learned",
    mlp="none",
    options={**PositionalAttention.DEFAULT_OPTIONS, "positional_dim": 16},
    rngs=nnx.Rngs(0),
  )
  layer = model.blocks[0].attn
  assert layer.w_q[...].shape == (16, N, D // N)
  x = normal(rng, (2, 9, D), jnp.float32)
  close(layer(x), pos_lib.positional_attn(layer.param_tree(), x, causal=True), 1e-6)
  assert np.all(np.isfinite(np.asarray(model(x))))


def test_bad_input_messages(rng):
  params = registry.init_layer("positional_attn", rng, d_model=D, num_heads=N)
  x = normal(rng, (2, 5, D), jnp.float32)
  with pytest.raises(ValueError, match="positional_attn takes no rope"):
    pos_lib.positional_attn(params, x, causal=True, rope={"base": 10000.0})
  with pytest.raises(ValueError, match="positional_encoding must be one of"):
    pos_lib.positional_attn(params, x, causal=True, positional_encoding="learned")
  with pytest.raises(ValueError, match=r"params\['w_k'\] must have shape"):
    pos_lib.positional_attn(dict(params, w_k=params["w_k"][:8]), x, causal=True)
  with pytest.raises(ValueError, match="use positions='learned' or 'none', not 'rope'"):
    PositionalAttention(d_model=D, num_heads=N, positions="rope", rngs=nnx.Rngs(0))
