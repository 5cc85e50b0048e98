"""Aaren / attention as a prefix scan (aaren): the associative scan's output at every prefix
equals softmax attention of the same query over that prefix (an explicit masked softmax
written here, and the module's oracle), with GQA, packed documents and large score ranges;
sequential updates equal the parallel scan; two halves with the carried (m, u, w) equal one
pass; gradients agree; the ⊕ combine is associative; the NNX layer; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import aaren as aa
from attn_jax.nn.transformer import Transformer

prefix = jax.jit(
  aa.prefix_attention, static_argnames=("return_final_state", "mode", "implementation")
)


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def inputs(key, B=2, T=29, N=4, K=2, H=8, Hv=6, dtype=jnp.float64, spread=1.0):
  kq, kk, kv = jax.random.split(key, 3)
  return (
    normal(kq, (N, H), dtype),
    normal(kk, (B, T, K, H), dtype) * spread,
    normal(kv, (B, T, K, Hv), dtype),
  )


def masked_softmax(q, k, v):
  """Row t: softmax over keys j <= t of q·k_j / √H, times v (one query for all rows)."""
  T, N, K = k.shape[1], q.shape[0], k.shape[2]
  kr, vr = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
  s = jnp.einsum("NH,BSNH->BNS", q, kr) / np.sqrt(q.shape[-1])
  logits = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s[:, :, None, :], -jnp.inf)
  return jnp.einsum("BNTS,BSNV->BTNV", jax.nn.softmax(logits, -1), vr)


@pytest.mark.parametrize("spread,dtype,tol", [(30.0, jnp.float64, 1e-12), (3.0, jnp.float32, 1e-5)])
def test_scan_equals_softmax_over_each_prefix(rng, spread, dtype, tol):
  q, k, v = inputs(rng, dtype=dtype, spread=spread)  # spread 30: scores up to ~100
  want = masked_softmax(q.astype(jnp.float64), k.astype(jnp.float64), v.astype(jnp.float64))
  for kw in ({}, {"mode": "recurrent"}, {"implementation": "reference"}):
    out = prefix(q, k, v, **kw)
    assert out.shape == (2, 29, 4, 6) and out.dtype == dtype
    close(out, want, tol)
  # Row t also equals attention on the prefix alone (nothing after t leaks in).
  for t in (0, 13):
    close(prefix(q, k[:, : t + 1], v[:, : t + 1])[:, t], want[:, t], tol)


def test_batched_query_and_packed_documents(rng):
  q, k, v = inputs(rng, T=24)
  qb = jnp.stack([q, 2 * q])  # [B, N, H]: one query per row
  ids = jnp.asarray([[1] * 10 + [2] * 14, [5] * 3 + [6] * 21])
  packed = prefix(qb, k, v, segment_ids=ids)
  close(prefix(qb, k, v, segment_ids=ids, mode="recurrent"), packed, 1e-12)
  close(prefix(qb, k, v, segment_ids=ids, implementation="reference"), packed, 1e-12)
  for b, lo, hi in ((0, 0, 10), (0, 10, 24), (1, 3, 24)):
    alone = masked_softmax(qb[b], k[b : b + 1, lo:hi], v[b : b + 1, lo:hi])
    close(packed[b : b + 1, lo:hi], alone, 1e-12)


def test_carried_state_and_decoding(rng):
  q, k, v = inputs(rng, T=30)
  full, S_full = prefix(q, k, v, return_final_state=True)
  a, S_a = prefix(q, k[:, :17], v[:, :17], return_final_state=True)
  b, S_b = prefix(q, k[:, 17:], v[:, 17:], initial_state=S_a, return_final_state=True)
  close(jnp.concatenate([a, b], 1), full, 1e-12)
  for x, y in zip(S_b, S_full, strict=True):
    close(x, y, 1e-12)
  close(prefix(q, k[:, 17:], v[:, 17:], initial_state=S_a, implementation="reference"), b, 1e-12)
  S = S_a
  for t in range(17, 21):  # one O(1) update per token
    o, S = prefix(
      q,
      k[:, t : t + 1],
      v[:, t : t + 1],
      initial_state=S,
      mode="recurrent",
      return_final_state=True,
    )
    close(o[:, 0], full[:, t], 1e-12)
    assert S.u.shape == (2, 4, 6)  # the state does not grow


def test_combine_is_associative(rng):
  ks = jax.random.split(rng, 3)
  x = [
    aa.ScanState(normal(k, (3,), jnp.float64) * 5, normal(k, (3, 2), jnp.float64), jnp.ones((3,)))
    for k in ks
  ]
  empty = aa.empty_state(1, 3, 2, jnp.float64)
  empty = aa.ScanState(*(a[0] for a in empty))
  left = aa.combine(aa.combine(x[0], x[1]), x[2])
  right = aa.combine(x[0], aa.combine(x[1], x[2]))
  for p, r in zip(left, right, strict=True):
    close(p, r, 1e-12)
  for p, r in zip(aa.combine(empty, x[0]), x[0], strict=True):  # the empty state is the unit
    close(p, r, 0)
  assert np.all(np.isneginf(np.asarray(aa.combine(empty, empty).m)))
  assert not np.any(np.isnan(np.asarray(aa.combine(empty, empty).u)))


def test_gradients_agree(rng):
  q, k, v = inputs(rng, T=19, spread=3.0)
  w = normal(jax.random.fold_in(rng, 1), (2, 19, 4, 6), jnp.float64)

  def loss(q, k, v, mode, impl):
    return jnp.sum(jnp.sin(aa.prefix_attention(q, k, v, mode=mode, implementation=impl)) * w)

  grad = jax.jit(jax.grad(loss, (0, 1, 2)), static_argnums=(3, 4))
  want = grad(q, k, v, "chunk", "reference")
  for mode in ("chunk", "recurrent"):
    for a, b in zip(grad(q, k, v, mode, "xla"), want, strict=True):
      assert np.all(np.isfinite(np.asarray(a))) and float(jnp.abs(a).max()) > 0
      close(a, b, 1e-10)


def test_nnx_layer(rng):
  model = Transformer(
    num_layers=2,
    attention="aaren",
    d_model=16,
    num_heads=2,
    positions="none",
    mlp="none",
    rngs=nnx.Rngs(0),
  )
  attn = model.blocks[0].attn
  params = attn.param_tree()
  assert params["query"].shape == (2, 8)  # a parameter, not a projection of the input
  x = normal(rng, (2, 10, 16), jnp.float32)
  forward = nnx.jit(lambda m, xx: m(xx))
  y = forward(model, x)
  assert y.shape == (2, 10, 16) and np.all(np.isfinite(np.asarray(y)))
  x2 = x.at[:, 6:].set(normal(jax.random.fold_in(rng, 1), (2, 4, 16), jnp.float32))
  close(forward(model, x2)[:, :6], y[:, :6], 1e-6)  # causal
  h = model.blocks[0].attn_norm(x)
  both = jax.jit(
    lambda p, h: (aa.aaren(p, h, implementation="reference"), aa.aaren(p, h, mode="recurrent"))
  )
  close(*both(params, h), 1e-5)
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(model)
  assert float(jnp.abs(grads.blocks[0].attn.query[...]).max()) > 0
  with pytest.raises(ValueError, match="causal-only"):
    Transformer(
      num_layers=1,
      attention="aaren",
      d_model=16,
      num_heads=2,
      causal=False,
      positions="none",
      rngs=nnx.Rngs(0),
    )


def test_bad_inputs(rng):
  q, k, v = inputs(rng, T=8)
  with pytest.raises(ValueError, match="one query per head"):
    aa.prefix_attention(q[:, :5], k, v)
  with pytest.raises(ValueError, match="must divide the query heads"):
    aa.prefix_attention(q[:3], k, v)
  with pytest.raises(ValueError, match="v must be"):
    aa.prefix_attention(q, k, v[:, :7])
  with pytest.raises(ValueError, match="mode must be one of"):
    aa.prefix_attention(q, k, v, mode="parallel")
  with pytest.raises(ValueError, match="implementation must be one of"):
    aa.prefix_attention(q, k, v, implementation="pallas_tpu")
  with pytest.raises(ValueError, match="initial_state must be"):
    aa.prefix_attention(q, k, v, initial_state=aa.empty_state(2, 4, 5))
  with pytest.raises(ValueError, match="segment_ids must be"):
    aa.prefix_attention(q, k, v, segment_ids=jnp.ones((2, 7), jnp.int32))
  with pytest.raises(ValueError, match="gives no final state"):
    aa.prefix_attention(q, k, v, implementation="reference", return_final_state=True)
  params = aa.init_aaren(rng, d_model=16, num_heads=2)
  x = normal(rng, (2, 5, 16), jnp.float32)
  with pytest.raises(ValueError, match="causal self-attention"):
    aa.aaren(params, x, causal=False)
  with pytest.raises(ValueError, match="params must hold"):
    aa.aaren({**params, "w_q": params["w_k"]}, x)
  with pytest.raises(ValueError, match="x_BTD must be"):
    aa.aaren(params, x[..., :8])
