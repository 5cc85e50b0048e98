"""LongHeads chunk selection: the fast path equals a float64 numpy oracle (values) and the
float64 reference (gradients); k >= the number of chunks is full attention; the attended
length stays within k·C; the per-query chunk mask's tile map; the NNX kind; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import (
  EMPTY,
  FULL,
  CausalMask,
  ChunkSelectionMask,
  dot_product_attention,
)
from attn_jax.attention import longheads as lh
from attn_jax.nn.attention import Attention


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def qkv(key, B=2, T=21, S=21, N=4, K=2, H=8, Hv=6, dtype=jnp.float64):
  kq, kk, kv = jax.random.split(key, 3)
  return (
    normal(kq, (B, T, N, H), dtype),
    normal(kk, (B, S, K, H), dtype),
    normal(kv, (B, S, K, Hv), dtype),
  )


def oracle(q, k, v, *, causal, chunk, top_k):
  """Token by token and head by head: score the chunk means, keep first + local + best
  others, softmax over the kept keys."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  nC = -(-S // chunk)
  out = np.zeros((B, T, N, v.shape[-1]))
  kept = np.zeros((B, N, T, nC), bool)
  for b in range(B):
    for n in range(N):
      kh = n // (N // K)
      reps = np.stack([k[b, c * chunk : (c + 1) * chunk, kh].mean(0) for c in range(nC)])
      for t in range(T):
        p = S - T + t
        local = min(p // chunk, nC - 1)
        visible = [c for c in range(nC) if not causal or c <= local]
        others = sorted(
          (c for c in visible if c not in (0, local)), key=lambda c: -(q[b, t, n] @ reps[c])
        )
        chosen = {0, local} | set(others[: max(top_k - 2, 0)])
        kept[b, n, t, sorted(chosen)] = True
        keys = [s for s in range(S) if s // chunk in chosen and (not causal or s <= p)]
        logits = k[b, keys, kh] @ q[b, t, n] / np.sqrt(H)
        w = np.exp(logits - logits.max())
        out[b, t, n] = (w / w.sum()) @ v[b, keys, kh]
  return out, kept


@pytest.mark.parametrize(
  "case", [("self_causal", 21, 21, 4, 3), ("cross_bidirectional", 5, 23, 4, 3)]
)
def test_equals_float64_oracle_with_gradients(rng, case):
  name, T, S, chunk, top_k = case
  causal = name.endswith("causal")
  q, k, v = qkv(rng, T=T, S=S)
  want, kept = oracle(q, k, v, causal=causal, chunk=chunk, top_k=top_k)
  w_out = normal(jax.random.fold_in(rng, 1), want.shape, jnp.float64)
  kw = dict(causal=causal, longheads_chunk=chunk, longheads_top_k=top_k)

  def loss(q, k, v, impl):
    return jnp.sum(lh.longheads(q, k, v, implementation=impl, **kw) * w_out.astype(q.dtype))

  grad = jax.jit(jax.grad(loss, (0, 1, 2)), static_argnums=3)
  out, sel = lh.longheads(q, k, v, implementation="reference", return_selection=True, **kw)
  close(out, want, 1e-10)
  assert np.array_equal(np.asarray(sel), kept)
  got = lh.longheads(*(a.astype(jnp.float32) for a in (q, k, v)), implementation="xla", **kw)
  close(got, want, 3e-5)
  want_g = grad(q, k, v, "reference")
  got_g = grad(*(a.astype(jnp.float32) for a in (q, k, v)), "xla")
  for g, w in zip(got_g, want_g, strict=True):
    close(g, w, 2e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_enough_chunks_is_full_attention(rng, causal):
  q, k, v = qkv(rng, dtype=jnp.float32)
  mask = CausalMask() if causal else None
  full = dot_product_attention(q, k, v, mask=mask, implementation="reference")
  for impl in ("reference", "xla"):
    got = lh.longheads(
      q, k, v, causal=causal, longheads_chunk=4, longheads_top_k=6, implementation=impl
    )
    close(got, full, 2e-5)


def test_attended_length_within_budget(rng):
  """Every (query, head) attends to at most k·C keys, the first and local chunks included."""
  T, chunk, top_k = 64, 4, 3
  q, k, v = qkv(rng, B=1, T=T, S=T, dtype=jnp.float32)
  _, sel = lh.longheads(
    q, k, v, causal=True, longheads_chunk=chunk, longheads_top_k=top_k, return_selection=True
  )
  sel = np.asarray(sel)  # [B, N, T, nC]
  m = ChunkSelectionMask(jnp.asarray(sel[0]), chunk) & CausalMask()
  attended = np.asarray(m.dense(T, T)).sum(-1)  # [N, T]
  assert attended.max() <= top_k * chunk and attended.min() >= 1
  local = np.arange(T) // chunk
  assert sel[..., 0].all() and sel[0][:, np.arange(T), local].all()
  assert np.all(sel.sum(-1) == np.minimum(local + 1, top_k))  # causal: only chunks <= local


def test_chunk_selection_mask_tile_map(rng):
  """Tile kinds agree with the dense mask (EMPTY exactly where no entry is visible, FULL
  exactly where all are); queries that agree leave whole tiles out."""
  B, T, S, chunk = 2, 37, 45, 5
  sel = jax.random.bernoulli(rng, 0.3, (B, T, -(-S // chunk)))
  m = ChunkSelectionMask(sel, chunk)
  dense = np.asarray(m.dense(T, S))
  kinds = np.asarray(m.block_kinds(T, S, 8, 16))
  for i in range(kinds.shape[1]):
    for j in range(kinds.shape[2]):
      tile = dense[:, i * 8 : (i + 1) * 8, j * 16 : (j + 1) * 16]
      assert np.array_equal(kinds[:, i, j] == EMPTY, ~tile.any((1, 2)))
      assert np.array_equal(kinds[:, i, j] == FULL, tile.all((1, 2)))
  agree = jnp.zeros((1, 64, 8), bool).at[..., jnp.array([0, 3])].set(True)
  count, _, _ = ChunkSelectionMask(agree, 16).block_lists(64, 128, 16, 16)
  assert np.all(np.asarray(count) == 2)  # 2 of 8 kv tiles per q tile


def test_nnx_kind_and_its_options(rng):
  x = normal(rng, (2, 13, 16), jnp.float32)
  opts = {"chunk": 4, "longheads_top_k": 2}
  layer = Attention(d_model=16, num_heads=2, kind="longheads", options=opts, rngs=nnx.Rngs(1))
  plain = Attention(d_model=16, num_heads=2, kind="mha", rngs=nnx.Rngs(1))
  assert not np.allclose(layer(x), plain(x), atol=1e-4)  # the selection changes the output
  wide = Attention(
    d_model=16,
    num_heads=2,
    kind="longheads",
    options={"chunk": 4, "longheads_top_k": 4},
    rngs=nnx.Rngs(1),
  )
  close(wide(x), plain(x), 2e-5)  # 4 chunks of 4 cover T = 13: full attention
  with pytest.raises(NotImplementedError, match="capture=True is not built"):
    layer(x, capture=True)


def test_bad_input_messages(rng):
  q, k, v = qkv(rng, dtype=jnp.float32)
  with pytest.raises(ValueError, match="longheads_top_k must be >= 2"):
    lh.longheads(q, k, v, causal=True, longheads_chunk=4, longheads_top_k=1)
  with pytest.raises(ValueError, match="longheads_chunk must be an int >= 1; got 0"):
    lh.longheads(q, k, v, causal=True, longheads_chunk=0)
  with pytest.raises(NotImplementedError, match="'pallas_tpu' is not built"):
    lh.longheads(q, k, v, causal=True, implementation="pallas_tpu")
  with pytest.raises(ValueError, match="implementation must be one of"):
    lh.longheads(q, k, v, causal=True, implementation="fast")
  with pytest.raises(ValueError, match="mask must be an attn_jax.attention.masks.Mask"):
    lh.longheads(q, k, v, causal=True, mask=np.ones((21, 21), bool))
  with pytest.raises(ValueError, match=r"ChunkSelectionMask selected must be a bool array"):
    ChunkSelectionMask(jnp.ones((2, 3)), 4)
  with pytest.raises(ValueError, match=r"ChunkSelectionMask selected has shape"):
    dot_product_attention(q, k, v, mask=ChunkSelectionMask(jnp.ones((2, 21, 3), bool), 4))
