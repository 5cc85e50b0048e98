"""VMoBA (``attn_jax.attention.vmoba``): partitions round-trip exactly; the selection keeps
every query's own block and reaches τ·T of each head's gate mass; τ = 1 is full attention;
the fast path equals a float64 dense masked reference of the same selection (values and
gradients); the TPU kernel path (TPU memory simulated) equals the blocked path; NNX kind."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx
from test_block_sparse import assert_matches_oracle, oracle

from attn_jax.attention import dot_product_attention
from attn_jax.attention import vmoba as vm
from attn_jax.nn.attention import Attention

GRID = (4, 4, 6)  # F, Hi, Wi: T = 96


def _qkv(key, B=2, T=96, N=4, K=2, H=8):
  kq, kk, kv = jax.random.split(key, 3)
  return (
    normal(kq, (B, T, N, H), jnp.float32),
    normal(kk, (B, T, K, H), jnp.float32),
    normal(kv, (B, T, K, H), jnp.float32),
  )


@pytest.mark.parametrize("block", [(2, 4, 6), (1, 2, 3), (2, 2, 3)], ids=["1d", "2d", "3d"])
def test_partitions_round_trip_and_are_contiguous(rng, block):
  x = normal(rng, (2, 96, 3), jnp.float32)
  y = vm.to_blocks(x, GRID, block)
  np.testing.assert_array_equal(vm.from_blocks(y, GRID, block), x)
  # The first block of the block-major order is the (bt, bh, bw) corner of the video.
  b = block[0] * block[1] * block[2]
  corner = np.asarray(x).reshape(2, *GRID, 3)[:, : block[0], : block[1], : block[2]]
  np.testing.assert_array_equal(np.asarray(y[:, :b]), corner.reshape(2, b, 3))


def test_selection_rule(rng):
  q, k, _ = _qkv(rng)
  tau, block = 0.6, 8
  sel = np.asarray(vm.vmoba_select(q, k, block=block, tau=tau))
  B, N, T, nC = sel.shape
  assert (sel[:, :, np.arange(T), np.arange(T) // block]).all()  # own block
  kr = np.repeat(np.asarray(k, np.float64), 2, axis=2).reshape(B, nC, block, N, 8).mean(2)
  s = np.einsum("btnh,bcnh->bntc", np.asarray(q, np.float64), kr) / np.sqrt(8)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  kept = (p * sel).sum((2, 3))  # [B, N]
  assert (kept >= tau * T - 1e-3).all()
  # Global: the kept pairs (own blocks aside) are the head's largest gate values.
  for b, n in np.ndindex(B, N):
    own = np.zeros((T, nC), bool)
    own[np.arange(T), np.arange(T) // block] = True
    extra = sel[b, n] & ~own
    if extra.any() and (~sel[b, n]).any():
      assert p[b, n][extra].min() >= p[b, n][~sel[b, n]].max() - 1e-6
  assert not sel.all()


def test_tau_one_is_full_attention(rng):
  q, k, v = _qkv(rng)
  out = vm.vmoba(q, k, v, vmoba_grid=GRID, vmoba_block=(1, 2, 3), vmoba_tau=1.0)
  want = dot_product_attention(q, k, v, implementation="reference")
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)


def test_matches_dense_masked_reference_with_gradients(rng):
  q, k, v = _qkv(rng)
  kw = dict(vmoba_grid=GRID, vmoba_block=(2, 2, 3), vmoba_tau=0.5)
  _, sel = vm.vmoba(q, k, v, return_selection=True, **kw)
  b = 12
  # The dense mask in frame-major order: token t (block-major position) sees the tokens of
  # its selected blocks; map both axes back through the partition.
  vis_bm = jnp.repeat(sel, b, axis=-1)  # [B, N, T, T] block-major
  inv = np.argsort(vm.partition_order(GRID, (2, 2, 3)))
  vis = vis_bm[:, :, inv][:, :, :, inv]
  w = normal(jax.random.fold_in(rng, 3), q.shape, jnp.float32)

  assert_matches_oracle(
    lambda q, k, v: vm.vmoba(q, k, v, **kw), lambda q, k, v: oracle(q, k, v, vis)[0], (q, k, v), w
  )


def test_kernel_path_equals_blocked_path(rng):
  q, k, v = _qkv(rng, B=1, T=512, N=2, K=1, H=16)
  kw = dict(vmoba_grid=(4, 8, 16), vmoba_block=(1, 8, 16), vmoba_tau=0.5)
  got = vm.vmoba(q, k, v, implementation="pallas_interpret", **kw)
  want = vm.vmoba(q, k, v, implementation="xla", **kw)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_bad_inputs_and_nnx_kind(rng):
  q, k, v = _qkv(rng)
  with pytest.raises(ValueError, match="must split into whole"):
    vm.vmoba(q, k, v, vmoba_grid=GRID, vmoba_block=(3, 1, 1))
  with pytest.raises(ValueError, match="must hold T=96"):
    vm.vmoba(q, k, v, vmoba_grid=(4, 4, 4))
  with pytest.raises(ValueError, match="vmoba_tau must be in"):
    vm.vmoba(q, k, v, vmoba_tau=0.0)
  with pytest.raises(ValueError, match="vmoba_block must be three positive ints"):
    vm.vmoba(q, k, v, vmoba_block=(2, 2))
  layer = Attention(
    d_model=16,
    num_heads=2,
    kind="vmoba",
    causal=False,
    positions="none",
    options={"vmoba_grid": "2,2,4", "vmoba_block": "1,2,2"},
    rngs=nnx.Rngs(0),
  )
  x = normal(rng, (2, 16, 16), jnp.float32)
  assert np.all(np.isfinite(np.asarray(layer(x))))
  with pytest.raises(ValueError, match="bidirectional-only"):
    Attention(d_model=16, num_heads=2, kind="vmoba", causal=True, rngs=nnx.Rngs(0))
