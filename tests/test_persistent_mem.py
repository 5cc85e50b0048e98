"""Persistent memory tokens (persistent_mem): P = 0 is the base attention; the prefix equals
an independent dense oracle under causal, window, chunked and segment masks (self and cross,
both implementations, with gradients); with every other key masked the output ignores the
input keys and values; the prefix mask's block map never hides a visible key; the layer;
bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal

from attn_jax.attention import (
  CausalMask,
  ChunkedCausalMask,
  SegmentMask,
  attention_reference,
  dot_product_attention,
  masks,
  sliding_window,
)
from attn_jax.attention import persistent as pm


def close(a, b, tol):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
  np.testing.assert_allclose(a, b, atol=tol, rtol=tol)


def inputs(key, B=2, T=11, S=11, N=4, K=2, H=8, Hv=6, P=3, dtype=jnp.float32):
  ks = jax.random.split(key, 5)
  return (
    normal(ks[0], (B, T, N, H), dtype),
    normal(ks[1], (B, S, K, H), dtype),
    normal(ks[2], (B, S, K, Hv), dtype),
    normal(ks[3], (P, K, H), dtype),
    normal(ks[4], (P, K, Hv), dtype),
  )


def _masks(T, S):
  ids_q = jnp.asarray([[1] * (T // 2) + [2] * (T - T // 2)] * 2, jnp.int32)
  ids_k = jnp.asarray([[1] * (S // 2) + [2] * (S - S // 2)] * 2, jnp.int32)
  return {
    "none": None,
    "causal": CausalMask(),
    "window": sliding_window(3),
    "chunked": ChunkedCausalMask(4),
    "segment": SegmentMask(ids_q, ids_k) & CausalMask(),
  }


def oracle(q, k, v, pk, pv, mask):
  """Concatenated keys, the caller's mask evaluated on its own T x S grid, prefix visible."""
  B, T, S = q.shape[0], q.shape[1], k.shape[1]
  P = pk.shape[0]
  visible = (
    jnp.ones((B, T, S), bool) if mask is None else jnp.broadcast_to(mask.dense(T, S), (B, T, S))
  )
  visible = jnp.concatenate([jnp.ones((B, T, P), bool), visible], axis=2)
  bias = jnp.where(visible, 0.0, -jnp.inf)[:, None]
  kk = jnp.concatenate([jnp.broadcast_to(pk, (B,) + pk.shape), k], 1)
  vv = jnp.concatenate([jnp.broadcast_to(pv, (B,) + pv.shape), v], 1)
  return attention_reference(q, kk, vv, bias=bias)


@pytest.mark.parametrize("T,S", [(11, 11), (5, 13)])
def test_equals_dense_oracle_with_gradients(rng, T, S):
  q, k, v, pk, pv = inputs(rng, T=T, S=S, dtype=jnp.float64)
  w = normal(jax.random.fold_in(rng, 1), (2, T, 4, 6), jnp.float64)
  for mask in _masks(T, S).values():

    def loss(args, impl, mask=mask):
      fn = oracle if impl == "oracle" else pm.persistent_memory_attention
      kw = {} if impl == "oracle" else {"implementation": impl}
      return jnp.sum(fn(*args, mask=mask, **kw) * w)

    run = jax.jit(
      lambda args: [jax.value_and_grad(loss)(args, i) for i in ("oracle", "reference", "xla")]
    )
    (want, g_want), *others = run((q, k, v, pk, pv))
    for got, g_got in others:
      close(got, want, 1e-10)
      for a, b in zip(g_got, g_want, strict=True):
        close(a, b, 1e-10)


def test_no_persistent_tokens_is_the_base_attention(rng):
  q, k, v, pk, pv = inputs(rng, P=0)
  all_masks = list(_masks(11, 11).values())

  @jax.jit  # one program for every mask and implementation
  def run(q, k, v, pk, pv):
    return [
      (
        pm.persistent_memory_attention(q, k, v, pk, pv, mask=m, implementation=impl),
        dot_product_attention(q, k, v, mask=m, implementation="reference"),
      )
      for m in all_masks
      for impl in ("reference", "xla")
    ]

  for got, want in run(q, k, v, pk, pv):
    close(got, want, 1e-6)


def test_with_every_other_key_masked_the_input_does_not_matter(rng):
  """Keys of another segment only: the output ignores k and v (fresh draws change nothing);
  with one persistent token it is that token's value for any query."""
  q, k, v, pk, pv = inputs(rng)
  hidden = SegmentMask(jnp.ones((2, 11), jnp.int32), jnp.full((2, 11), 2, jnp.int32))
  _, k2, v2, _, _ = inputs(jax.random.fold_in(rng, 1))
  attend = jax.jit(pm.persistent_memory_attention, static_argnames="implementation")
  for impl in ("reference", "xla"):
    a = attend(q, k, v, pk, pv, mask=hidden, implementation=impl)
    b = attend(q, k2, v2, pk, pv, mask=hidden, implementation=impl)
    close(a, b, 1e-6)
    one = attend(q, k, v, pk[:1], pv[:1], mask=hidden, implementation=impl)
    close(one, jnp.broadcast_to(jnp.repeat(pv[0], 2, axis=0), one.shape), 1e-6)
  plain = attend(q, k, v, pk, pv, mask=CausalMask(), implementation="xla")
  assert not np.allclose(plain, a, atol=1e-3)  # unmasked keys do matter


@pytest.mark.parametrize(
  "base", [None, CausalMask(), sliding_window(5), ChunkedCausalMask(6), masks.LocalMask(2, 3)]
)
def test_prefix_block_map_never_hides_a_visible_key(base):
  """EMPTY blocks hold no visible key, FULL blocks only visible keys (T = 19, S = P + 23)."""
  P, T, S = 5, 19, 28
  mask = pm.PersistentPrefixMask(base, P)
  dense = np.asarray(mask.dense(T, S))
  assert dense[:, :P].all()
  for bq, bk in ((4, 4), (8, 3), (16, 16)):
    kinds = mask.block_kinds(T, S, bq, bk)
    for i in range(kinds.shape[0]):
      for j in range(kinds.shape[1]):
        tile = dense[i * bq : (i + 1) * bq, j * bk : (j + 1) * bk]
        if kinds[i, j] == masks.EMPTY:
          assert not tile.any()
        if kinds[i, j] == masks.FULL:
          assert tile.all()


def test_layer_equals_projections_and_oracle(rng):
  params = pm.init_persistent_mem(
    rng, d_model=16, num_heads=4, persistent_tokens=2, dtype=jnp.float64
  )
  x = normal(jax.random.fold_in(rng, 1), (2, 9, 16), jnp.float64)

  @jax.jit
  def run(params, x):
    got = pm.persistent_mem_layer(params, x, causal=True)
    q, k, v = (jnp.einsum("BTD,DNH->BTNH", x, params[n]) for n in ("w_q", "w_k", "w_v"))
    o = oracle(q, k, v, params["p_k"], params["p_v"], CausalMask())
    return got, jnp.einsum("BTNV,NVD->BTD", o, params["w_o"])

  close(*run(params, x), 1e-10)


def test_bad_inputs_raise(rng):
  q, k, v, pk, pv = inputs(rng)
  with pytest.raises(ValueError, match=r"persistent_k must have shape \[P, K, H\]"):
    pm.persistent_memory_attention(q, k, v, pk[..., :3], pv)
  with pytest.raises(ValueError, match=r"persistent_v must have shape \[P, K, Hv\]"):
    pm.persistent_memory_attention(q, k, v, pk, pv[:, :1])
  with pytest.raises(ValueError, match="same number of tokens"):
    pm.persistent_memory_attention(q, k, v, pk, pv[:2])
  with pytest.raises(ValueError, match="persistent_k must be a float array"):
    pm.persistent_memory_attention(q, k, v, np.ones((3, 2, 8), np.int32), pv)
  with pytest.raises(ValueError, match="mask must be"):
    pm.persistent_memory_attention(q, k, v, pk, pv, mask=np.ones((11, 11), bool))
  with pytest.raises(ValueError, match="q_segment_ids has shape"):
    pm.persistent_memory_attention(q, k, v, pk, pv, mask=SegmentMask(jnp.ones((2, 5), jnp.int32)))
  with pytest.raises(NotImplementedError, match="persistent-prefix mask"):
    pm.persistent_memory_attention(q, k, v, pk, pv, mask=CausalMask(), implementation="pallas_tpu")
  with pytest.raises(ValueError, match="persistent_tokens must be an int >= 1"):
    pm.init_persistent_mem(rng, d_model=16, num_heads=4, persistent_tokens=0)
