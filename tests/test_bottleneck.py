"""Fusion bottleneck tokens (mbt_bottleneck): the one-call flash path equals the separate
per-modality oracle (values and gradients, fused and unfused, uneven lengths, three
modalities, GQA); unfused layers are per-modality MHA; one fused layer passes nothing from
modality B to A, two pass it only through the fusion tokens; a stack whose fusion layer is
above its top keeps the modalities independent; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import bottleneck as mbt
from attn_jax.attention import registry
from attn_jax.nn import bottleneck as mbt_nn
from attn_jax.nn.transformer import Transformer

D = 16


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def _params(key, M=2, N=2, K=None, dtype=jnp.float32):
  return registry.init_layer(
    "mbt_bottleneck", key, d_model=D, num_heads=N, num_kv_heads=K, num_modalities=M, dtype=dtype
  )


@pytest.mark.parametrize(
  "M,F,lengths,K,fuse",
  [(2, 4, None, None, True), (2, 3, (11, 5), 1, False), (3, 2, (4, 9, 6), None, True)],
)
def test_one_call_equals_separate_oracle_with_gradients(rng, M, F, lengths, K, fuse):
  kp, kx = jax.random.split(rng)
  T = F + (sum(lengths) if lengths else 17)
  params = _params(kp, M=M, N=2, K=K)
  x = normal(kx, (2, T, D), jnp.float32)
  kw = dict(causal=False, num_fusion=F, modality_lengths=lengths, fuse=fuse)

  def loss(impl, p, xx):
    return jnp.sum(jnp.sin(mbt.mbt_bottleneck(p, xx, implementation=impl, **kw)))

  p64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
  x64 = x.astype(jnp.float64)
  run = jax.jit(mbt.mbt_bottleneck, static_argnames=("implementation", *kw))
  close(
    run(params, x, implementation="xla", **kw),
    run(p64, x64, implementation="reference", **kw),
    2e-5,
  )
  grad = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)
  g = grad("xla", params, x)
  g64 = grad("reference", p64, x64)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g64), strict=True):
    close(a, b, 1e-4)


def _mha(params, m, x):
  q = jnp.einsum("bld,dnh->blnh", x, params["w_q"][m])
  k = jnp.einsum("bld,dnh->blnh", x, params["w_k"][m])
  v = jnp.einsum("bld,dnh->blnh", x, params["w_v"][m])
  a = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1]), axis=-1)
  return jnp.einsum("bnts,bsnh,nhd->btd", a, v, params["w_o"][m])


def test_unfused_layer_is_per_modality_mha_and_fused_layer_averages_fusion(rng):
  kp, kx = jax.random.split(rng)
  params = _params(kp, dtype=jnp.float64)
  F, (La, Lb) = 3, (7, 5)
  x = normal(kx, (2, F + La + Lb, D), jnp.float64)
  z, xa, xb = x[:, :F], x[:, F : F + La], x[:, F + La :]
  kw = dict(causal=False, num_fusion=F, modality_lengths=(La, Lb))
  run = jax.jit(mbt.mbt_bottleneck, static_argnames=("fuse", *kw))
  y = run(params, x, fuse=False, **kw)
  close(y[:, F : F + La], _mha(params, 0, xa), 1e-12)
  close(y[:, F + La :], _mha(params, 1, xb), 1e-12)
  close(y[:, :F], (_mha(params, 0, z) + _mha(params, 1, z)) / 2, 1e-12)
  y = run(params, x, fuse=True, **kw)
  ya = _mha(params, 0, jnp.concatenate([z, xa], 1))
  yb = _mha(params, 1, jnp.concatenate([z, xb], 1))
  close(y[:, F : F + La], ya[:, F:], 1e-12)
  close(y[:, :F], (ya[:, :F] + yb[:, :F]) / 2, 1e-12)


def test_information_crosses_modalities_only_through_fusion_tokens(rng):
  kp1, kp2, kx = jax.random.split(rng, 3)
  p1, p2 = _params(kp1, dtype=jnp.float64), _params(kp2, dtype=jnp.float64)
  F, La, Lb = 2, 6, 5
  x = normal(kx, (1, F + La + Lb, D), jnp.float64)
  kw = dict(causal=False, num_fusion=F, modality_lengths=(La, Lb), fuse=True)
  a_out = slice(F, F + La)

  def two_layers(x, cut_fusion):
    h = x + mbt.mbt_bottleneck(p1, x, **kw)
    if cut_fusion:
      h = h.at[:, :F].set(jax.lax.stop_gradient(h[:, :F]))
    return h + mbt.mbt_bottleneck(p2, h, **kw)

  def grad_a_wrt_b(fn):
    return jax.jit(jax.grad(lambda xx: jnp.sum(fn(xx)[:, a_out] ** 2)))(x)[:, F + La :]

  one = grad_a_wrt_b(lambda xx: xx + mbt.mbt_bottleneck(p1, xx, **kw))
  assert float(jnp.abs(one).max()) == 0.0  # one fused layer: a does not see b
  two = grad_a_wrt_b(lambda xx: two_layers(xx, cut_fusion=False))
  assert float(jnp.abs(two).max()) > 1e-6  # two: b reaches a through z
  cut = grad_a_wrt_b(lambda xx: two_layers(xx, cut_fusion=True))
  assert float(jnp.abs(cut).max()) == 0.0  # ... and only through z


@pytest.mark.parametrize("fusion_layer,independent", [(3, True), (1, False)])
def test_stack_with_fusion_layer_above_the_top_keeps_modalities_independent(
  rng, fusion_layer, independent
):
  kx, kn = jax.random.split(rng)
  stack = Transformer(
    num_layers=2,
    attention="mbt_bottleneck",
    d_model=D,
    num_heads=2,
    causal=False,
    positions="none",
    options={
      "mbt_fusion_tokens": 2,
      "mbt_modality_lengths": "6,4",
      "mbt_fusion_layer": fusion_layer,
    },
    rngs=nnx.Rngs(0),
  )
  assert [b.attn.fuse for b in stack.blocks] == [fusion_layer <= 1, fusion_layer <= 2]
  x = normal(kx, (2, 12, D), jnp.float32)
  x2 = x.at[:, 8:].set(normal(kn, (2, 4, D), jnp.float32))  # modality b replaced
  forward = nnx.jit(lambda s, xx: s(xx)[:, 2:8])
  ya, ya2 = forward(stack, x), forward(stack, x2)
  if independent:
    close(ya, ya2, 0.0)
  else:
    assert float(jnp.abs(ya - ya2).max()) > 1e-4


def test_bad_inputs(rng):
  params = _params(rng)
  x = jnp.ones((1, 12, D))
  with pytest.raises(ValueError, match="causal must be False"):
    mbt.mbt_bottleneck(params, x, causal=True)
  with pytest.raises(ValueError, match="takes no mask"):
    from attn_jax.attention import CausalMask

    mbt.mbt_bottleneck(params, x, mask=CausalMask())
  with pytest.raises(ValueError, match="modality_lengths must give 2 positive lengths"):
    mbt.mbt_bottleneck(params, x, modality_lengths=(5, 5))
  with pytest.raises(ValueError, match="leading modality axis"):
    mbt.mbt_bottleneck({k: v[0] for k, v in params.items()}, x)
  with pytest.raises(ValueError, match="leaves 1 tokens for 2 modalities"):
    mbt.mbt_bottleneck(params, jnp.ones((1, 5, D)))
  with pytest.raises(ValueError, match="mbt_modality_lengths must be comma-separated"):
    mbt_nn.parse_lengths("4;4")
  layer = mbt_nn.MBTAttention(d_model=D, num_heads=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="does not take packed batches"):
    layer(x, segment_ids_BT=jnp.ones((1, 12), jnp.int32))
  with pytest.raises(ValueError, match="positions must be one of"):
    mbt_nn.MBTAttention(d_model=D, num_heads=2, positions="rope", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="is bidirectional; the model is causal"):
    mbt_nn.MBTAttention(d_model=D, num_heads=2, causal=True, rngs=nnx.Rngs(0))
