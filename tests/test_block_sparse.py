"""Block-sparse flash attention (``pallas_kernels/block_sparse.py``), TPU and GPU kernels.

No accelerator here: the kernels run in Pallas interpret mode on CPU (TPU: one case under
``pltpu.InterpretParams()``, which simulates TPU memory — unwritten output blocks read as
NaN —, the others under the generic interpreter; GPU: ``interpret=True``), forward and
backward, against a float64 oracle: naive softmax attention under the dense token mask built
from the same block lists (``block_sparse.dense_mask``), empty rows → 0. Lowering for the
real hardware (``lowering_platforms=("tpu",)`` / ``("cuda",)``), forward and backward, with
traced per-head lists.

Tolerance: float32 inputs, max abs error <= 2e-5 x the largest reference magnitude (as the
flash kernel tests).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from test_flash_gpu import triton_modules

from attn_jax.attention import attention_reference
from pallas_kernels import block_sparse

TOL = 2e-5


def random_lists(rs, B, Hs, nQ, nK, *, T, S, Lq, Lk, causal, max_width=None):
  """Random per-head lists: counts 0..nK (some rows empty), distinct shuffled indices,
  FULL flags exactly on blocks wholly visible under the (bottom-right) causal predicate."""
  M = max_width or nK
  count = rs.integers(0, M + 1, (B, Hs, nQ)).astype(np.int32)
  count[0, 0, 0] = 0  # an empty row
  idx = np.zeros((B, Hs, nQ, M), np.int32)
  for pos in np.ndindex(B, Hs, nQ):
    idx[pos] = rs.permutation(nK)[:M]
    idx[pos][count[pos] :] = rs.integers(0, nK, M - count[pos])  # junk past the count
  full = np.zeros((B, Hs, nQ, M), bool)
  if causal:
    q_first = np.arange(nQ) * Lq + (S - T)  # position of the first query of the block
    last_key = (idx + 1) * Lk - 1
    full = (last_key <= q_first[None, None, :, None]) & ((idx + 1) * Lk <= S)
  else:
    full = rs.random((B, Hs, nQ, M)) < 0.5
  return count, idx, full


def oracle(q, k, v, visible_BHTS, scale=None):
  """Float64 softmax attention (``attention_reference``) under a per-head dense mask
  [B, Hs, T, S], Hs in {1, K, N}, as a -inf bias; empty rows → 0, lse → -inf."""
  N = q.shape[2]
  visible_BNTS = jnp.repeat(visible_BHTS, N // visible_BHTS.shape[1], axis=1)
  bias = jnp.where(visible_BNTS, 0.0, -jnp.inf)
  return attention_reference(q, k, v, bias=bias, scale=scale, return_lse=True)


def value_and_grads(f, args, dout, dlse):
  def loss(q, k, v):
    out, lse = f(q, k, v)
    lse_term = jnp.where(jnp.isfinite(lse), lse, 0.0) * dlse.astype(lse.dtype)
    return (out.astype(dout.dtype) * dout).sum() + lse_term.sum(), (out, lse)

  grads, (out, lse) = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(*args)
  return out, lse, grads


def assert_matches_oracle(fast, ref, args, w):
  """``fast`` (jitted, on ``args``) vs ``ref`` (float64 copies of ``args``): the output and
  the gradient of Σ out·w with respect to every argument."""

  def loss(fn):
    def f(*a):
      out = fn(*a)
      return jnp.sum(out * w.astype(out.dtype)), out

    return f

  argnums = tuple(range(len(args)))
  grads, out = jax.jit(jax.grad(loss(fast), argnums, has_aux=True))(*args)
  r_grads, r_out = jax.grad(loss(ref), argnums, has_aux=True)(
    *(a.astype(jnp.float64) for a in args)
  )
  assert_close("out", out, r_out)
  for i, (g, rg) in enumerate(zip(grads, r_grads, strict=True)):
    assert_close(f"d(argument {i})", g, rg)


def assert_close(name, got, want, tol=TOL):
  got = np.asarray(jnp.asarray(got, jnp.float64))
  want = np.asarray(want, np.float64)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  finite = np.isfinite(want)
  assert np.array_equal(np.isfinite(got), finite), f"{name}: finite pattern differs"
  scale = max(1.0, float(np.abs(want[finite]).max(initial=0.0)))
  err = float(np.abs(got[finite] - want[finite]).max(initial=0.0))
  assert err <= tol * scale, f"{name}: max abs error {err:.3g} > {tol:g} x {scale:.3g}"


# (backend, interpret, B, T, S, N, K, H, Hs, (Lq, Lk), causal, tiles or None)
CASES = {
  # TPU memory simulation: per-kv-head lists, causal, ragged S, GQA 2.
  "tpu_sim_kvheads_causal": ("tpu", "sim", 1, 256, 333, 4, 2, 64, "K", (128, 128), True, None),
  # Per-query-head lists, non-causal, tiles smaller than the list blocks (each list block
  # spans 2 q tiles), MQA, two examples.
  "tpu_qheads_subtiles": ("tpu", "hlo", 2, 200, 384, 2, 1, 64, "N", (64, 128), False, (32, 128)),
  "gpu_qheads_causal_gqa2": ("gpu", "hlo", 2, 100, 128, 4, 2, 32, "N", (32, 32), True, None),
  "gpu_shared_noncausal_sub": ("gpu", "hlo", 1, 90, 70, 2, 1, 16, "1", (32, 32), False, (16, 16)),
}


def _case_inputs(rng, name):
  backend, mode, B, T, S, N, K, H, hs, (Lq, Lk), causal, tiles = CASES[name]
  rs = np.random.default_rng(np.asarray(jax.random.key_data(rng)))
  Hs = {"K": K, "N": N, "1": 1}[hs]
  nQ, nK = -(-T // Lq), -(-S // Lk)
  lists = random_lists(rs, B, Hs, nQ, nK, T=T, S=S, Lq=Lq, Lk=Lk, causal=causal)
  q = jnp.asarray(rs.standard_normal((B, T, N, H), np.float32))
  k = jnp.asarray(rs.standard_normal((B, S, K, H), np.float32))
  v = jnp.asarray(rs.standard_normal((B, S, K, H), np.float32))
  dout = jnp.asarray(rs.standard_normal((B, T, N, H), np.float32))
  dlse = jnp.asarray(rs.standard_normal((B, N, T), np.float32))
  return (backend, mode, (Lq, Lk), causal, tiles), lists, (q, k, v), (dout, dlse)


def _kernel(backend, mode, block, causal, tiles, lists, **kw):
  count, idx, full = lists
  interpret = {"sim": pltpu.InterpretParams(), "hlo": True, "off": False}[mode]

  def f(q, k, v):
    return block_sparse.block_sparse_attention(
      q,
      k,
      v,
      jnp.asarray(count),
      jnp.asarray(idx),
      kv_full=jnp.asarray(full),
      block_size=block,
      causal=causal,
      return_lse=True,
      backend=backend,
      block_q=None if tiles is None else tiles[0],
      block_kv=None if tiles is None else tiles[1],
      interpret=interpret,
      **kw,
    )

  return f


@pytest.mark.parametrize("name", list(CASES))
def test_matches_dense_masked_oracle(rng, name):
  (backend, mode, block, causal, tiles), lists, args, (dout, dlse) = _case_inputs(rng, name)
  out, lse, grads = value_and_grads(
    _kernel(backend, mode, block, causal, tiles, lists), args, dout, dlse
  )
  T, S = args[0].shape[1], args[1].shape[1]
  vis = block_sparse.dense_mask(
    jnp.asarray(lists[0]),
    jnp.asarray(lists[1]),
    q_len=T,
    kv_len=S,
    block_size=block,
    causal=causal,
  )
  args64 = tuple(a.astype(jnp.float64) for a in args)
  r_out, r_lse, r_grads = value_and_grads(lambda q, k, v: oracle(q, k, v, vis), args64, dout, dlse)
  assert_close("out", out, r_out)
  assert_close("lse", lse, r_lse)
  for gname, g, rg in zip(("dq", "dk", "dv"), grads, r_grads, strict=True):
    assert np.all(np.isfinite(np.asarray(g))), gname
    assert_close(gname, g, rg)
  # The empty row (example 0, list head 0, q block 0) gives zeros and lse = -inf.
  assert np.all(np.asarray(lse)[0, 0, : block[0]] == -np.inf)
  assert np.all(np.asarray(out)[0, : block[0], 0] == 0.0)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_visits_only_listed_tiles(rng, backend):
  """debug_visits: per (example, query head, q tile) the kernel computed exactly its
  listed tiles (per-query-head lists; each list block = 2 x 1 kernel tiles)."""
  rs = np.random.default_rng(np.asarray(jax.random.key_data(rng)))
  B, T, S, N, K, H = 1, 128, 256, 2, 1, 16
  Lq, Lk = (64, 128) if backend == "tpu" else (32, 32)
  bq = Lq // 2
  nQ, nK = T // Lq, S // Lk
  count, idx, full = random_lists(rs, B, N, nQ, nK, T=T, S=S, Lq=Lq, Lk=Lk, causal=False)
  q = jnp.asarray(rs.standard_normal((B, T, N, H), np.float32))
  k = jnp.asarray(rs.standard_normal((B, S, K, H), np.float32))
  _, visits = block_sparse.block_sparse_attention(
    q,
    k,
    k,
    jnp.asarray(count),
    jnp.asarray(idx),
    kv_full=jnp.asarray(full),
    block_size=(Lq, Lk),
    backend=backend,
    block_q=bq,
    interpret=True,
    debug_visits=True,
  )
  want = np.repeat(count, 2, axis=-1)  # [B, N, nQ tiles]
  np.testing.assert_array_equal(np.asarray(visits), want)
  assert int(np.asarray(visits).sum()) < B * N * (T // bq) * nK


def test_traced_lists_under_jit(rng):
  """Lists computed inside jit (a top-k block selection) drive the kernel; duplicates in
  traced lists are visited once, out-of-range entries past the count are ignored."""
  rs = np.random.default_rng(np.asarray(jax.random.key_data(rng)))
  B, T, S, N, K, H, L = 1, 128, 128, 2, 2, 16, 32
  q = jnp.asarray(rs.standard_normal((B, T, N, H), np.float32))
  k = jnp.asarray(rs.standard_normal((B, S, K, H), np.float32))
  v = jnp.asarray(rs.standard_normal((B, S, K, H), np.float32))
  nQ = nK = T // L

  @jax.jit
  def f(q, k, v):
    qm = q.reshape(B, nQ, L, N, H).mean(2)  # [B, nQ, N, H]
    km = k.reshape(B, nK, L, K, H).mean(2)
    score = jnp.einsum("bqnh,bcnh->bnqc", qm, km)
    _, top = jax.lax.top_k(score, 2)  # [B, N, nQ, 2]
    idx = jnp.concatenate([top, top[..., :1]], -1).astype(jnp.int32)  # a duplicate
    count = jnp.full((B, N, nQ), 3, jnp.int32)
    out = block_sparse.block_sparse_attention(
      q, k, v, count, idx, block_size=L, backend="gpu", interpret=True
    )
    return out, top

  out, top = f(q, k, v)
  vis = block_sparse.dense_mask(
    jnp.full((B, N, nQ), 2, jnp.int32), top.astype(jnp.int32), q_len=T, kv_len=S, block_size=L
  )
  r_out, _ = oracle(*(a.astype(jnp.float64) for a in (q, k, v)), vis)
  assert_close("out", out, r_out)


def test_merge_branches_is_exact(rng):
  """Two branches over disjoint kv blocks, merged by lse, equal one call over their union
  (the own-block-causal + selected-blocks composition)."""
  rs = np.random.default_rng(np.asarray(jax.random.key_data(rng)))
  B, T, N, K, H, L = 1, 128, 2, 1, 16, 32
  nQ = T // L
  q = jnp.asarray(rs.standard_normal((B, T, N, H), np.float32))
  k = jnp.asarray(rs.standard_normal((B, T, K, H), np.float32))
  v = jnp.asarray(rs.standard_normal((B, T, K, H), np.float32))
  own = (np.ones((B, 1, nQ), np.int32), np.arange(nQ, dtype=np.int32).reshape(1, 1, nQ, 1))
  past_count = np.arange(nQ, dtype=np.int32).reshape(1, 1, nQ)  # every earlier block
  past_idx = np.tile(np.arange(nQ, dtype=np.int32), (1, 1, nQ, 1))
  run = lambda c, i, causal: block_sparse.block_sparse_attention(  # noqa: E731
    q,
    k,
    v,
    jnp.asarray(c),
    jnp.asarray(i),
    block_size=L,
    causal=causal,
    return_lse=True,
    backend="gpu",
    interpret=True,
  )
  o1, l1 = run(*own, True)
  o2, l2 = run(past_count, past_idx, False)
  out, lse = block_sparse.merge_branches([o1, o2], [l1, l2])
  full_count = np.arange(1, nQ + 1, dtype=np.int32).reshape(1, 1, nQ)
  o3, l3 = run(full_count, past_idx, True)
  assert_close("out", out, o3, 1e-5)
  assert_close("lse", lse, l3, 1e-5)


def _lists_for_lowering(B, Hs, nQ, nK):
  count = jnp.full((B, Hs, nQ), 2, jnp.int32)
  idx = jnp.tile(jnp.arange(2, dtype=jnp.int32), (B, Hs, nQ, 1))
  return count, idx


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_lowers_for_hardware(backend):
  """Forward and backward lower for the real TPU (Mosaic) / GPU (Triton) with traced
  per-query-head lists and the causal predicate."""
  B, T, N, K, H = 1, 512, 4, 2, 64
  L = 128 if backend == "tpu" else 64
  nQ = T // L
  count, idx = _lists_for_lowering(B, N, nQ, nQ)
  spec = jax.ShapeDtypeStruct
  args = (
    spec((B, T, N, H), jnp.bfloat16),
    spec((B, T, K, H), jnp.bfloat16),
    spec((B, T, K, H), jnp.bfloat16),
    spec(count.shape, jnp.int32),
    spec(idx.shape, jnp.int32),
  )

  def f(q, k, v, count, idx):
    out, lse = block_sparse.block_sparse_attention(
      q, k, v, count, idx, block_size=L, causal=True, return_lse=True, backend=backend
    )
    return out, lse

  def loss(q, k, v, count, idx):
    out, lse = f(q, k, v, count, idx)
    return out.astype(jnp.float32).sum() + jnp.where(jnp.isfinite(lse), lse, 0.0).sum()

  platform = "tpu" if backend == "tpu" else "cuda"
  fwd = jax.jit(f).trace(*args).lower(lowering_platforms=(platform,))
  bwd = (
    jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(lowering_platforms=(platform,))
  )
  if backend == "tpu":
    assert "tpu_custom_call" in fwd.as_text()
    assert bwd.as_text().count("tpu_custom_call") >= 3
  else:
    assert triton_modules(fwd) == [("flash_gpu_fwd", True)]
    assert sorted(triton_modules(bwd)) == [
      ("flash_gpu_dkdv", True),
      ("flash_gpu_dq", True),
      ("flash_gpu_fwd", True),
    ]


def _small():
  q = jnp.zeros((1, 64, 2, 16), jnp.float32)
  k = jnp.zeros((1, 64, 1, 16), jnp.float32)
  return q, k, k


def _good_lists(Hs=2, nQ=2, M=2):
  return np.ones((1, Hs, nQ), np.int32), np.zeros((1, Hs, nQ, M), np.int32)


@pytest.mark.parametrize(
  "lists, kwargs, match",
  [
    (
      (np.full((1, 2, 2), 3, np.int32), np.zeros((1, 2, 2, 2), np.int32)),
      {},
      r"outside \[0, M=2\]",
    ),
    (
      (np.ones((1, 2, 2), np.int32), np.full((1, 2, 2, 2), 5, np.int32)),
      {},
      r"not a kv block in \[0, nK=2\)",
    ),
    (
      (np.full((1, 2, 2), 2, np.int32), np.zeros((1, 2, 2, 2), np.int32)),
      {},
      "lists a kv block twice",
    ),
    (
      (np.ones((1, 3, 2), np.int32), np.zeros((1, 3, 2, 2), np.int32)),
      {},
      "list head dim Hs must be 1, K=1 or N=2",
    ),
    ((np.ones((1, 2, 3), np.int32), np.zeros((1, 2, 3, 2), np.int32)), {}, r"need B=1, nQ=2"),
    (
      (np.ones((1, 2), np.int32), np.zeros((1, 2, 2, 2), np.int32)),
      {},
      r"kv_count must be \[B, Hs, nQ\]",
    ),
    (
      (np.ones((1, 2, 2)), np.zeros((1, 2, 2, 2), np.int32)),
      {},
      "kv_count must be an integer array",
    ),
    (_good_lists(), dict(kv_full=np.ones((1, 2, 2, 3), bool)), "kv_full must have kv_idx's shape"),
    (_good_lists(), dict(block_size=(32, 0)), "block_size must be a positive int or a pair"),
    (
      _good_lists(),
      dict(block_q=24),
      r"block_q=24 must be a positive int dividing the list block 32",
    ),
    (_good_lists(), dict(backend="cpu"), "backend must be 'tpu' or 'gpu'"),
    (_good_lists(), dict(mask_fn=3), "mask_fn must be callable"),
  ],
)
def test_bad_inputs(lists, kwargs, match):
  kwargs = {"block_size": 32, "backend": "gpu", "interpret": True, **kwargs}
  with pytest.raises(ValueError, match=match):
    block_sparse.block_sparse_attention(*_small(), *lists, **kwargs)


@pytest.mark.parametrize("hs", ["1", "K", "N"])
def test_pure_jax_path_folds_list_heads_exactly(rng, hs):
  """attn_jax.attention.block_sparse on the blocked xla path (list heads folded into the
  batch; Hs = N with GQA repeats K / V) equals the oracle, forward and gradients."""
  from attn_jax.attention import block_sparse as bs_lib

  rs = np.random.default_rng(np.asarray(jax.random.key_data(rng)))
  B, T, S, N, K, H, L = 2, 45, 50, 4, 2, 8, 8
  Hs = {"1": 1, "K": K, "N": N}[hs]
  nQ, nK = -(-T // L), -(-S // L)
  count, idx, _ = random_lists(rs, B, Hs, nQ, nK, T=T, S=S, Lq=L, Lk=L, causal=True)
  args = tuple(
    jnp.asarray(rs.standard_normal(shape, np.float32))
    for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, H))
  )
  dout = jnp.asarray(rs.standard_normal((B, T, N, H), np.float32))
  dlse = jnp.asarray(rs.standard_normal((B, N, T), np.float32))

  def fast(q, k, v):
    return bs_lib.block_sparse_attention(
      q,
      k,
      v,
      jnp.asarray(count),
      jnp.asarray(idx),
      block_size=L,
      causal=True,
      return_lse=True,
    )

  vis = block_sparse.dense_mask(
    jnp.asarray(count), jnp.asarray(idx), q_len=T, kv_len=S, block_size=L, causal=True
  )
  out, lse, grads = value_and_grads(fast, args, dout, dlse)
  args64 = tuple(a.astype(jnp.float64) for a in args)
  r_out, r_lse, r_grads = value_and_grads(lambda q, k, v: oracle(q, k, v, vis), args64, dout, dlse)
  assert_close("out", out, r_out)
  assert_close("lse", lse, r_lse)
  for gname, g, rg in zip(("dq", "dk", "dv"), grads, r_grads, strict=True):
    assert_close(gname, g, rg)
  with pytest.raises(ValueError, match="implementation must be one of"):
    bs_lib.block_sparse_attention(
      *args, jnp.asarray(count), jnp.asarray(idx), block_size=L, implementation="dense"
    )
