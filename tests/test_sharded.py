"""Masks lowered for the kernels, and attention under shard_map (8 host CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from jax.sharding import NamedSharding, PartitionSpec

from attn_jax import sharding
from attn_jax.attention import (
  AlibiBias,
  CausalMask,
  ChunkedCausalMask,
  LocalMask,
  PrefixLMMask,
  SegmentMask,
  dot_product_attention,
  kernel_mask,
)
from attn_jax.attention.sharded import sharded_attention


def _masks(key, B, T, S):
  kq, kk = jax.random.split(key)
  q_ids = jax.random.randint(kq, (B, T), 0, 3)
  kv_ids = jax.random.randint(kk, (B, S), 0, 3)
  return {
    "causal": CausalMask(),
    "local": LocalMask(3, 1),
    "chunked": ChunkedCausalMask(4),
    "prefix": PrefixLMMask(3),
    "prefix_batched": PrefixLMMask(jnp.array([2, 7])),
    "segment_causal": SegmentMask(q_ids, kv_ids) & CausalMask(),
    "segment_or_local": SegmentMask(q_ids, kv_ids, padding_id=None) | LocalMask(2, 0),
  }


@pytest.mark.parametrize(
  "name",
  [
    "causal",
    "local",
    "chunked",
    "prefix",
    "prefix_batched",
    "segment_causal",
    "segment_or_local",
  ],
)
@pytest.mark.parametrize("T, S", [(10, 13), (13, 10)])
def test_lowered_predicate_equals_the_dense_mask(rng, name, T, S):
  B = 2
  mask = _masks(rng, B, T, S)[name]
  lowered = kernel_mask.lower(mask, B, T, S)
  q_idx, kv_idx = jnp.arange(T)[:, None], jnp.arange(S)[None, :]
  dense = mask.dense(T, S)
  for b in range(B):
    q_ops, kv_ops = lowered.q_operands, lowered.kv_operands
    q_vals = () if q_ops is None else tuple(q_ops[b, :, c][:, None] for c in range(q_ops.shape[2]))
    kv_vals = () if kv_ops is None else tuple(kv_ops[b, c][None] for c in range(kv_ops.shape[1]))
    got = lowered.mask_fn(q_idx, kv_idx, q_vals, kv_vals)
    want = dense[b] if dense.ndim == 3 else dense
    np.testing.assert_array_equal(got, want)
  kinds = np.asarray(lowered.block_kinds(4, 8))
  assert kinds.shape[-2:] == (-(-T // 4), -(-S // 8))


def test_no_mask_lowers_to_all_full_tiles():
  lowered = kernel_mask.lower(None, 2, 10, 20)
  assert lowered.mask_fn is None and lowered.q_operands is None
  assert np.all(np.asarray(lowered.block_kinds(4, 8)) == 2)


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def _qkv(key, B=4, T=24, N=4, K=2, H=8):
  kq, kk, kv = jax.random.split(key, 3)
  return (
    normal(kq, (B, T, N, H), jnp.float32),
    normal(kk, (B, T, K, H), jnp.float32),
    normal(kv, (B, T, K, H), jnp.float32),
  )


@pytest.mark.parametrize("case", ["segments_bias_sinks", "prefix_alibi"])
def test_sharded_equals_unsharded_forward_lse_and_grads(rng, mesh, case):
  q, k, v = _qkv(rng)
  B, T, N = q.shape[:3]
  k1, k2, k3 = jax.random.split(jax.random.fold_in(rng, 1), 3)
  if case == "segments_bias_sinks":
    ids = jnp.sort(jax.random.randint(k1, (B, T), 1, 4), -1)
    kw = dict(
      mask=SegmentMask(ids) & CausalMask(),
      bias=normal(k2, (1, N, T, T), jnp.float32),
      sinks=normal(k3, (N,), jnp.float32),
    )
  else:
    kw = dict(mask=PrefixLMMask(jnp.array([0, 3, 5, 24])), bias=AlibiBias.default(N))

  # float64 end to end: the bias (ALiBi slope) gradients are sums over B·N·T·S terms with
  # cancellation, whose float32 value depends on the summation order (sharded or not) at
  # the 1e-4 relative level; in float64 any sharding error stands out at these tolerances.
  q, k, v = (x.astype(jnp.float64) for x in (q, k, v))
  kw["bias"] = jax.tree.map(lambda x: x.astype(jnp.float64), kw["bias"])

  def run(fn, q, k, v, bias):
    return fn(q, k, v, **{**kw, "bias": bias}, return_lse=True, implementation="xla")

  sharded = jax.jit(
    lambda q, k, v, b: run(lambda *a, **o: sharded_attention(*a, mesh=mesh, **o), q, k, v, b)
  )
  plain = lambda q, k, v, b: run(dot_product_attention, q, k, v, b)  # noqa: E731
  (out, lse), (out_ref, lse_ref) = sharded(q, k, v, kw["bias"]), plain(q, k, v, kw["bias"])
  np.testing.assert_allclose(out, out_ref, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(lse, lse_ref, atol=1e-6, rtol=1e-6)

  def loss(fn):
    return lambda q, k, v, b: jnp.sum(jnp.sin(fn(q, k, v, b)[0]))

  grads = jax.jit(jax.grad(loss(sharded), argnums=(0, 1, 2, 3)))(q, k, v, kw["bias"])
  grads_ref = jax.grad(loss(plain), argnums=(0, 1, 2, 3))(q, k, v, kw["bias"])
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
    np.testing.assert_allclose(g, g_ref, atol=2e-5, rtol=2e-5)


def test_sharded_attention_eager_inputs_committed_to_one_device(rng, mesh):
  # Arrays a previous computation left on one device (q / k / v, the mask's segment ids, a
  # dense bias, sink logits) move onto the mesh instead of failing jit's device check.
  q, k, v = _qkv(rng)
  B, T, N = q.shape[:3]
  k1, k2, k3 = jax.random.split(jax.random.fold_in(rng, 2), 3)
  ids = jnp.sort(jax.random.randint(k1, (B, T), 1, 4), -1)
  bias = normal(k2, (1, N, T, T), jnp.float32)
  sinks = normal(k3, (N,), jnp.float32)
  one = jax.devices()[3]
  on_one = jax.device_put((q, k, v, ids, bias, sinks), one)
  assert all(x.committed and x.sharding.device_set == {one} for x in on_one)
  q1, k1_, v1, ids1, bias1, sinks1 = on_one
  out = sharded_attention(
    q1, k1_, v1, mesh=mesh, mask=SegmentMask(ids1) & CausalMask(), bias=bias1, sinks=sinks1
  )
  assert out.sharding.device_set == set(mesh.devices.flat)
  ref = dot_product_attention(q, k, v, mask=SegmentMask(ids) & CausalMask(), bias=bias, sinks=sinks)
  np.testing.assert_allclose(out, ref, atol=1e-6, rtol=1e-6)


def test_sharded_attention_bad_input(rng, mesh):
  q, k, v = _qkv(rng)
  with pytest.raises(ValueError, match="batch size B=3 is not divisible by the 4 devices"):
    sharded_attention(q[:3], k[:3], v[:3], mesh=mesh)
  q3, k3, v3 = _qkv(rng, K=3, N=3)
  with pytest.raises(ValueError, match="kv heads K=3 are not divisible by the 2 devices"):
    sharded_attention(q3, k3, v3, mesh=mesh)
  with pytest.raises(ValueError, match="names mesh axis 'model'"):
    sharded_attention(q, k, v, mesh=mesh, head_axes="model")
  with pytest.raises(ValueError, match="must not share a mesh axis"):
    sharded_attention(q, k, v, mesh=mesh, batch_axes="tensor", head_axes="tensor")
  seq = jax.device_put(q, NamedSharding(mesh, PartitionSpec(None, "data")))
  with pytest.raises(ValueError, match="a sequence split needs ring attention"):
    sharded_attention(seq, k, v, mesh=mesh)
  with pytest.raises(ValueError, match="mesh must be a jax.sharding.Mesh"):
    sharded_attention(q, k, v, mesh="data")
