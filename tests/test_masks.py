"""The mask algebra: predicates, block maps, compacted lists, caching, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.attention import masks as M


def brute_kinds(dense, T, S, bq, bk):
  """EMPTY/PARTIAL/FULL from the dense mask, block by block (the definition)."""
  dense = np.asarray(dense)
  nq, nk = -(-T // bq), -(-S // bk)
  out = np.zeros(dense.shape[:-2] + (nq, nk), np.int8)
  for i in range(nq):
    for j in range(nk):
      tile = dense[..., i * bq : (i + 1) * bq, j * bk : (j + 1) * bk]
      out[..., i, j] = np.where(
        tile.all((-1, -2)), M.FULL, np.where(tile.any((-1, -2)), M.PARTIAL, M.EMPTY)
      )
  return out


def assert_block_map_sound(mask, T, S, bq, bk, exact=True):
  kinds = np.asarray(mask.block_kinds(T, S, bq, bk))
  truth = brute_kinds(mask.dense(T, S), T, S, bq, bk)
  assert kinds.shape == truth.shape
  # Never claims EMPTY where something is visible, nor FULL where something is hidden.
  assert not np.any((kinds == M.EMPTY) & (truth != M.EMPTY))
  assert not np.any((kinds == M.FULL) & (truth != M.FULL))
  if exact:
    np.testing.assert_array_equal(kinds, truth)


T, S = 37, 53


def test_dense_predicates_match_their_definitions():
  i = np.arange(T)[:, None] + (S - T)  # bottom-right positions
  j = np.arange(S)[None, :]
  np.testing.assert_array_equal(M.CausalMask().dense(T, S), j <= i)
  np.testing.assert_array_equal(M.FullMask().dense(T, S), np.ones((T, S), bool))
  np.testing.assert_array_equal(M.LocalMask(4, 2).dense(T, S), (j >= i - 4) & (j <= i + 2))
  np.testing.assert_array_equal(M.sliding_window(5).dense(T, S), (i - 5 < j) & (j <= i))
  np.testing.assert_array_equal(M.ChunkedCausalMask(8).dense(T, S), (i // 8 == j // 8) & (j <= i))
  np.testing.assert_array_equal(M.PrefixLMMask(20).dense(T, S), (j < 20) | (j <= i))
  np.testing.assert_array_equal(M.LocalMask(None, 0).dense(T, S), M.CausalMask().dense(T, S))


def test_combinations_are_exact_in_dense_form():
  a, b = M.sliding_window(6), M.PrefixLMMask(9)
  np.testing.assert_array_equal((a | b).dense(T, S), a.dense(T, S) | b.dense(T, S))
  np.testing.assert_array_equal((a & b).dense(T, S), a.dense(T, S) & b.dense(T, S))


@pytest.mark.parametrize("bq,bk", [(8, 8), (16, 4), (5, 7), (64, 64), (1, 1)])
@pytest.mark.parametrize(
  "mask",
  [
    M.CausalMask(),
    M.FullMask(),
    M.LocalMask(6, 3),
    M.sliding_window(9),
    M.ChunkedCausalMask(8),
    M.ChunkedCausalMask(5),
    M.PrefixLMMask(12),
    M.LocalMask(None, 4),
  ],
  ids=repr,
)
def test_static_block_maps_are_exact(mask, bq, bk):
  # Chunked causal with chunk not aligned to blocks is a conjunction: sound, maybe not exact.
  exact = not (isinstance(mask, M.ChunkedCausalMask) and (bq % mask.chunk or bk % mask.chunk))
  assert_block_map_sound(mask, T, S, bq, bk, exact=exact)


@pytest.mark.parametrize("bq,bk", [(8, 8), (16, 4), (5, 7)])
def test_array_masks_block_maps(rng, bq, bk):
  k1, k2, k3, k4 = jax.random.split(rng, 4)
  B = 3
  q_ids = jnp.sort(jax.random.randint(k1, (B, T), 0, 4), -1).astype(jnp.int32)
  kv_ids = jnp.sort(jax.random.randint(k2, (B, S), 0, 4), -1).astype(jnp.int32)
  idx = jax.random.randint(k3, (B, -(-T // 8), 3), -1, -(-S // 8))
  prefix = jax.random.randint(k4, (B,), 0, S)
  for mask in (
    M.SegmentMask(q_ids, kv_ids),
    M.SegmentMask(q_ids, kv_ids, padding_id=None),
    M.BlockSparseMask(idx, 8),
    M.BlockSparseMask(idx[0], (8, 8)),
    M.PrefixLMMask(prefix),
    M.SegmentMask(q_ids, kv_ids) & M.CausalMask(),
    M.BlockSparseMask(idx, 8) | M.sliding_window(3),
  ):
    exact = isinstance(mask, (M.BlockSparseMask, M.PrefixLMMask)) and (bq, bk) == (8, 8)
    assert_block_map_sound(mask, T, S, bq, bk, exact=exact)


def tilewise_dense(mask, batch, bq, bk, transposed):
  """[B, T, S] visibility of ``mask`` evaluated one bq x bk tile at a time, with the index
  grids the blocked path uses (``transposed``: its backward's [bk, bq] layout)."""
  out = np.zeros((batch, -(-T // bq) * bq, -(-S // bk) * bk), bool)
  for b in range(batch):
    for i in range(-(-T // bq)):
      for j in range(-(-S // bk)):
        q_idx, kv_idx = i * bq + jnp.arange(bq), j * bk + jnp.arange(bk)
        if transposed:
          tile = mask.visible(q_idx[None, :], kv_idx[:, None], q_offset=S - T, batch_index=b).T
        else:
          tile = mask.visible(q_idx[:, None], kv_idx[None, :], q_offset=S - T, batch_index=b)
        out[b, i * bq : (i + 1) * bq, j * bk : (j + 1) * bk] = np.broadcast_to(tile, (bq, bk))
  return out[:, :T, :S]


@pytest.mark.parametrize("tiles", [(8, 8), (4, 8), (8, 4), (8, 16), (6, 8), (8, 32)])
def test_within_tiles_keeps_visibility_on_non_empty_tiles(rng, tiles):
  """``within_tiles`` may drop only what is constant (and visible) on every listed tile;
  the reduced mask is evaluated tile by tile, in both layouts, as the blocked path does."""
  bq, bk = tiles
  k1, k2, k3 = jax.random.split(rng, 3)
  idx = jax.random.randint(k1, (2, -(-T // 8), 3), -1, -(-S // 8))
  ids = jnp.sort(jax.random.randint(k2, (2, T), 0, 3), -1).astype(jnp.int32)
  chosen = jax.random.bernoulli(k3, 0.4, (2, T, -(-S // 8)))
  block_sparse = M.BlockSparseMask(idx, 8)
  for mask in (
    block_sparse,
    block_sparse & M.CausalMask(),
    M.sliding_window(5) & (block_sparse & M.SegmentMask(ids, ids[:, :1].repeat(S, 1))),
    block_sparse | M.sliding_window(3),
    M.ChunkSelectionMask(chosen, 8),
    M.ChunkSelectionMask(chosen, 8) & M.CausalMask(),
    M.ChunkSelectionMask(chosen, 8) | M.sliding_window(4),
    M.ChunkedCausalMask(8),
    M.ChunkedCausalMask(16) & block_sparse,
    M.window_blocks(8),
  ):
    reduced = mask.within_tiles(bq, bk, q_offset=S - T)
    kinds = np.asarray(mask.block_kinds(T, S, bq, bk))
    listed = np.repeat(np.repeat(kinds != M.EMPTY, bq, -2), bk, -1)[..., :T, :S]
    listed = np.broadcast_to(listed, (2, T, S))
    full = np.broadcast_to(np.asarray(mask.dense(T, S)), listed.shape)
    for transposed in (False, True):
      got = tilewise_dense(reduced, 2, bq, bk, transposed)
      np.testing.assert_array_equal(np.where(listed, got, False), np.where(listed, full, False))
  divides = bq in (4, 8) and bk in (4, 8)
  assert isinstance(block_sparse.within_tiles(bq, bk), M.FullMask) == divides
  assert ((block_sparse & M.CausalMask()).within_tiles(bq, bk) == M.CausalMask()) == divides
  either = block_sparse | M.sliding_window(3)
  assert either.within_tiles(bq, bk) is either  # an or keeps every part
  # Chunked masks reduce when the tiles sit inside chunks, which depends on the offset.
  inside = bq in (4, 8) and bk in (4, 8)  # S - T = 16 is a multiple of bq
  assert (M.ChunkedCausalMask(8).within_tiles(bq, bk, q_offset=S - T) == M.CausalMask()) == inside
  assert isinstance(M.window_blocks(8).within_tiles(bq, bk, q_offset=S - T), M.FullMask) == inside
  for offset in (None, 3):  # unknown, or q tiles straddling chunks
    assert M.ChunkedCausalMask(8).within_tiles(bq, bk, q_offset=offset) == M.ChunkedCausalMask(8)
  # A chunk selection on chunk-aligned kv tiles reads per (query, chunk), not per pair.
  per_chunk = M.ChunkSelectionMask(chosen, 8).within_tiles(bq, bk)
  assert (type(per_chunk) is not M.ChunkSelectionMask) == (bk in (4, 8, 16, 32))


def test_segment_padding_rows_and_columns_see_nothing():
  ids = jnp.array([[0, 1, 1, 0, 2, 2]], jnp.int32)
  dense = np.asarray(M.SegmentMask(ids, ids).dense(6, 6))[0]
  assert not dense[[0, 3]].any() and not dense[:, [0, 3]].any()
  assert dense[1, 2] and dense[4, 5] and not dense[1, 4]
  dense_nopad = np.asarray(M.SegmentMask(ids, ids, padding_id=None).dense(6, 6))[0]
  assert dense_nopad[0, 3]


def test_block_lists_compaction():
  count, index, full = M.CausalMask().block_lists(64, 64, 16, 16)
  np.testing.assert_array_equal(count, [1, 2, 3, 4])
  np.testing.assert_array_equal(index, [[0, 0, 0, 0], [0, 1, 1, 1], [0, 1, 2, 2], [0, 1, 2, 3]])
  np.testing.assert_array_equal(full[np.arange(4), count - 1], [False] * 4)  # diagonal
  assert full[3, 0] and full[3, 2]
  # Local window: lists hold only the band.
  count, index, _ = M.LocalMask(3, 3).block_lists(64, 64, 16, 16)
  np.testing.assert_array_equal(count, [2, 3, 3, 2])
  np.testing.assert_array_equal(index[1, :3], [0, 1, 2])


def test_static_block_maps_are_cached_on_host():
  a = M.CausalMask().block_kinds(4096, 4096, 512, 512)
  b = M.CausalMask().block_kinds(4096, 4096, 512, 512)
  assert a is b and isinstance(a, np.ndarray) and not a.flags.writeable


def test_block_maps_of_long_sequences_need_no_dense_mask():
  kinds = M.sliding_window(1024).block_kinds(1 << 20, 1 << 20, 1024, 1024)
  assert kinds.shape == (1024, 1024)
  assert int((kinds != M.EMPTY).sum(-1).max()) == 2


def test_traced_arrays_work_under_jit(rng):
  ids = jnp.sort(jax.random.randint(rng, (2, 40), 1, 4), -1).astype(jnp.int32)

  @jax.jit
  def lists(ids, idx):
    mask = (M.SegmentMask(ids, ids) & M.CausalMask()) | M.BlockSparseMask(idx, 8)
    return mask.block_lists(40, 40, 8, 8), mask.dense(40, 40)

  idx = jnp.zeros((2, 5, 1), jnp.int32)
  (count, index, full), dense = lists(ids, idx)
  mask = (M.SegmentMask(ids, ids) & M.CausalMask()) | M.BlockSparseMask(idx, 8)
  np.testing.assert_array_equal(dense, mask.dense(40, 40))
  truth = brute_kinds(dense, 40, 40, 8, 8)
  np.testing.assert_array_equal(count, (truth != M.EMPTY).sum(-1))


def test_masks_are_pytrees_that_cross_jit(rng):
  ids = jnp.ones((1, 10), jnp.int32)
  mask = M.SegmentMask(ids, ids) & M.CausalMask()
  out = jax.jit(lambda m: m.dense(10, 10))(mask)
  np.testing.assert_array_equal(out, mask.dense(10, 10))
  assert jax.tree.leaves(M.CausalMask()) == []


@pytest.mark.parametrize(
  "make,message",
  [
    (lambda: M.LocalMask(-1, 0), "LocalMask left must be >= 0; got -1"),
    (lambda: M.LocalMask(0, 1.5), "LocalMask right must be an int >= 0; got 1.5"),
    (lambda: M.ChunkedCausalMask(0), "ChunkedCausalMask chunk must be >= 1; got 0"),
    (lambda: M.sliding_window(0), "window must be >= 1; got 0"),
    (lambda: M.PrefixLMMask(-3), "PrefixLMMask prefix_len must be >= 0; got -3"),
    (lambda: M.PrefixLMMask(jnp.zeros((2, 2), jnp.int32)), "shape [B]"),
    (lambda: M.SegmentMask(jnp.zeros((2, 5))), "q_segment_ids must be an int array"),
    (lambda: M.SegmentMask(jnp.zeros((5,), jnp.int32)), "shape [B, T]"),
    (
      lambda: M.SegmentMask(jnp.zeros((2, 5), jnp.int32), jnp.zeros((3, 5), jnp.int32)),
      "must have the same batch size",
    ),
    (lambda: M.BlockSparseMask(jnp.zeros((4,), jnp.int32), 8), "shape [nQ, M] or [B, nQ, M]"),
    (lambda: M.BlockSparseMask(jnp.zeros((4, 2), jnp.int32), 0), "block_size[0] must be >= 1"),
    (lambda: M.CausalMask() & "causal", "the right operand is str"),
    (lambda: M.CausalMask().dense(0, 4), "q_len must be >= 1; got 0"),
    (lambda: M.CausalMask().block_kinds(8, 8, 0, 4), "block_q must be >= 1; got 0"),
  ],
)
def test_bad_mask_inputs(make, message):
  with pytest.raises(ValueError, match=None) as err:
    make()
  assert message in str(err.value)
