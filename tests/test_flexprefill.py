"""FlexPrefill (``attn_jax.attention.flexprefill``): the fast path against a float64 dense
masked oracle of the same selection (values and gradients); γ = 1 is dense causal; the
selection's properties (forced diagonal / first block, never a future block, query-aware
rows reach mass γ, vertical-slash keeps the heaviest column's blocks); the NNX kind."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx
from test_block_sparse import assert_matches_oracle, oracle

from attn_jax.attention import CausalMask, dot_product_attention
from attn_jax.attention import flexprefill as fp
from attn_jax.nn.attention import Attention


def _qkv(key, B=2, T=45, N=4, K=2, H=8):
  kq, kk, kv = jax.random.split(key, 3)
  return (
    normal(kq, (B, T, N, H), jnp.float32),
    normal(kk, (B, T, K, H), jnp.float32),
    normal(kv, (B, T, K, H), jnp.float32),
  )


def _dense(selected, T, L):
  tok = jnp.repeat(jnp.repeat(selected, L, axis=2), L, axis=3)[:, :, :T, :T]
  return tok & (jnp.arange(T)[None, :] <= jnp.arange(T)[:, None])


@pytest.mark.parametrize("tau", [0.0, 10.0], ids=["vertical_slash", "query_aware"])
def test_matches_dense_masked_oracle_with_gradients(rng, tau):
  q, k, v = _qkv(rng)
  L, gamma = 8, 0.7
  kw = dict(flex_block=L, flex_gamma=gamma, flex_tau=tau)
  _, aux = fp.flexprefill(q, k, v, return_aux=True, **kw)
  assert bool(jnp.all(aux["query_aware"])) == (tau > 1)
  assert not bool(jnp.all(aux["selected"]))  # sparse: something was left out
  vis = _dense(aux["selected"], q.shape[1], L)
  w = normal(jax.random.fold_in(rng, 3), q.shape, jnp.float32)

  assert_matches_oracle(
    lambda q, k, v: fp.flexprefill(q, k, v, **kw),
    lambda q, k, v: oracle(q, k, v, vis)[0],
    (q, k, v),
    w,
  )


def test_gamma_one_is_dense_causal(rng):
  q, k, v = _qkv(rng)
  out = fp.flexprefill(q, k, v, flex_block=8, flex_gamma=1.0)
  want = dot_product_attention(q, k, v, mask=CausalMask(), implementation="reference")
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)


def test_selection_properties(rng):
  q, k, _ = _qkv(rng, T=64)
  L, gamma, n = 8, 0.6, 8
  sel, qa = fp.flexprefill_select(q, k, block=L, gamma=gamma, tau=10.0)
  sel = np.asarray(sel)
  assert np.asarray(qa).all()
  i, j = np.indices((n, n))
  assert not sel[..., i < j].any()  # never a future block
  assert sel[..., i == j].all() and sel[..., :, 0].all()  # diagonal and first block
  # Query-aware rows reach mass γ under the pooled estimate.
  kr = np.repeat(np.asarray(k, np.float64), 2, axis=2)
  qp = np.asarray(q, np.float64).reshape(2, n, L, 4, 8).mean(2)
  kp = kr.reshape(2, n, L, 4, 8).mean(2)
  est = np.einsum("bqnh,bcnh->bnqc", qp, kp) / np.sqrt(8)
  est = np.where(i >= j, est, -np.inf)
  p = np.exp(est - est.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  assert ((p * sel).sum(-1) >= gamma - 1e-5).all()
  # Vertical-slash (τ = 0): the key column with the largest mass in the last block's true
  # attention is kept in every block row that can see it.
  sel_vs, qa_vs = fp.flexprefill_select(q, k, block=L, gamma=gamma, tau=0.0)
  assert not np.asarray(qa_vs).any()
  T = 64
  qq = np.asarray(q, np.float64)[:, T - L :]
  s = np.einsum("blnh,bsnh->bnls", qq, kr) / np.sqrt(8)
  s = np.where(np.arange(T)[None, :] <= np.arange(T - L, T)[:, None], s, -np.inf)
  a = np.exp(s - s.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  top_col = a.sum(2).argmax(-1)  # [B, N]
  for b, h in np.ndindex(2, 4):
    jb = top_col[b, h] // L
    assert np.asarray(sel_vs)[b, h, jb:, jb].all()


def test_bad_inputs_and_nnx_kind(rng):
  q, k, v = _qkv(rng)
  with pytest.raises(ValueError, match="flex_gamma must be in"):
    fp.flexprefill(q, k, v, flex_gamma=0.0)
  with pytest.raises(ValueError, match="flex_block must be an int"):
    fp.flexprefill(q, k, v, flex_block=0)
  with pytest.raises(ValueError, match="needs S == T"):
    fp.flexprefill(q, k[:, :20], v[:, :20])
  layer = Attention(
    d_model=16,
    num_heads=2,
    kind="flexprefill",
    positions="none",
    options={"flex_block": 4},
    rngs=nnx.Rngs(0),
  )
  x = normal(rng, (2, 16, 16), jnp.float32)
  assert np.all(np.isfinite(np.asarray(layer(x))))
  with pytest.raises(ValueError, match="causal-only"):
    Attention(d_model=16, num_heads=2, kind="flexprefill", causal=False, rngs=nnx.Rngs(0))
