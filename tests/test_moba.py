"""MoBA (moba): the selection alone always keeps the own block, never a future one, and keeps
the best earlier blocks by q·mean(K); k >= the number of blocks is causal attention; the
blocked path equals a dense masked reference built from the same selection (values and
gradients, GQA, packing); decoding equals the full row; the NNX kind; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import CausalMask, SegmentMask, dot_product_attention, registry
from attn_jax.attention import longheads as longheads_lib
from attn_jax.attention import moba as moba_lib
from attn_jax.attention import xla as xla_lib
from attn_jax.nn.attention import Attention


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def qkv(key, B=2, T=37, N=4, K=2, H=8, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(key, 3)
  return (
    normal(kq, (B, T, N, H), dtype),
    normal(kk, (B, T, K, H), dtype),
    normal(kv, (B, T, K, H), dtype),
  )


def test_selection_rule(rng):
  q, k, _ = qkv(rng, T=40)
  block, top_k = 5, 3
  sel = np.asarray(moba_lib.moba_select(q, k, block=block, top_k=top_k))  # [B, N, T, nC]
  own = np.arange(40) // block
  nC = 8
  assert np.all(sel[..., np.arange(40), own])  # the own block, always
  future = np.arange(nC)[None, :] > own[:, None]
  assert not np.any(sel & future)  # never a future block
  assert np.all(sel.sum(-1) == np.minimum(top_k, own + 1))
  # The earlier picks are the best by the gate q·mean(K_c).
  means = np.asarray(k, np.float64).reshape(2, 8, 5, 2, 8).mean(2)
  gate = np.einsum("btnh,bcnh->bntc", np.asarray(q, np.float64), np.repeat(means, 2, axis=2))
  b, n, t = 1, 3, 33
  earlier = np.argsort(-gate[b, n, t, : own[t]])[: top_k - 1]
  assert set(np.nonzero(sel[b, n, t])[0]) == set(earlier) | {own[t]}
  # k = 1: the own block alone (no gate).
  sel1 = np.asarray(moba_lib.moba_select(q, k, block=block, top_k=1))
  np.testing.assert_array_equal(sel1, np.broadcast_to(np.eye(nC, dtype=bool)[own], sel1.shape))


def test_all_blocks_is_causal(rng):
  q, k, v = qkv(rng)
  close(
    moba_lib.moba(q, k, v, moba_block=4, moba_top_k=10),
    dot_product_attention(q, k, v, mask=CausalMask()),
    2e-5,
  )


# The xla path's tiles (longheads.selection_xla_tile): (37, 6) on a multi-core device, the
# default tiles; (260, 4): 65 chunks >= 32 x top_k, chunk-granular tiles of 64 tokens (the
# last one padded); (300, 5) on a device with one core: chunk tiles of 130 tokens. top_k = 1
# (the own block alone) runs as a block-diagonal causal mask, here 9 blocks of 11 + a part.
# packed: a per-example SegmentMask (heads vmapped); not packed: (example, head) pairs
# folded into the batch of one call (longheads.attend_selected_chunks).
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize(
  "T, block, cores, top_k",
  [(37, 6, 2.0, 2), (260, 4, 2.0, 2), (300, 5, 1.0, 2), (103, 11, 2.0, 1)],
)
def test_blocked_equals_dense_masked_reference_with_gradients(
  rng, monkeypatch, T, block, cores, top_k, packed
):
  monkeypatch.setattr(xla_lib, "cpu_cores_per_device", lambda: cores)
  q, k, v = qkv(rng, T=T, dtype=jnp.float64)
  ids = jnp.asarray([[1] * (T // 2) + [2] * (T - T // 2), [1] * (T - 7) + [0] * 7])
  if not packed:
    ids = jnp.ones_like(ids)
  seg = SegmentMask(ids, ids) if packed else None
  w = normal(jax.random.fold_in(rng, 3), q.shape, jnp.float64)
  _, sel = moba_lib.moba(
    q, k, v, moba_block=block, moba_top_k=top_k, mask=seg, return_selection=True
  )
  visible = moba_lib.selection_mask_dense(sel, block, T)
  if packed:
    visible = visible & np.asarray(seg.dense(T, T))[:, None]

  def dense(q, k, v):
    G = q.shape[2] // k.shape[2]
    kr, vr = jnp.repeat(k, G, 2), jnp.repeat(v, G, 2)
    s = jnp.einsum("btnh,bsnh->bnts", q, kr) / np.sqrt(q.shape[-1])
    s = jnp.where(visible, s, -jnp.inf)
    m = jnp.max(s, -1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(s - m)
    p = e / jnp.maximum(e.sum(-1, keepdims=True), 1e-300)
    return jnp.einsum("bnts,bsnh->btnh", p, vr)

  def loss(fn, *args):
    return jnp.sum(fn(*args) * w)

  def fast(q, k, v):
    return moba_lib.moba(
      q, k, v, moba_block=block, moba_top_k=top_k, mask=seg, implementation="xla"
    )

  want, want_g = jax.value_and_grad(lambda *a: loss(dense, *a), (0, 1, 2))(q, k, v)
  f32 = [a.astype(jnp.float32) for a in (q, k, v)]
  got, got_g = jax.jit(jax.value_and_grad(lambda *a: loss(fast, *a), (0, 1, 2)))(*f32)
  close(got, want, 1e-4)
  for g, r in zip(got_g, want_g, strict=True):
    close(g, r, 2e-4)


def test_xla_tile_rule(monkeypatch):
  rule = longheads_lib.selection_xla_tile
  monkeypatch.setattr(xla_lib, "cpu_cores_per_device", lambda: 2.0)
  assert rule(128, 64, 2) == 128  # very sparse: chunk tiles
  assert rule(4, 65, 2) == 64  # ... of at least 64 tokens
  assert rule(128, 64, 3) is None  # the default tiles on a multi-core device
  assert rule(128, 64, None) is None
  monkeypatch.setattr(xla_lib, "cpu_cores_per_device", lambda: 1.0)
  assert rule(128, 64, 3) == 128  # one core: chunk tiles of at least 128 tokens
  assert rule(64, 64, 8) == 128
  assert rule(5, 60, None) == 130
  assert rule(4, 65, 2) == 64  # the very sparse rule first


def test_nnx_kind_and_bad_input(rng):
  layer = Attention(
    d_model=16,
    num_heads=2,
    kind="moba",
    positions="none",
    options={"moba_block": 4, "moba_top_k": 2},
    rngs=nnx.Rngs(0),
  )
  x = normal(rng, (2, 16, 16), jnp.float32)
  y = layer(x)
  assert y.shape == (2, 16, 16) and np.all(np.isfinite(np.asarray(y)))
  q, k, v = qkv(rng)
  with pytest.raises(ValueError, match="moba_top_k must be an int >= 1"):
    moba_lib.moba(q, k, v, moba_top_k=0)
  with pytest.raises(NotImplementedError, match="takes no extra mask"):
    moba_lib.moba(q, k, v, implementation="pallas_tpu", mask=CausalMask())
  with pytest.raises(ValueError, match="does not support the 'self' pattern"):
    registry.run("moba", q, k, v, causal=False)


def _dense_moba(q, k, v, sel, block):
  """float64 softmax attention under the selection's dense mask & causal."""
  S = k.shape[1]
  visible = moba_lib.selection_mask_dense(sel, block, S)
  G = q.shape[2] // k.shape[2]
  kr, vr = jnp.repeat(k, G, 2), jnp.repeat(v, G, 2)
  s = jnp.einsum("btnh,bsnh->bnts", q, kr) / np.sqrt(q.shape[-1])
  s = jnp.where(visible, s, -jnp.inf)
  m = jnp.max(s, -1, keepdims=True)
  e = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  return jnp.einsum("bnts,bsnh->btnh", e / e.sum(-1, keepdims=True), vr)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_kernel_path_equals_dense_masked_reference(rng, backend):
  """The exact per-token selection on the block-sparse kernels (TPU kernel through
  pallas_interpret with TPU memory simulated; GPU kernel in interpret mode): values and
  gradients equal the float64 dense masked reference of the same selection."""
  from pallas_kernels import block_sparse

  block = 128 if backend == "tpu" else 16
  T = 3 * block + 7  # a ragged last block
  q, k, v = qkv(rng, B=1, T=T, N=4, K=2, H=16)
  top_k = 2
  _, sel = moba_lib.moba(q, k, v, moba_block=block, moba_top_k=top_k, return_selection=True)
  w = normal(jax.random.fold_in(rng, 5), q.shape, jnp.float32)

  if backend == "tpu":

    def fast(q, k, v):
      return moba_lib.moba(
        q, k, v, moba_block=block, moba_top_k=top_k, implementation="pallas_interpret"
      )

  else:

    def fast(q, k, v):
      s = moba_lib.moba_select(q, k, block=block, top_k=top_k)
      return block_sparse.selected_blocks_attention(
        q, k, v, s, block_size=block, backend="gpu", block_q=16, interpret=True
      )

  got, got_g = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fast(*a) * w), (0, 1, 2)))(q, k, v)
  q64, k64, v64 = (a.astype(jnp.float64) for a in (q, k, v))
  want, want_g = jax.value_and_grad(lambda *a: jnp.sum(_dense_moba(*a, sel, block) * w), (0, 1, 2))(
    q64, k64, v64
  )
  close(got, want, 2e-4)
  for g, r in zip(got_g, want_g, strict=True):
    close(g, r, 2e-4)


@pytest.mark.parametrize("impl, platform", [("pallas_tpu", "tpu"), ("pallas_gpu", "cuda")])
def test_kernel_path_lowers(rng, impl, platform):
  q, k, v = (x.astype(jnp.bfloat16) for x in qkv(rng, B=1, T=512, N=4, K=2, H=64))
  kw = dict(moba_block=128, moba_top_k=2, implementation=impl)

  def loss(q, k, v):
    return moba_lib.moba(q, k, v, **kw).astype(jnp.float32).sum()

  fwd = jax.jit(lambda q, k, v: moba_lib.moba(q, k, v, **kw)).trace(q, k, v)
  bwd = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, k, v)
  for traced, n_kernels in ((fwd, 1), (bwd, 3)):
    text = traced.lower(lowering_platforms=(platform,)).as_text()
    marker = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
    assert text.count(marker) >= n_kernels, (impl, text.count(marker))
