"""Signed attention weights (cog_attn): the blocked path equals the reference and a float64
numpy oracle (values, lse and gradients); non-negative logits give softmax; every row's
absolute weights sum to 1; the Pallas names refuse; the NNX kind."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import CausalMask, SegmentMask, dot_product_attention
from attn_jax.attention.reference import attention_reference
from attn_jax.nn.attention import Attention

# Every test runs in both layouts of the blocked path.
pytestmark = pytest.mark.usefixtures("both_xla_layouts")


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def qkv(key, T=37, S=37, N=4, K=2, H=8, Hv=5, dtype=jnp.float64):
  kq, kk, kv = jax.random.split(key, 3)
  return (
    normal(kq, (2, T, N, H), dtype),
    normal(kk, (2, S, K, H), dtype),
    normal(kv, (2, S, K, Hv), dtype),
  )


def np_cog(q, k, v, ok):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  G = q.shape[2] // k.shape[2]
  s = np.einsum("btnh,bsnh->bnts", q, np.repeat(k, G, 2)) / np.sqrt(q.shape[-1])
  e = np.where(ok, np.exp(np.abs(s)), 0)
  p = np.sign(s) * e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
  return np.einsum("bnts,bsnv->btnv", p, np.repeat(v, G, 2)), p


@pytest.mark.parametrize("block", [8, 512])
def test_blocked_equals_oracle_with_gradients(rng, block):
  q, k, v = qkv(rng)
  ids = jnp.array([[1] * 20 + [2] * 17, [1] * 30 + [0] * 7])
  mask = CausalMask() & SegmentMask(ids, ids)
  ok = np.asarray(mask.dense(37, 37))[:, None]
  want, _ = np_cog(q, k, v, ok)
  w = normal(jax.random.fold_in(rng, 1), want.shape, jnp.float64)
  kw = dict(mask=mask, signed=True)

  def loss(q, k, v, impl):
    extra = dict(block_q=block, block_kv=block) if impl == "xla" else {}
    return jnp.sum(dot_product_attention(q, k, v, implementation=impl, **kw, **extra) * w)

  close(dot_product_attention(q, k, v, implementation="reference", **kw), want, 1e-12)
  f32 = [a.astype(jnp.float32) for a in (q, k, v)]
  got = dot_product_attention(*f32, implementation="xla", block_q=block, block_kv=block, **kw)
  close(got, want, 2e-5)
  want_g = jax.grad(loss, (0, 1, 2))(q, k, v, "reference")
  got_g = jax.jit(jax.grad(loss, (0, 1, 2)), static_argnums=3)(*f32, "xla")
  for g, r in zip(got_g, want_g, strict=True):
    close(g, r, 2e-4)
  got64_g = jax.jit(jax.grad(loss, (0, 1, 2)), static_argnums=3)(q, k, v, "xla")
  for g, r in zip(got64_g, want_g, strict=True):
    close(g, r, 1e-10)
  _, lse = dot_product_attention(q, k, v, implementation="xla", return_lse=True, **kw)
  _, lse_ref = dot_product_attention(q, k, v, implementation="reference", return_lse=True, **kw)
  close(lse, lse_ref, 1e-12)


def test_nonnegative_logits_give_softmax_and_abs_rows_sum_to_one(rng):
  q, k, v = qkv(rng)
  q, k = jnp.abs(q), jnp.abs(k)  # every logit >= 0
  for impl in ("reference", "xla"):
    close(
      dot_product_attention(q, k, v, mask=CausalMask(), signed=True, implementation=impl),
      dot_product_attention(q, k, v, mask=CausalMask(), implementation="reference"),
      1e-12,
    )
  q, k, v = qkv(jax.random.fold_in(rng, 3))
  _, probs = attention_reference(q, k, v, mask=CausalMask(), signed=True, return_probs=True)
  p = np.asarray(probs)
  close(np.abs(p).sum(-1), 1.0, 1e-12)
  assert (p < 0).any()  # negative weights do occur


def test_refusals_and_the_nnx_kind(rng):
  q, k, v = qkv(rng, dtype=jnp.float32)
  with pytest.raises(NotImplementedError, match="signed attention weights are not built"):
    dot_product_attention(q, k, v, signed=True, implementation="pallas_tpu")
  with pytest.raises(ValueError, match="signed must be a bool"):
    dot_product_attention(q, k, v, signed=1)
  x = normal(rng, (2, 9, 16), jnp.float32)
  cog = Attention(d_model=16, num_heads=2, kind="cog_attn", positions="none", rngs=nnx.Rngs(1))
  plain = Attention(d_model=16, num_heads=2, kind="mha", positions="none", rngs=nnx.Rngs(1))
  assert not np.allclose(cog(x), plain(x), atol=1e-4)
  out, inter = nnx.capture(cog, nnx.Intermediate)(x, capture=True)
  close(out, cog(x), 1e-5)
  probs = inter["probs"].get_value()[0]
  close(jnp.abs(probs).sum(-1), 1.0, 1e-5)
