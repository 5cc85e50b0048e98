"""Property tests: random mask combinations and block sizes (few examples, fast)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attn_jax.attention import (
  EMPTY,
  FULL,
  CausalMask,
  ChunkedCausalMask,
  LocalMask,
  PrefixLMMask,
  SegmentMask,
  attention_reference,
  blocked_attention,
)

SETTINGS = settings(
  max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
# Each example of the blocked-vs-oracle property compiles a forward and a backward (~25 s on
# 2 cores): `make test` draws 3 examples, `make test-slow` draws 30 more.
FEW = settings(SETTINGS, max_examples=3)
MANY = settings(SETTINGS, max_examples=30, derandomize=False)


@st.composite
def static_masks(draw):
  kind = draw(st.sampled_from(["causal", "local", "chunked", "prefix"]))
  if kind == "causal":
    return CausalMask()
  if kind == "local":
    side = st.one_of(st.none(), st.integers(0, 12))
    return LocalMask(draw(side), draw(side))
  if kind == "chunked":
    return ChunkedCausalMask(draw(st.integers(1, 16)))
  return PrefixLMMask(draw(st.integers(0, 20)))


@st.composite
def masks(draw, B, T, S):
  mask = draw(static_masks())
  for _ in range(draw(st.integers(0, 2))):
    other = draw(static_masks())
    mask = mask & other if draw(st.booleans()) else mask | other
  if draw(st.booleans()):
    seed = draw(st.integers(0, 2**16))
    kq, kk = jax.random.split(jax.random.key(seed))
    q_ids = jnp.sort(jax.random.randint(kq, (B, T), 0, 4), -1).astype(jnp.int32)
    kv_ids = jnp.sort(jax.random.randint(kk, (B, S), 0, 4), -1).astype(jnp.int32)
    mask = mask & SegmentMask(q_ids, kv_ids)
  return mask


SIZES = dict(
  T=st.integers(1, 40),
  S=st.integers(1, 40),
  block_q=st.integers(1, 48),
  block_kv=st.integers(1, 48),
)


@SETTINGS
@given(data=st.data(), **SIZES)
def test_block_map_is_sound_for_random_masks(data, T, S, block_q, block_kv):
  mask = data.draw(masks(2, T, S))
  kinds = np.asarray(mask.block_kinds(T, S, block_q, block_kv))
  dense = np.asarray(mask.dense(T, S))
  for i in range(kinds.shape[-2]):
    for j in range(kinds.shape[-1]):
      tile = dense[..., i * block_q : (i + 1) * block_q, j * block_kv : (j + 1) * block_kv]
      k = kinds[..., i, j]
      assert not np.any((k == EMPTY) & tile.any((-1, -2)))
      assert not np.any((k == FULL) & ~tile.all((-1, -2)))


def _blocked_equals_oracle(data, T, S, block_q, block_kv, group):
  B, K, H = 2, 2, 8
  mask = data.draw(masks(B, T, S))
  seed = data.draw(st.integers(0, 2**16))
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = normal(kq, (B, T, K * group, H), jnp.float32)
  k = normal(kk, (B, S, K, H), jnp.float32)
  v = normal(kv, (B, S, K, H), jnp.float32)

  def loss(fn, q, k, v):
    return jnp.sum(jnp.sin(fn(q, k, v).astype(jnp.float64)))

  blocked = jax.jit(
    lambda q, k, v: blocked_attention(q, k, v, mask=mask, block_q=block_q, block_kv=block_kv)
  )
  oracle = lambda q, k, v: attention_reference(  # noqa: E731
    q.astype(jnp.float64), k.astype(jnp.float64), v.astype(jnp.float64), mask=mask
  )
  np.testing.assert_allclose(blocked(q, k, v), oracle(q, k, v), atol=2e-5, rtol=2e-5)
  grads = jax.grad(lambda *a: loss(blocked, *a), argnums=(0, 1, 2))(q, k, v)
  grads_ref = jax.grad(lambda *a: loss(oracle, *a), argnums=(0, 1, 2))(q, k, v)
  for g, g_ref in zip(grads, grads_ref, strict=True):
    np.testing.assert_allclose(g, g_ref, atol=1e-4, rtol=1e-4)


BLOCKED_CASES = dict(data=st.data(), group=st.sampled_from([1, 2]), **SIZES)


@FEW
@given(**BLOCKED_CASES)
def test_blocked_equals_oracle_for_random_masks(data, T, S, block_q, block_kv, group):
  _blocked_equals_oracle(data, T, S, block_q, block_kv, group)


@pytest.mark.slow
@MANY
@given(**BLOCKED_CASES)
def test_blocked_equals_oracle_for_many_random_masks(data, T, S, block_q, block_kv, group):
  _blocked_equals_oracle(data, T, S, block_q, block_kv, group)
