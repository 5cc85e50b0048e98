"""Blocked XLA attention and the oracle, against each other and against jax.nn.

Tolerances (written once, never loosened to pass):
  float32 fast path vs float64 oracle: outputs atol = rtol = 2e-5, gradients 1e-4.
  bfloat16 inputs (fp32 accumulation) vs float64 oracle on the same rounded inputs: outputs
  (rounded to bf16, 2^-8 relative) atol = rtol = 2e-2; gradients 4e-2.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal

from attn_jax.attention import (
  AlibiBias,
  BlockSparseMask,
  CausalMask,
  ChunkedCausalMask,
  LocalMask,
  PrefixLMMask,
  SegmentMask,
  attention_reference,
  blocked_attention,
  dot_product_attention,
  sliding_window,
)
from attn_jax.attention.masks import window_blocks
from attn_jax.attention.registry import random_segment_ids

# Every test runs in both layouts of the blocked path.
pytestmark = pytest.mark.usefixtures("both_xla_layouts")

TOL = {
  jnp.float32: dict(out=2e-5, grad=1e-4),
  jnp.bfloat16: dict(out=2e-2, grad=4e-2),
}


def make_qkv(key, B, T, S, N, K, H, Hv, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(key, 3)
  return (
    normal(kq, (B, T, N, H), dtype),
    normal(kk, (B, S, K, H), dtype),
    normal(kv, (B, S, K, Hv), dtype),
  )


def reference64(q, k, v, **kw):
  """The oracle in float64 on exactly the inputs the fast path saw."""
  f64 = lambda x: None if x is None else x.astype(jnp.float64)  # noqa: E731
  if "bias" in kw and hasattr(kw["bias"], "dtype"):
    kw = dict(kw, bias=f64(kw["bias"]))
  if kw.get("sinks") is not None:
    kw = dict(kw, sinks=f64(kw["sinks"]))
  return attention_reference(f64(q), f64(k), f64(v), **kw)


def assert_close(actual, expected, tol, what=""):
  actual = np.asarray(jnp.asarray(actual, jnp.float64))
  expected = np.asarray(expected, np.float64)
  np.testing.assert_allclose(actual, expected, atol=tol, rtol=tol, err_msg=what)


def loss_and_grads(fn, q, k, v, cot, **kw):
  """Value and (dq, dk, dv) of <out, cot> for a fixed random cotangent."""

  def loss(q, k, v):
    return jnp.sum(fn(q, k, v, **kw).astype(jnp.float64) * cot)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


def blocked(block_q=16, block_kv=32):
  """The blocked path under jit (masks and biases are pytrees; Python floats stay static)."""
  fn = functools.partial(blocked_attention, block_q=block_q, block_kv=block_kv)
  return jax.jit(fn, static_argnames=("scale", "softcap", "return_lse"))


def mask_cases(key, B, T, S):
  k1, k2, k3 = jax.random.split(key, 3)
  q_ids, kv_ids = random_segment_ids(k1, B, T), random_segment_ids(k2, B, S)
  return {
    "none": None,
    "causal": CausalMask(),
    "window": sliding_window(7),
    "local_two_sided": LocalMask(5, 3),
    "chunked": ChunkedCausalMask(9),
    "prefix": PrefixLMMask(11),
    "prefix_per_example": PrefixLMMask(jnp.array([3, 40][:B] + [7] * max(0, B - 2))),
    "segment": SegmentMask(q_ids, kv_ids),
    "segment_causal": SegmentMask(q_ids, kv_ids) & CausalMask(),
    "window_or_prefix": sliding_window(4) | PrefixLMMask(6),
    "block_sparse": BlockSparseMask(
      jax.random.randint(k3, (-(-T // 16), 3), -1, -(-S // 16)), (16, 16)
    ),
  }


# ------------------------------------------------------------------------------------------
# Every mask kind, GQA ratio and awkward size: forward and gradients vs the oracle.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_name", list(mask_cases(jax.random.key(0), 2, 8, 8)))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_blocked_matches_oracle_every_mask(rng, mask_name, dtype):
  B, T, S, N, K, H, Hv = 2, 63, 100, 6, 2, 60, 40
  kqkv, kmask, kcot = jax.random.split(rng, 3)
  q, k, v = make_qkv(kqkv, B, T, S, N, K, H, Hv, dtype)
  mask = mask_cases(kmask, B, T, S)[mask_name]
  cot = jax.random.normal(kcot, (B, T, N, Hv), jnp.float64)
  tol = TOL[dtype]
  val, grads = loss_and_grads(blocked(), q, k, v, cot, mask=mask)
  val_ref, grads_ref = loss_and_grads(reference64, q, k, v, cot, mask=mask)
  out = blocked()(q, k, v, mask=mask)
  assert out.dtype == dtype and out.shape == (B, T, N, Hv)
  assert_close(out, reference64(q, k, v, mask=mask).astype(dtype), tol["out"], "out")
  for name, g, g_ref in zip("qkv", grads, grads_ref, strict=True):
    assert g.dtype == dtype
    assert np.all(np.isfinite(np.asarray(g, np.float64))), f"d{name} not finite"
    assert_close(g, g_ref, tol["grad"], f"d{name}")


@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("block", [(16, 16), (64, 8), (128, 128)])
def test_gqa_ratios_and_block_sizes(rng, group, block):
  B, T, S, K, H, Hv = 1, 50, 77, 2, 32, 24
  kqkv, kcot = jax.random.split(rng)
  q, k, v = make_qkv(kqkv, B, T, S, K * group, K, H, Hv)
  cot = jax.random.normal(kcot, (B, T, K * group, Hv), jnp.float64)
  mask = CausalMask()
  _, grads = loss_and_grads(blocked(*block), q, k, v, cot, mask=mask)
  _, grads_ref = loss_and_grads(reference64, q, k, v, cot, mask=mask)
  assert_close(blocked(*block)(q, k, v, mask=mask), reference64(q, k, v, mask=mask), 2e-5)
  for g, g_ref in zip(grads, grads_ref, strict=True):
    assert_close(g, g_ref, 1e-4)


@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_jax_nn(rng, is_causal):
  B, T, N, K, H = 2, 96, 4, 2, 32
  q, k, v = make_qkv(rng, B, T, T, N, K, H, H)
  mask = CausalMask() if is_causal else None
  expected = jax.nn.dot_product_attention(q, k, v, is_causal=is_causal)
  for impl in ("xla", "reference"):
    out = dot_product_attention(q, k, v, mask=mask, implementation=impl)
    assert_close(out, expected, 2e-5, impl)
  g_nn = jax.grad(lambda q: jax.nn.dot_product_attention(q, k, v, is_causal=is_causal).sum())(q)
  g_x = jax.grad(lambda q: dot_product_attention(q, k, v, mask=mask).sum())(q)
  assert_close(g_x, g_nn, 1e-4)


# ------------------------------------------------------------------------------------------
# Options: bias (dense and in-tile), softcap, sinks, scale, lse.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "bias_shape", [(2, 4, 40, 70), (1, 4, 40, 70), (2, 1, 1, 70), (1, 1, 40, 1)]
)
def test_dense_bias_forward_and_gradient(rng, bias_shape):
  B, T, S, N, K, H = 2, 40, 70, 4, 2, 16
  kqkv, kb, kcot = jax.random.split(rng, 3)
  q, k, v = make_qkv(kqkv, B, T, S, N, K, H, H)
  bias = jax.random.normal(kb, bias_shape, jnp.float32)
  cot = jax.random.normal(kcot, (B, T, N, H), jnp.float64)

  def loss(fn, bias):
    return jnp.sum(fn(q, k, v, bias=bias, mask=CausalMask()).astype(jnp.float64) * cot)

  g = jax.grad(lambda b: loss(blocked(), b))(bias)
  g_ref = jax.grad(lambda b: loss(reference64, b))(bias)
  assert g.shape == bias.shape
  assert_close(g, g_ref, 1e-4)


def test_bias_minus_inf_equals_masking(rng):
  B, T, N, H = 1, 33, 2, 16
  q, k, v = make_qkv(rng, B, T, T, N, N, H, H)
  causal_bias = jnp.where(CausalMask().dense(T, T), 0.0, -jnp.inf)[None, None]
  with_bias = blocked()(q, k, v, bias=causal_bias)
  assert_close(with_bias, blocked()(q, k, v, mask=CausalMask()), 1e-6)
  g = jax.grad(lambda q: blocked()(q, k, v, bias=causal_bias).sum())(q)
  assert np.all(np.isfinite(g))


def test_constant_row_bias_changes_nothing(rng):
  B, T, N, H = 1, 40, 2, 16
  kqkv, kb = jax.random.split(rng)
  q, k, v = make_qkv(kqkv, B, T, T, N, N, H, H)
  row_bias = jax.random.normal(kb, (B, N, T, 1)) * 5
  assert_close(blocked()(q, k, v, bias=row_bias), blocked()(q, k, v), 1e-5)


def test_alibi_in_tile_equals_dense_and_slope_gradient(rng):
  B, T, N, H = 1, 45, 4, 16
  kqkv, ks = jax.random.split(rng)
  q, k, v = make_qkv(kqkv, B, T, T, N, N, H, H)
  slopes = jax.random.uniform(ks, (N,), jnp.float64, 0.05, 0.5)
  alibi = AlibiBias(slopes)
  dense = alibi(jnp.arange(N), jnp.arange(T), jnp.arange(T))[None].astype(jnp.float32)
  out = blocked()(q, k, v, bias=alibi, mask=CausalMask())
  assert_close(out, blocked()(q, k, v, bias=dense, mask=CausalMask()), 1e-5)
  assert_close(out, reference64(q, k, v, bias=alibi, mask=CausalMask()), 2e-5)

  def loss(fn, s):
    return fn(q, k, v, bias=AlibiBias(s), mask=CausalMask()).astype(jnp.float64).sum()

  assert_close(
    jax.grad(lambda s: loss(blocked(), s))(slopes),
    jax.grad(lambda s: loss(reference64, s))(slopes),
    1e-4,
  )


def test_alibi_slope_zero_equals_causal(rng):
  q, k, v = make_qkv(rng, 1, 30, 30, 4, 4, 8, 8)
  zero = AlibiBias(jnp.zeros((4,), jnp.float32))
  assert_close(
    blocked()(q, k, v, bias=zero, mask=CausalMask()), blocked()(q, k, v, mask=CausalMask()), 1e-6
  )


@pytest.mark.parametrize("softcap", [0.5, 5.0])
def test_softcap_and_sinks_gradients(rng, softcap):
  B, T, S, N, K, H = 2, 37, 51, 4, 1, 16
  kqkv, ks, kcot = jax.random.split(rng, 3)
  q, k, v = make_qkv(kqkv, B, T, S, N, K, H, H)
  q = q * 4  # push logits past the cap
  sinks = jax.random.normal(ks, (N,), jnp.float32)
  cot = jax.random.normal(kcot, (B, T, N, H), jnp.float64)

  def loss(fn, q, sinks):
    out = fn(q, k, v, softcap=softcap, sinks=sinks, mask=CausalMask())
    return jnp.sum(out.astype(jnp.float64) * cot)

  g = jax.grad(lambda q, s: loss(blocked(), q, s), argnums=(0, 1))(q, sinks)
  g_ref = jax.grad(lambda q, s: loss(reference64, q, s), argnums=(0, 1))(q, sinks)
  for a, b in zip(g, g_ref, strict=True):
    assert_close(a, b, 1e-4)


def test_softcap_large_equals_plain_and_caps_logits(rng):
  q, k, v = make_qkv(rng, 1, 20, 20, 2, 2, 8, 8)
  assert_close(blocked()(q, k, v, softcap=1e6), blocked()(q, k, v), 1e-5)
  _, probs = attention_reference(q * 50, k, v, softcap=1.5, return_probs=True)
  logits = jnp.log(probs) - jnp.log(probs).max(-1, keepdims=True)
  # Saturated in float32 (tanh rounds to 1), so the float statement is <= 2c.
  assert float(-logits.min()) <= 2 * 1.5 + 1e-5
  q64, k64, v64 = (x.astype(jnp.float64) for x in (q, k, v))
  _, probs = attention_reference(q64 * 3, k64, v64, softcap=1.5, return_probs=True)
  logits = jnp.log(probs) - jnp.log(probs).max(-1, keepdims=True)
  assert float(-logits.min()) < 2 * 1.5  # strictly inside (-c, c) before saturation


def test_sinks_equal_an_extra_zero_value_key(rng):
  B, T, N, H = 1, 25, 3, 8
  kqkv, ks = jax.random.split(rng)
  q, k, v = make_qkv(kqkv, B, T, T, N, N, H, H)
  sinks = jax.random.normal(ks, (N,), jnp.float32)
  out = blocked()(q, k, v, sinks=sinks)
  # One extra key per head whose logit is exactly the sink and whose value is zero.
  extra_k = jnp.zeros((B, 1, N, H), jnp.float32)
  extra_v = jnp.zeros((B, 1, N, H), jnp.float32)
  bias = jnp.concatenate(
    [
      jnp.zeros((1, N, T, T), jnp.float32),
      jnp.broadcast_to(sinks[None, :, None, None], (1, N, T, 1)),
    ],
    -1,
  )
  expected = attention_reference(
    q, jnp.concatenate([k, extra_k], 1), jnp.concatenate([v, extra_v], 1), bias=bias
  )
  assert_close(out, expected, 2e-5)
  _, probs = attention_reference(q, k, v, sinks=sinks, return_probs=True)
  row_sums = probs.sum(-1)
  assert bool(jnp.all((row_sums > 0) & (row_sums < 1)))
  assert_close(blocked()(q, k, v, sinks=jnp.full((N,), -1e4)), blocked()(q, k, v), 1e-6)


def test_lse_and_its_gradient(rng):
  B, T, S, N, K, H = 1, 30, 47, 4, 2, 16
  q, k, v = make_qkv(rng, B, T, S, N, K, H, H)
  for kw in ({}, {"sinks": jnp.linspace(-1, 1, N)}):
    out, lse = blocked()(q, k, v, mask=CausalMask(), return_lse=True, **kw)
    out_r, lse_r = reference64(q, k, v, mask=CausalMask(), return_lse=True, **kw)
    assert lse.shape == (B, N, T) and lse.dtype == jnp.float32
    assert_close(lse, lse_r, 2e-5)
    g = jax.grad(lambda q: blocked()(q, k, v, return_lse=True, **kw)[1].sum())(q)
    g_r = jax.grad(lambda q: reference64(q, k, v, return_lse=True, **kw)[1].sum())(q)
    assert_close(g, g_r, 1e-4)


def test_lse_merges_partial_results_exactly(rng):
  """Attention over [k1; k2] equals the lse-weighted merge of the two halves."""
  q, k, v = make_qkv(rng, 1, 16, 64, 2, 2, 8, 8)
  out, lse = blocked()(q, k, v, return_lse=True)
  o1, l1 = blocked()(q, k[:, :24], v[:, :24], return_lse=True)
  o2, l2 = blocked()(q, k[:, 24:], v[:, 24:], return_lse=True)
  lse_m = jnp.logaddexp(l1, l2)
  w1 = jnp.exp(l1 - lse_m).transpose(0, 2, 1)[..., None]
  w2 = jnp.exp(l2 - lse_m).transpose(0, 2, 1)[..., None]
  assert_close(w1 * o1 + w2 * o2, out, 2e-5)
  assert_close(lse_m, lse, 2e-5)


def test_custom_scale(rng):
  q, k, v = make_qkv(rng, 1, 20, 20, 2, 2, 8, 8)
  assert_close(blocked()(q, k, v, scale=0.3), reference64(q, k, v, scale=0.3), 2e-5)


# ------------------------------------------------------------------------------------------
# Robustness: fully masked rows, huge logits, causality through gradients, transformations.
# ------------------------------------------------------------------------------------------


def test_fully_masked_rows_give_zero_and_no_nan(rng):
  B, T, N, H = 2, 20, 2, 8
  q, k, v = make_qkv(rng, B, T, T, N, N, H, H)
  ids = jnp.array([[0] * 5 + [1] * 15, [2] * 10 + [0] * 10], jnp.int32)  # 0 = padding
  mask = SegmentMask(ids, ids) & CausalMask()
  for fn in (blocked(8, 8), reference64):
    out, lse = fn(q, k, v, mask=mask, return_lse=True)
    padded = np.asarray(ids == 0)
    assert np.all(np.asarray(out)[padded] == 0)
    assert np.all(np.isneginf(np.asarray(lse).transpose(0, 2, 1)[padded]))
    grads = jax.grad(
      lambda q, k, v: fn(q, k, v, mask=mask).sum() + jnp.where(jnp.isfinite(lse), 0, 0).sum(),
      argnums=(0, 1, 2),
    )(q, k, v)
    for g in grads:
      assert np.all(np.isfinite(np.asarray(g)))
  # A mask that hides everything from everyone.
  nothing = BlockSparseMask(jnp.full((3, 1), -1), 8)
  out = blocked(8, 8)(q, k, v, mask=nothing)
  assert np.all(np.asarray(out) == 0)
  g = jax.grad(lambda q: blocked(8, 8)(q, k, v, mask=nothing).sum())(q)
  assert np.all(np.asarray(g) == 0)


def test_logits_times_100_do_not_overflow(rng):
  q, k, v = make_qkv(rng, 1, 50, 50, 2, 2, 16, 16)
  q = q * 100
  out = blocked()(q, k, v, mask=CausalMask())
  assert np.all(np.isfinite(out))
  assert_close(out, reference64(q, k, v, mask=CausalMask()), 2e-5)
  g = jax.grad(lambda k: blocked()(q, k, v, mask=CausalMask()).sum())(k)
  assert np.all(np.isfinite(g))


@pytest.mark.parametrize("S", [56, 52])
@pytest.mark.parametrize("mask", [ChunkedCausalMask(16), window_blocks(16)])
def test_chunked_masks_on_tiles_inside_chunks(rng, mask, S):
  """8 x 8 tiles divide 16-token chunks: with S − T = 16 every listed tile lies in one chunk
  pair and the chunk compare is dropped (``within_tiles``); with S − T = 12 the q tiles
  straddle chunks and it must stay. Forward and gradients vs the oracle."""
  T = 40
  kqkv, kcot = jax.random.split(rng)
  q, k, v = make_qkv(kqkv, 1, T, S, 4, 2, 16, 16)
  cot = jax.random.normal(kcot, (1, T, 4, 16), jnp.float64)
  _, grads = loss_and_grads(blocked(8, 8), q, k, v, cot, mask=mask)
  _, grads_ref = loss_and_grads(reference64, q, k, v, cot, mask=mask)
  assert_close(blocked(8, 8)(q, k, v, mask=mask), reference64(q, k, v, mask=mask), 2e-5)
  for g, g_ref in zip(grads, grads_ref, strict=True):
    assert_close(g, g_ref, 1e-4)


@pytest.mark.parametrize("mask", [CausalMask(), sliding_window(5), ChunkedCausalMask(6)])
def test_causality_through_gradients(rng, mask):
  T = 40
  q, k, v = make_qkv(rng, 1, T, T, 2, 2, 8, 8)
  i = 17
  grads = jax.grad(lambda q, k, v: blocked()(q, k, v, mask=mask)[0, i].sum(), argnums=(0, 1, 2))(
    q, k, v
  )
  visible = np.asarray(mask.dense(T, T))[i]
  for g in grads[1:]:
    per_pos = np.abs(np.asarray(g)[0]).sum((1, 2))
    assert np.all(per_pos[~visible] == 0), "a future/invisible key influenced the output"
    assert np.all(per_pos[visible] > 0)
  dq = np.abs(np.asarray(grads[0])[0]).sum((1, 2))
  assert np.all(dq[np.arange(T) != i] == 0)


def test_jit_vmap_grad(rng):
  B, T, N, H = 3, 24, 2, 8
  q, k, v = make_qkv(rng, B, T, T, N, N, H, H)
  f = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, mask=CausalMask()))
  assert_close(f(q, k, v), reference64(q, k, v, mask=CausalMask()), 2e-5)
  # vmap over an extra leading axis (e.g. an ensemble) equals the loop.
  stacked = jax.vmap(lambda q, k, v: dot_product_attention(q, k, v, mask=CausalMask()))(
    q[None].repeat(2, 0), k[None].repeat(2, 0), v[None].repeat(2, 0)
  )
  assert_close(stacked[1], f(q, k, v), 1e-6)
  g = jax.jit(jax.grad(lambda q: f(q, k, v).sum()))(q)
  assert_close(g, jax.grad(lambda q: reference64(q, k, v, mask=CausalMask()).sum())(q), 1e-4)


def test_traced_segment_ids_and_block_indices_under_jit(rng):
  B, T, N, H = 2, 48, 2, 8
  kqkv, kid, kidx = jax.random.split(rng, 3)
  q, k, v = make_qkv(kqkv, B, T, T, N, N, H, H)
  ids = random_segment_ids(kid, B, T)
  idx = jax.random.randint(kidx, (B, 3, 2), 0, 3)

  @jax.jit
  def f(q, k, v, ids, idx):
    mask = (SegmentMask(ids, ids) & CausalMask()) | BlockSparseMask(idx, 16)
    return dot_product_attention(q, k, v, mask=mask, block_q=16, block_kv=16)

  mask = (SegmentMask(ids, ids) & CausalMask()) | BlockSparseMask(idx, 16)
  assert_close(f(q, k, v, ids, idx), reference64(q, k, v, mask=mask), 2e-5)


@pytest.mark.parametrize("tiles", [(16, 16), (8, 16), (16, 32)])
@pytest.mark.parametrize("batched", [False, True])
def test_block_sparse_inside_listed_tiles(rng, tiles, batched):
  """Tiles that divide the mask's blocks skip its block-level test inside listed tiles
  (``Mask.within_tiles``); (16, 32) tiles do not divide it and evaluate it. Forward and
  gradients vs the oracle either way."""
  B, T, S, N, H = 2, 61, 80, 2, 8
  kqkv, kidx, kcot = jax.random.split(rng, 3)
  q, k, v = make_qkv(kqkv, B, T, S, N, N, H, H)
  shape = ((B,) if batched else ()) + (-(-T // 16), 3)
  idx = jax.random.randint(kidx, shape, -1, -(-S // 16))
  mask = BlockSparseMask(idx, 16) & CausalMask()
  cot = normal(kcot, (B, T, N, H), jnp.float64)
  got = loss_and_grads(blocked(*tiles), q, k, v, cot, mask=mask)
  want = loss_and_grads(reference64, q, k, v, cot, mask=mask)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert_close(a, b, 2e-5)


def test_packed_batch_equals_documents_alone(rng):
  """The `segment` check: packing equals running each document alone."""
  lengths = [7, 20, 13]
  T, N, H = sum(lengths), 2, 8
  q, k, v = make_qkv(rng, 1, T, T, N, N, H, H)
  ids = jnp.concatenate([jnp.full((n,), i + 1) for i, n in enumerate(lengths)])[None]
  ids = ids.astype(jnp.int32)
  packed = blocked(8, 8)(q, k, v, mask=SegmentMask(ids, ids) & CausalMask())
  start = 0
  for n in lengths:
    sl = slice(start, start + n)
    alone = blocked(8, 8)(q[:, sl], k[:, sl], v[:, sl], mask=CausalMask())
    assert_close(packed[:, sl], alone, 1e-5)
    start += n


def test_default_implementation_is_blocked_on_cpu(rng):
  q, k, v = make_qkv(rng, 1, 16, 16, 2, 2, 8, 8)
  assert_close(dot_product_attention(q, k, v), blocked_attention(q, k, v), 0)


def test_block_skipping_does_less_work_for_causal():
  """Causal attention visits about half of the tiles (the map drives the kv loop)."""
  T, block = 4096, 512
  count, _, _ = CausalMask().block_lists(T, T, block, block)
  n = T // block
  assert int(count.sum()) == n * (n + 1) // 2
  window_count, _, _ = sliding_window(256).block_lists(T, T, block, block)
  assert int(window_count.max()) == 2  # O(w) blocks per row, not O(T)
