"""Music Transformer relative attention (rel_skew): the skew equals an explicit gather of
q_i·e_(i−j); the skew's extra memory is linear in T (the gather's is T²·H); the layer equals
a float64 numpy oracle and the blocked path equals the reference with gradients; the NNX
layer; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import SegmentMask, registry
from attn_jax.attention import rel_skew as rel_lib
from attn_jax.nn.rel_skew import RelSkewAttention
from attn_jax.nn.transformer import Transformer

D, N = 16, 4


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def gathered(q, rel):
  """q_i · e_(min(i−j, L−1)) for j <= i by an explicit [T, T, H] gather (0 above)."""
  T, L = q.shape[1], rel.shape[1]
  dist = jnp.clip(jnp.arange(T)[:, None] - jnp.arange(T)[None, :], 0, L - 1)
  e = rel[:, dist]  # [N, T, T, H]
  s = jnp.einsum("btnh,ntsh->bnts", q, e)
  return jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, 0)


@pytest.mark.parametrize("L", [40, 7])
def test_skew_equals_gather(rng, L):
  kq, ke = jax.random.split(rng)
  q = normal(kq, (2, 23, N, 8), jnp.float64)
  rel = normal(ke, (N, L, 8), jnp.float64)
  close(rel_lib.relative_logits(q, rel), gathered(q, rel), 1e-12)


def test_skew_memory_is_linear_beyond_the_logits(rng):
  T, H = 512, 32
  q = jax.ShapeDtypeStruct((1, T, 1, H), jnp.float32)
  rel = jax.ShapeDtypeStruct((1, T, H), jnp.float32)
  logits_bytes = T * T * 4

  def temp_bytes(fn):
    return jax.jit(fn).lower(q, rel).compile().memory_analysis().temp_size_in_bytes

  skew_extra = temp_bytes(rel_lib.relative_logits) - 2 * logits_bytes
  gather = temp_bytes(gathered)
  assert skew_extra <= 4 * T * (H + 2) * 4  # O(T·H) beyond (at most two) T×T buffers
  assert gather >= T * T * H * 4 // 2  # the gather holds a T×T×H tensor


def np_oracle(params, x, ids=None):
  p = {n: np.asarray(a, np.float64) for n, a in params.items()}
  x = np.asarray(x, np.float64)
  B, T, _ = x.shape
  K = p["w_k"].shape[1]
  G = N // K
  H = p["w_q"].shape[-1]
  L = p["rel"].shape[1]
  q = np.einsum("btd,dnh->btnh", x, p["w_q"])
  k = np.repeat(np.einsum("btd,dkh->btkh", x, p["w_k"]), G, 2)
  v = np.repeat(np.einsum("btd,dkv->btkv", x, p["w_v"]), G, 2)
  out = np.zeros((B, T, N, v.shape[-1]))
  for b in range(B):
    for n in range(N):
      for i in range(T):
        js = [j for j in range(i + 1) if ids is None or (ids[b, j] == ids[b, i] and ids[b, i])]
        if not js:
          continue
        s = np.array([q[b, i, n] @ (k[b, j, n] + p["rel"][n, min(i - j, L - 1)]) for j in js])
        w = np.exp((s - s.max()) / np.sqrt(H))
        out[b, i, n] = (w / w.sum()) @ v[b, js, n]
  return np.einsum("btnv,nvd->btd", out, p["w_o"])


def test_layer_equals_oracle_and_blocked_gradients(rng):
  kp, kx, kw = jax.random.split(rng, 3)
  params = registry.init_layer(
    "rel_skew", kp, d_model=D, num_heads=N, num_kv_heads=2, rel_max=6, dtype=jnp.float64
  )
  x = normal(kx, (2, 12, D), jnp.float64)
  ids = np.array([[1] * 7 + [2] * 5, [1] * 10 + [0] * 2])
  mask = SegmentMask(jnp.asarray(ids), jnp.asarray(ids))
  close(
    rel_lib.rel_skew(params, x, causal=True, mask=mask, implementation="reference"),
    np_oracle(params, x, ids),
    1e-10,
  )
  w = normal(kw, (2, 12, D), jnp.float64)

  def loss(p, x, impl):
    return jnp.sum(rel_lib.rel_skew(p, x, causal=True, mask=mask, implementation=impl) * w)

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
    attention="rel_skew",
    d_model=D,
    num_heads=N,
    positions="learned",
    mlp="none",
    options={**RelSkewAttention.DEFAULT_OPTIONS, "rel_max": 8},
    rngs=nnx.Rngs(0),
  )
  layer = model.blocks[0].attn
  assert layer.rel[...].shape == (N, 8, D // N)
  x = normal(rng, (2, 6, D), jnp.float32)
  close(layer(x), rel_lib.rel_skew(layer.param_tree(), x, causal=True), 1e-6)
  params = registry.init_layer("rel_skew", rng, d_model=D, num_heads=N)
  with pytest.raises(ValueError, match="rel_skew is causal self-attention"):
    rel_lib.rel_skew(params, x, causal=False)
  with pytest.raises(NotImplementedError, match="'pallas_gpu' is not built"):
    rel_lib.rel_skew(params, x, causal=True, implementation="pallas_gpu")
  with pytest.raises(ValueError, match="not 'rope'"):
    RelSkewAttention(d_model=D, num_heads=N, positions="rope", rngs=nnx.Rngs(0))
