"""Block-sparse flash attention for TPU and GPU, driven by run-time per-head block lists.

Dimension key: B batch, T query length, S key/value length, N query heads, K kv heads,
H q/k head dim, Hv value head dim, Hs list heads (K: a list per kv head, shared by its query
heads; N: a list per query head; 1: shared by all heads), nQ / nK list blocks along T / S
(``block_size = (Lq, Lk)`` tokens), M the width of a list.

The caller (a selection function: MoBA gate, NSA top-n, k-means routing, ...) says, for every
(example, list head, q block), which kv blocks to attend:

  * ``kv_count`` int ``[B, Hs, nQ]``: how many entries of the row are used (0 … M);
  * ``kv_idx`` int ``[B, Hs, nQ, M]``: the kv block indices, in any order, no duplicates
    among the first ``kv_count`` entries; entries past the count are ignored;
  * ``kv_full`` bool ``[B, Hs, nQ, M]`` or None: True when the whole listed block is
    visible, False when it is PARTIAL, i.e. the token-level predicate (``causal`` — the
    diagonal block of causal attention — and/or the caller's ``mask_fn``) is evaluated
    inside the tile. None: every listed block PARTIAL when there is a predicate, else FULL.

How it runs. The lists are scattered into a per-head block map int8 ``[B, Hs, nQk, nKk]``
(EMPTY / PARTIAL / FULL per kernel tile; a list block of ``Lq × Lk`` tokens covers
``(Lq / bq) × (Lk / bk)`` kernel tiles) and handed to the flash kernels
(``flash_tpu`` / ``flash_gpu``), which compact it back into increasing per-(head, q tile)
lists and, for the backward, per-(head, kv tile) transposed lists:

  * TPU: the lists are scalar-prefetched (SMEM) and drive the k / v index maps of a
    ``(B, N, nQk, Mk)`` grid: step j of a row loads the j-th listed kv tile; steps past the
    row's count repeat the previous block index, so the pipeline issues no DMA and the body
    is skipped by ``pl.when``. Unlisted blocks cost neither DMA nor compute.
  * GPU (Triton): one program per (q tile, example, query head) loops ``fori_loop(0, count)``
    over its list, loading only listed k / v tiles.
  * Backward: the dq kernel walks the same lists; the dk / dv kernel walks the transposed
    lists (per kv tile, the q tiles of each of the G query heads that listed it), summing the
    G query heads of a kv head in VMEM / registers.

The re-compaction makes the kernel independent of the caller's order and width, and costs
O(B·Hs·nQk·nKk) int8 work outside the kernel, negligible next to the attention itself.
Values are checked when the lists are concrete (numpy or committed jax arrays): counts in
[0, M], indices in [0, nK), no duplicates in a row (a ``ValueError`` names the first bad
row). Under ``jit`` the lists are traced and cannot be checked; there an out-of-range index
is dropped and a duplicate is visited once (the scatter takes the max of the flags).

``lse`` is returned on request (``return_lse=True``) and is differentiable, so branches
over disjoint key sets merge exactly (own-block causal + selected blocks; sliding window +
compressed + selected): ``out = Σ_b exp(lse_b − lse) · out_b`` with ``lse = logsumexp_b lse_b``.

Cost model (per call; d = the listed fraction of (q block, kv block) pairs, H = Hv):
  * FLOPs: forward 4·B·N·T·S·H·d, backward 14·B·N·T·S·H·d (the flash kernels' 7 matmuls).
  * HBM bytes: q / out / lse once, plus each listed k / v tile once per q tile:
    ≈ 2·B·N·T·S·H·e·d / bq (e bytes per element); the backward twice that plus the
    compulsory q, k, v, out, dO, dq, dk, dv. Arithmetic intensity stays ≈ bq FLOP/byte for
    bf16, as in dense flash attention: sparsity removes work, not intensity.
  * Expected speedup over dense (d = 1) flash attention: ≈ 1 / d when the per-tile work
    dominates the per-step overhead. TPU: a grid step costs ≈ 0.35 µs; a 512 × 512 × 128
    bf16 tile does 2·2·512²·128 = 134 MFLOP ≈ 0.7 µs at 197 TF/s, so tiles of 512 keep the
    realised speedup near 1 / d down to d ≈ 1/16 (rows whose count is below M still pay the
    empty steps' overhead: the grid is sized by the longest row). GPU: a program's loop
    trip is its row's own count, so skipped tiles cost nothing; with 64 × 64 tiles the
    loop overhead and the uneven rows (tail effects across SMs) bound the speedup below
    1 / d for d < 1/8 at short T.
  * Memory: the per-head lists in SMEM: 3 int32 per (example, head, tile row, entry)
    on TPU (B·Hs·nQk·Mk·12 bytes; at B = 1, Hs = 8, T = 32k with 512 tiles, ≈ 25 KB). SMEM
    is far smaller than VMEM: lists for large B·Hs·nQk·Mk may not fit (not measured here:
    no TPU); per-kv-head lists (Hs = K) or a split batch keep them small.

Limitations: first-order reverse mode only (the flash kernels' ``custom_vjp``); the list
block sizes must be multiples of the kernel tiles (TPU: bk a multiple of 128, bq of 8; GPU:
powers of two >= 16).
"""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _blocks


def _flash_module(backend: str):
  """The flash kernel module of ``backend`` (imported on use: each imports its backend)."""
  if backend == "tpu":
    from pallas_kernels import flash_tpu

    return flash_tpu
  if backend == "gpu":
    from pallas_kernels import flash_gpu

    return flash_gpu
  raise ValueError(f"backend must be 'tpu' or 'gpu'; got {backend!r}")


def _is_concrete(x) -> bool:
  return isinstance(x, np.ndarray) or not isinstance(x, jax.core.Tracer)


def check_lists(kv_count, kv_idx, kv_full, B, N, K, nQ, nK):
  for name, x in (("kv_count", kv_count), ("kv_idx", kv_idx)):
    if not hasattr(x, "shape") or not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} must be an integer array; got {type(x).__name__}")
  if kv_count.ndim != 3 or kv_idx.ndim != 4:
    raise ValueError(
      f"kv_count must be [B, Hs, nQ] and kv_idx [B, Hs, nQ, M]; got {kv_count.shape} and "
      f"{kv_idx.shape}"
    )
  Bl, Hs, rows = kv_count.shape
  if Bl != B or rows != nQ or kv_idx.shape[:3] != kv_count.shape:
    raise ValueError(
      f"kv_count [B, Hs, nQ] and kv_idx [B, Hs, nQ, M] need B={B}, nQ={nQ} (T in q blocks) "
      f"and the same leading dims; got {kv_count.shape} and {kv_idx.shape}"
    )
  if Hs not in (1, K, N):
    raise ValueError(f"the list head dim Hs must be 1, K={K} or N={N}; got {Hs}")
  if kv_full is not None:
    if not hasattr(kv_full, "shape") or kv_full.shape != kv_idx.shape:
      raise ValueError(
        f"kv_full must have kv_idx's shape {kv_idx.shape}; got {getattr(kv_full, 'shape', None)}"
      )
    if not (jnp.issubdtype(kv_full.dtype, jnp.integer) or kv_full.dtype == jnp.bool_):
      raise ValueError(f"kv_full must be a bool (or int) array; got {kv_full.dtype}")
  M = kv_idx.shape[-1]
  if not (_is_concrete(kv_count) and _is_concrete(kv_idx)):
    return
  count = np.asarray(kv_count)
  idx = np.asarray(kv_idx)
  bad = np.argwhere((count < 0) | (count > M))
  if bad.size:
    b, h, r = bad[0]
    raise ValueError(f"kv_count[{b}, {h}, {r}] = {count[b, h, r]} is outside [0, M={M}]")
  live = np.arange(M) < count[..., None]
  bad = np.argwhere(live & ((idx < 0) | (idx >= nK)))
  if bad.size:
    b, h, r, j = bad[0]
    raise ValueError(
      f"kv_idx[{b}, {h}, {r}, {j}] = {idx[b, h, r, j]} is not a kv block in [0, nK={nK})"
    )
  keyed = np.where(live, idx, -1 - np.arange(M))  # unused entries never collide
  keyed = np.sort(keyed, axis=-1)
  dup = np.argwhere((keyed[..., 1:] == keyed[..., :-1]).any(-1))
  if dup.size:
    b, h, r = dup[0]
    row = idx[b, h, r, : count[b, h, r]].tolist()
    raise ValueError(f"kv_idx row [{b}, {h}, {r}] lists a kv block twice: {row}")


def lists_to_kinds(kv_count, kv_idx, kv_full, num_kv_blocks: int, partial_default: bool):
  """int8 ``[B, Hs, nQ, nK]`` block map (EMPTY / PARTIAL / FULL) from the lists."""
  M = kv_idx.shape[-1]
  live = jnp.arange(M) < jnp.asarray(kv_count)[..., None]
  if kv_full is None:
    flag = jnp.full(kv_idx.shape, _blocks.PARTIAL if partial_default else _blocks.FULL, jnp.int8)
  else:
    flag = jnp.where(jnp.asarray(kv_full) != 0, _blocks.FULL, _blocks.PARTIAL).astype(jnp.int8)
  flag = jnp.where(live, flag, _blocks.EMPTY).astype(jnp.int8)
  idx = jnp.where(live, jnp.asarray(kv_idx, jnp.int32), num_kv_blocks)  # dead → dropped
  B, Hs, nQ = kv_idx.shape[:3]
  b, h, r = jnp.meshgrid(jnp.arange(B), jnp.arange(Hs), jnp.arange(nQ), indexing="ij")
  kinds = jnp.zeros((B, Hs, nQ, num_kv_blocks), jnp.int8)
  return kinds.at[b[..., None], h[..., None], r[..., None], idx].max(flag, mode="drop")


def dense_mask(kv_count, kv_idx, *, q_len: int, kv_len: int, block_size, causal=False):
  """The oracle's token mask bool ``[B, Hs, T, S]`` of the lists (kv_full does not change
  visibility: PARTIAL blocks only evaluate the predicate, which FULL blocks must satisfy)."""
  Lq, Lk = block_pair(block_size)
  nK = _blocks.num_blocks(kv_len, Lk)
  kinds = lists_to_kinds(kv_count, kv_idx, None, nK, partial_default=True)
  rows = jnp.arange(q_len) // Lq
  cols = jnp.arange(kv_len) // Lk
  visible = kinds[:, :, rows][:, :, :, cols] != _blocks.EMPTY
  if causal:
    visible = visible & (jnp.arange(q_len)[:, None] + kv_len - q_len >= jnp.arange(kv_len))
  return visible


def block_pair(block_size):
  if isinstance(block_size, int | np.integer) and not isinstance(block_size, bool):
    block_size = (int(block_size), int(block_size))
  if (
    not isinstance(block_size, tuple | list)
    or len(block_size) != 2
    or not all(isinstance(b, int | np.integer) and not isinstance(b, bool) for b in block_size)
    or min(block_size) <= 0
  ):
    raise ValueError(f"block_size must be a positive int or a pair (Lq, Lk); got {block_size!r}")
  return int(block_size[0]), int(block_size[1])


def _expand(kinds, rq: int, rk: int, nQt: int, nKt: int):
  """List-block kinds → kernel-tile kinds (each list block covers rq × rk tiles)."""
  if rq > 1:
    kinds = jnp.repeat(kinds, rq, axis=-2)
  if rk > 1:
    kinds = jnp.repeat(kinds, rk, axis=-1)
  return kinds[..., :nQt, :nKt]


def block_sparse_attention(
  q,
  k,
  v,
  kv_count,
  kv_idx,
  *,
  block_size,
  kv_full=None,
  causal: bool = False,
  mask_fn=None,
  q_operands=None,
  kv_operands=None,
  bias=None,
  sinks=None,
  scale=None,
  softcap=None,
  return_lse: bool = False,
  backend: str = "tpu",
  block_q=None,
  block_kv=None,
  interpret=False,
  debug_visits: bool = False,
):
  """Block-sparse flash attention (Pallas) over per-head run-time block lists.

  Args:
    q, k, v: ``[B, T, N, H]``, ``[B, S, K, H]``, ``[B, S, K, Hv]``; N % K == 0.
    kv_count, kv_idx, kv_full: the lists (see the module docstring), Hs in {1, K, N}.
    block_size: ``Lq`` or ``(Lq, Lk)``, the tokens of one list block along T and S.
    causal: also apply the token-level causal predicate (query t at position S − T + t sees
      keys <= its position) inside PARTIAL blocks. Blocks flagged FULL skip it, so flag only
      blocks that lie wholly in the past.
    mask_fn, q_operands, kv_operands: an extra in-tile predicate and its per-token operands
      (``pallas_kernels._blocks`` contract), ANDed with ``causal``.
    bias, sinks, scale, softcap: as in the flash kernels (dense bias ``[bB, bN, bT, bS]``).
    return_lse: also return lse ``[B, N, T]`` float32 (differentiable; -inf for rows that
      list nothing, whose output is 0).
    backend: "tpu" (``flash_tpu``, Mosaic) or "gpu" (``flash_gpu``, Triton).
    block_q, block_kv: kernel tiles; default the list blocks (Lq, Lk). They must divide the
      list blocks.
    interpret: run in Pallas interpret mode (TPU: True or ``pltpu.InterpretParams``).
    debug_visits: also return int32 ``[B, N, nQk]``, the tiles the forward kernel computed.

  Returns:
    out ``[B, T, N, Hv]``, then lse (if asked), then visits (if asked).
  """
  _flash_module(backend)  # validates backend before the other checks
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not hasattr(x, "shape") or x.ndim != 4:
      raise ValueError(f"{name} must be a 4-d array; got shape {getattr(x, 'shape', None)}")
  B, T, N, _ = q.shape
  S, K = k.shape[1], k.shape[2]
  if K == 0 or N % K:
    raise ValueError(f"query heads N={N} must be a multiple of kv heads K={K}")
  Lq, Lk = block_pair(block_size)
  nQ, nK = _blocks.num_blocks(T, Lq), _blocks.num_blocks(S, Lk)
  check_lists(kv_count, kv_idx, kv_full, B, N, K, nQ, nK)
  bq = Lq if block_q is None else block_q
  bk = Lk if block_kv is None else block_kv
  for name, tile, blk in (("block_q", bq, Lq), ("block_kv", bk, Lk)):
    if not isinstance(tile, int | np.integer) or isinstance(tile, bool) or tile <= 0 or blk % tile:
      raise ValueError(f"{name}={tile!r} must be a positive int dividing the list block {blk}")
  if mask_fn is not None and not callable(mask_fn):
    raise ValueError(f"mask_fn must be callable or None; got {type(mask_fn).__name__}")

  has_predicate = causal or mask_fn is not None
  kinds = lists_to_kinds(kv_count, kv_idx, kv_full, nK, partial_default=has_predicate)
  offset = S - T
  user_fn = mask_fn
  if causal:

    def token_mask(q_idx, kv_idx_, q_vals, kv_vals):
      visible = q_idx + offset >= kv_idx_
      if user_fn is not None:
        visible = visible & user_fn(q_idx, kv_idx_, q_vals, kv_vals)
      return visible

  else:
    token_mask = user_fn

  def block_kinds(tile_q, tile_kv):
    if Lq % tile_q or Lk % tile_kv:
      raise ValueError(
        f"the kernel chose tiles ({tile_q}, {tile_kv}) that do not divide the list blocks "
        f"({Lq}, {Lk}); pass block_q / block_kv dividing them"
      )
    nQt, nKt = _blocks.num_blocks(T, tile_q), _blocks.num_blocks(S, tile_kv)
    return _expand(kinds, Lq // tile_q, Lk // tile_kv, nQt, nKt)

  return _flash_module(backend).flash_attention(
    q,
    k,
    v,
    block_kinds=block_kinds,
    mask_fn=token_mask,
    q_operands=q_operands,
    kv_operands=kv_operands,
    bias=bias,
    sinks=sinks,
    scale=scale,
    softcap=softcap,
    return_lse=return_lse,
    block_q=int(bq),
    block_kv=int(bk),
    interpret=interpret,
    debug_visits=debug_visits,
  )


def pack_selection(selected):
  """bool ``[..., T, nK]`` → int32 ``[..., T, ceil(nK / 32)]``: bit i of word w is block
  32·w + i."""
  nK = selected.shape[-1]
  words = -(-nK // 32)
  sel = jnp.pad(
    selected.astype(jnp.uint32), [(0, 0)] * (selected.ndim - 1) + [(0, 32 * words - nK)]
  )
  sel = sel.reshape(*selected.shape[:-1], words, 32)
  packed = (sel << jnp.arange(32, dtype=jnp.uint32)).sum(-1, dtype=jnp.uint32)
  return jax.lax.bitcast_convert_type(packed, jnp.int32)


def selected_blocks_attention(
  q,
  k,
  v,
  selected,
  *,
  block_size: int,
  causal: bool = True,
  scale=None,
  return_lse: bool = False,
  backend: str = "tpu",
  block_q=None,
  interpret=False,
):
  """Attention where every (query token, head) sees its own selection of kv blocks.

  ``selected`` bool ``[B, Hs, T, nK]`` (Hs = K or N; e.g. MoBA's or NSA's per-token
  top-k blocks), kv blocks of ``block_size`` tokens. The kernel walks, per (head, q tile),
  the union of its queries' blocks (a block chosen by every query of the tile and wholly
  in the past is FULL: no mask arithmetic); inside a PARTIAL tile the predicate reads the
  query's selection, bit-packed as per-head q operands ``[B, Hs, T, ceil(nK / 32)]``, and
  (``causal``) the causal order. Unselected blocks are never loaded. Output equals softmax
  attention under the dense mask ``selected`` (repeated over each block's tokens) & causal.
  """
  B, T, N, _ = q.shape
  S, K = k.shape[1], k.shape[2]
  nK = _blocks.num_blocks(S, block_size)
  if selected.ndim != 4 or selected.shape[0] != B or selected.shape[2:] != (T, nK):
    raise ValueError(
      f"selected must be bool [B, Hs, T, nK] = [{B}, Hs, {T}, {nK}]; got {selected.shape}"
    )
  if selected.shape[1] not in (K, N):
    raise ValueError(f"selected's head dim must be K={K} or N={N}; got {selected.shape[1]}")
  offset = S - T

  def tile_kinds(bq):
    """Per (head, q tile of bq rows, kv block): EMPTY / PARTIAL (some query chose it) /
    FULL (every real query chose it and it lies wholly in the causal past)."""
    nQ = _blocks.num_blocks(T, bq)
    Tp = nQ * bq
    sel = jnp.pad(selected, ((0, 0), (0, 0), (0, Tp - T), (0, 0)))
    per_tile = sel.reshape(B, -1, nQ, bq, nK)
    union = per_tile.any(3)  # [B, Hs, nQ, nK]
    valid_q = (jnp.arange(Tp) < T).reshape(nQ, bq)
    everyone = (per_tile | ~valid_q[None, None, :, :, None]).all(3)
    if causal:
      q_first = jnp.arange(nQ) * bq + offset
      last_key = (jnp.arange(nK) + 1) * block_size - 1
      everyone = everyone & (last_key <= q_first[:, None]) & (last_key < S)
    kinds = jnp.where(union, _blocks.PARTIAL, _blocks.EMPTY)
    return jnp.where(union & everyone, _blocks.FULL, kinds).astype(jnp.int8)

  words = pack_selection(selected)  # [B, Hs, T, W]
  W = words.shape[-1]

  def token_mask(q_idx, kv_idx, q_vals, kv_vals):
    kb = jax.lax.div(kv_idx, jnp.int32(block_size))  # [1, bk]
    word = jax.lax.shift_right_logical(kb, jnp.int32(5))
    bit = jnp.bitwise_and(kb, jnp.int32(31))
    val = jnp.zeros((q_idx.shape[0], kv_idx.shape[1]), jnp.int32)
    for w in range(W):
      val = jnp.where(word == w, q_vals[w], val)
    visible = jnp.bitwise_and(jax.lax.shift_right_logical(val, bit), jnp.int32(1)) != 0
    if causal:
      visible = visible & (q_idx + offset >= kv_idx)
    return visible

  def block_kinds(tile_q, tile_kv):
    if block_size % tile_kv:
      raise ValueError(f"the kv tile {tile_kv} must divide the block {block_size}")
    kinds = tile_kinds(tile_q)
    return _expand(kinds, 1, block_size // tile_kv, kinds.shape[2], _blocks.num_blocks(S, tile_kv))

  kernel = _flash_module(backend)
  tile_kv = block_size
  if backend == "gpu":
    tile_kv = min(64, block_size & -block_size)  # the largest power-of-two divisor, <= 64
  return kernel.flash_attention(
    q,
    k,
    v,
    block_kinds=block_kinds,
    mask_fn=token_mask,
    q_operands=words,
    scale=scale,
    return_lse=return_lse,
    block_q=block_q,
    block_kv=int(tile_kv),
    interpret=interpret,
  )


def merge_branches(outs, lses):
  """Exact merge of attention branches over disjoint key sets from their (out, lse):
  ``out [B, T, N, Hv]`` each, ``lse [B, N, T]`` each (-inf for an empty row)."""
  lse = jnp.stack(lses)  # [R, B, N, T]
  top = jnp.max(lse, axis=0)
  top_safe = jnp.where(jnp.isfinite(top), top, 0.0)
  w = jnp.exp(lse - top_safe)  # 0 for empty branches
  total = w.sum(0)
  safe_total = jnp.where(total == 0, 1.0, total)
  w = w / safe_total
  out = sum(
    o.astype(jnp.float32) * jnp.moveaxis(w_r, 1, 2)[..., None]
    for o, w_r in zip(outs, w, strict=True)
  )
  merged_lse = jnp.where(total == 0, -jnp.inf, top_safe + jnp.log(safe_total))
  return out.astype(outs[0].dtype), merged_lse
