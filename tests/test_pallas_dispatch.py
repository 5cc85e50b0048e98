"""The Pallas kernels behind ``dot_product_attention``: dispatch, lowering, sharding, layers.

The kernels themselves are tested in test_flash_tpu.py / test_flash_gpu.py; here the front
door, the shard_map helper and the NNX layer are checked to route to them correctly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax import sharding
from attn_jax.attention import (
  AlibiBias,
  BlockSparseMask,
  CausalMask,
  SegmentMask,
  attention_reference,
  default_implementation,
  dot_product_attention,
)
from attn_jax.attention.sharded import sharded_attention
from attn_jax.nn.attention import Attention


def _qkv(key, B=2, T=40, S=40, N=4, K=2, H=16):
  kq, kk, kv = jax.random.split(key, 3)
  return (
    normal(kq, (B, T, N, H), jnp.float32),
    normal(kk, (B, S, K, H), jnp.float32),
    normal(kv, (B, S, K, H), jnp.float32),
  )


def test_default_implementation_per_backend():
  assert default_implementation("tpu") == "pallas_tpu"
  assert default_implementation("gpu") == "pallas_gpu"
  assert default_implementation("cpu") == "xla"
  # Calls the kernels cannot take stay on the blocked path everywhere.
  assert default_implementation("tpu", bias=AlibiBias.default(4)) == "xla"
  sparse = BlockSparseMask(jnp.zeros((1, 1), jnp.int32), 8)
  assert default_implementation("gpu", mask=sparse & CausalMask()) == "xla"  # no 8-row tile
  sparse = BlockSparseMask(jnp.zeros((1, 1), jnp.int32), 128)
  assert default_implementation("gpu", mask=sparse & CausalMask()) == "pallas_gpu"
  assert default_implementation("tpu", mask=sparse & CausalMask()) == "pallas_tpu"
  assert default_implementation("tpu", mask=sparse | CausalMask()) == "xla"


def _sparse_mask(key, B, T, block, width):
  """Per example and q block: the diagonal block and ``width - 1`` random other blocks
  (some padding -1), as traced-friendly int32 indices."""
  nQ = -(-T // block)
  rs = np.random.default_rng(np.asarray(jax.random.key_data(key)))
  idx = np.full((B, nQ, width), -1, np.int32)
  for b in range(B):
    for i in range(nQ):
      picks = [i, *rs.permutation(nQ)[: rs.integers(0, width)].tolist()]
      picks = list(dict.fromkeys(picks))[:width]
      idx[b, i, : len(picks)] = picks
  return BlockSparseMask(jnp.asarray(idx), block)


def test_block_sparse_mask_runs_on_the_kernel(rng):
  """BlockSparseMask & causal through pallas_interpret (TPU kernel, TPU memory simulated),
  block 128 = one kernel tile: forward and gradients equal the float64 oracle (tile visits
  are checked in test_block_sparse.py)."""
  q, k, v = _qkv(rng, B=1, T=384, S=384, N=2, K=1, H=16)
  mask = _sparse_mask(rng, 1, 384, 128, 2) & CausalMask()

  def loss(impl):
    def f(q, k, v):
      out = dot_product_attention(q, k, v, mask=mask, implementation=impl)
      return jnp.sum(jnp.sin(out.astype(jnp.float64)))

    return f

  out = dot_product_attention(q, k, v, mask=mask, implementation="pallas_interpret")
  ref = attention_reference(*(x.astype(jnp.float64) for x in (q, k, v)), mask=mask)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  grads = jax.jit(jax.grad(loss("pallas_interpret"), argnums=(0, 1, 2)))(q, k, v)
  grads_ref = jax.grad(loss("reference"), argnums=(0, 1, 2))(
    *(x.astype(jnp.float64) for x in (q, k, v))
  )
  for g, g_ref in zip(grads, grads_ref, strict=True):
    np.testing.assert_allclose(g, g_ref, atol=1e-4, rtol=1e-4)


def test_block_sparse_mask_tiles_must_divide_its_blocks(rng):
  q, k, v = _qkv(rng, B=1, T=256, S=256, N=2, K=1, H=16)
  mask = _sparse_mask(rng, 1, 256, 128, 2)
  with pytest.raises(ValueError, match=r"block_kv=256 must divide the BlockSparseMask block"):
    dot_product_attention(q, k, v, mask=mask, implementation="pallas_interpret", block_kv=256)


def test_pallas_interpret_equals_the_oracle_forward_and_grads(rng):
  q, k, v = _qkv(rng)
  B, T = q.shape[:2]
  ids = jnp.sort(jax.random.randint(jax.random.fold_in(rng, 1), (B, T), 1, 4), -1)
  kw = dict(mask=SegmentMask(ids) & CausalMask(), softcap=5.0)

  def loss(impl):
    def f(q, k, v):
      out = dot_product_attention(q, k, v, implementation=impl, **kw)
      return jnp.sum(jnp.sin(out.astype(jnp.float64)))

    return f

  out = dot_product_attention(q, k, v, implementation="pallas_interpret", **kw)
  ref = attention_reference(*(x.astype(jnp.float64) for x in (q, k, v)), **kw)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  grads = jax.grad(loss("pallas_interpret"), argnums=(0, 1, 2))(q, k, v)
  grads_ref = jax.grad(loss("reference"), argnums=(0, 1, 2))(
    *(x.astype(jnp.float64) for x in (q, k, v))
  )
  for g, g_ref in zip(grads, grads_ref, strict=True):
    np.testing.assert_allclose(g, g_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sparse", [False, True], ids=["segment_causal", "block_sparse"])
@pytest.mark.parametrize("impl, platform", [("pallas_tpu", "tpu"), ("pallas_gpu", "cuda")])
def test_front_door_lowers_for_the_real_backend(rng, impl, platform, sparse):
  q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(rng, T=256, S=256, H=64))
  ids = jnp.ones((2, 256), jnp.int32)
  mask = SegmentMask(ids) & CausalMask()
  if sparse:
    mask = _sparse_mask(rng, 2, 256, 128, 2) & CausalMask()

  def fwd(q, k, v):
    return dot_product_attention(q, k, v, mask=mask, implementation=impl)

  def grad(q, k, v):
    return jax.grad(lambda *a: fwd(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

  for f in (fwd, grad):
    text = jax.jit(f).trace(q, k, v).lower(lowering_platforms=(platform,)).as_text()
    assert ("tpu_custom_call" if platform == "tpu" else "triton") in text.lower()


def test_sharded_pallas_equals_unsharded(rng):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, jax.devices()[:4])
  q, k, v = _qkv(rng)
  kw = dict(mask=CausalMask(), implementation="pallas_interpret", return_lse=True)
  out, lse = jax.jit(lambda q, k, v: sharded_attention(q, k, v, mesh=mesh, **kw))(q, k, v)
  out_ref, lse_ref = dot_product_attention(q, k, v, **kw)
  np.testing.assert_allclose(out, out_ref, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(lse, lse_ref, atol=1e-6, rtol=1e-6)


def test_attention_layer_runs_the_kernel_per_shard_under_a_mesh(rng):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, jax.devices()[:4])
  x = normal(rng, (2, 24, 32), jnp.float32)

  def make(impl):
    return Attention(
      d_model=32, num_heads=4, num_kv_heads=2, kind="causal", implementation=impl, rngs=nnx.Rngs(0)
    )

  kernel_layer, xla_layer = make("pallas_interpret"), make("xla")
  want = xla_layer(x)
  with sharding.activation_sharding(mesh):
    got = nnx.jit(lambda m, x: m(x))(kernel_layer, x)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
