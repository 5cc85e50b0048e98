"""Flash attention for TPU as Pallas (Mosaic) kernels, with block skipping and a fused backward.

Dimension key: B batch, T query length, S key/value length, N query heads, K kv heads,
G = N // K query heads per kv head, H q/k head dim, Hv value head dim; Hp / Hvp head dims
padded to 128 lanes, Tp / Sp lengths padded to whole blocks; bq / bk tile sizes, nQ / nK block
counts, M (Mq) the longest compacted kv (q) block list; Bl = 1 (lists shared by the batch) or B,
Hl = 1 (lists shared by the heads), K (per kv head) or N (per query head).

How it works:
  * Layout. The wrapper moves heads before tokens (q ``[B, N, Tp, Hp]``, k ``[B, K, Sp, Hp]``,
    v ``[B, K, Sp, Hvp]``) so every tile is a lane-dense ``[rows, 128·k]`` slab. Head dims that
    are not a multiple of 128 are zero-padded (exact: zero columns add nothing to q·k and the
    padded output columns are dropped). T and S are padded to whole blocks; padded query rows
    are dropped, the padded kv tail is masked (``finalize_kinds`` makes the last kv block
    PARTIAL and PARTIAL tiles apply ``kv_idx < S``).
  * Forward: grid ``(B, N, nQ, M)``. The caller's block map is compacted per q block into the
    list of its non-empty kv blocks (``forward_lists``), passed by scalar prefetch (SMEM). The
    k / v / bias / kv-operand index maps read the list, so step j loads the j-th listed kv
    block; steps past the row's count repeat the last listed block (the pipeline issues no DMA
    for an unchanged block index) and are skipped with ``pl.when``. FULL tiles run a branch
    without any mask arithmetic; only PARTIAL tiles evaluate ``mask_fn`` (and ``kv_idx < S``).
    Online softmax in float32 VMEM scratch (running max m, sum l, accumulator acc); bf16
    inputs go to the MXU as bf16 with float32 accumulation (float32 inputs at HIGHEST
    precision). The last step adds the sink to the denominator and writes out = acc / l and
    lse = m + log l. Rows that see nothing give out 0 and lse -inf (lse = sink with sinks).
  * GQA / MQA: query head n reads kv head n // G in the index maps; k / v are never repeated.
  * Backward (``jax.custom_vjp``, residuals q, k, v, out, lse, bias, sinks): the wrapper
    computes delta = rowsum(dO·O) - dlse in plain jnp. Two kernels recompute the probabilities
    p = exp(s - lse) tile by tile:
      - dq kernel, grid ``(B, N, nQ, M)`` over the forward lists: dq accumulates ds·k in
        VMEM; with a bias it also writes ds (the logit gradient) tile by tile into a dense
        ``[B, N, Tp, Sp]`` float32 buffer aliased to a zero input, so tiles the kernel skips
        stay exactly zero (TPU outputs are not zero-initialised); rows with no tile zero the
        one block their (padded) list points at. The wrapper sums that buffer over the
        bias's broadcast axes.
      - dk/dv kernel, grid ``(B, K, nK, G·Mq)`` over the transposed lists
        (``transposed_lists``: per kv block the q blocks that see it). The innermost axis
        walks the G query heads of the kv head, each over its q-block list, so dk / dv for a
        kv head are summed over its G query heads inside the kernel (float32 scratch) and
        written once, ``[B, K, Sp, ·]``: no N-sized buffer and no reduction afterwards.
    Softcap multiplies ds by 1 - tanh²(raw / c). d sink_n = -Σ_{b,t} exp(sink_n - lse)·delta
    is computed outside the kernels. Fully masked rows have lse = -inf, replaced by 0 in the
    backward (their logits are all -inf, so p = 0): finite, zero gradients.
  * Differentiation: first-order reverse mode (grad / vjp) of q, k, v, bias, sinks and the
    lse output. Forward mode and higher orders are not defined (custom_vjp).
  * ``debug_visits=True`` also returns int32 ``[B, N, nQ]``: the kv tiles the forward kernel
    actually computed (counted inside the ``pl.when`` branches). That call is forward-only
    (it bypasses the custom_vjp).

Costs (per call, H = Hv; causal with T = S visits about half the tiles, so halve the
T·S terms; exactly, the visited fraction is (nQ + 1) / (2·nQ) for nQ = nK):
  * FLOPs (2 per multiply-add): forward 4·B·N·T·S·H (q·kᵀ and p·v). Backward 14·B·N·T·S·H:
    7 matmuls, because q·kᵀ and dO·vᵀ are recomputed in both backward kernels (dq kernel:
    q·kᵀ, dO·vᵀ, ds·k; dk/dv kernel: q·kᵀ, pᵀ·dO, dO·vᵀ, dsᵀ·q) against the 5 of a
    single-pass backward. fwd+bwd = 18·B·N·T·S·H. The exp count is B·N·T·S per pass (3
    passes). With the head dim padded to Hp the MXU does Hp-sized work: H = 64 → Hp = 128
    doubles every matmul's FLOPs (the exp/VPU work per tile is unchanged).
  * HBM bytes (element size e; 2 for bf16): the forward reads q and writes out once
    (2·B·N·T·Hp·e) and, per q block, re-reads the listed k and v blocks:
    ≈ 2·B·N·T·S·Hp·e / bq (k/v are re-read per query head; GQA saves no HBM traffic here),
    plus lse. Arithmetic intensity ≈ 4·T·S·Hp / (2·T·S·Hp·e / bq) = 2·bq / e FLOP/byte = bq
    for bf16. The backward re-streams k/v per q block (dq kernel) and q/dO per kv block
    (dk/dv kernel): ≈ 2·(2·B·N·T·S·Hp·e / b) for block b, plus q, k, v, out, dO, dq, dk, dv
    once each.
  * Roofline on a TPU v5e (197 TF/s bf16, 819 GB/s HBM; ridge ≈ 240 FLOP/byte), causal,
    B = 1, N = 8, H = 64 run at Hp = 128, bf16, bq = bk = 512 (intensity ≈ 512: compute
    bound except at the smallest T). Useful FLOPs at H = 64 → time at 197 TF/s, and in
    parentheses the MXU time actually spent at Hp = 128:
      T = 1k:  fwd 1.07 GF → 5.5 µs (10.9 µs);  fwd+bwd 4.83 GF → 24.5 µs (49 µs)
      T = 2k:  fwd 4.29 GF → 22 µs (44 µs);     fwd+bwd 19.3 GF → 98 µs (196 µs)
      T = 4k:  fwd 17.2 GF → 87 µs (174 µs);    fwd+bwd 77.3 GF → 392 µs (785 µs)
      T = 8k:  fwd 68.7 GF → 349 µs (698 µs);   fwd+bwd 309 GF → 1.57 ms (3.14 ms)
      T = 16k: fwd 275 GF → 1.40 ms (2.79 ms);  fwd+bwd 1.24 TF → 6.3 ms (12.6 ms)
    Forward HBM at Hp = 128: 8.4 MB (10 µs) at T = 1k, 84 MB (102 µs) at 4k, 1.14 GB
    (1.39 ms) at 16k: below the Hp = 128 compute time except at T = 1k, where the two are
    about equal (≈ 11 µs). Padding H = 64 to 128 therefore costs 2x in MXU time and 2x in
    q/k/v/out bytes; at small T the per-grid-step overhead (~0.35 µs) and the exp on the
    EUP matter as much.

Memory notes: lse / delta travel as ``[B, N, Tp, 1]`` float32 columns (their HBM tiles may be
lane-padded, like the 128-lane l/m of jax's own flash kernel); the bias gradient needs a dense
``[B, N, Tp, Sp]`` float32 buffer during the backward whatever the bias's broadcast shape.

Kernel API shared with ``flash_gpu.py``; the mask contract is ``_blocks.py``'s.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _blocks

LANES = 128
SUBLANES = 8
DEFAULT_MAX_BLOCK = 512
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


class _Config(NamedTuple):
  """Static facts of one call (a custom_vjp nondiff argument)."""

  T: int
  S: int
  N: int
  K: int
  H: int
  Hv: int
  bq: int
  bk: int
  nQ: int
  nK: int
  M: int  # forward list width
  Mq: int  # transposed list width
  batched: int  # 1 when the lists have a batch dim B, 0 when shared
  heads: int  # list heads Hl: 1 (shared by the heads), K (per kv head) or N (per query head)
  scale: float
  softcap: float | None
  bias_shape: tuple[int, int, int, int] | None  # the caller's (bB, bN, bT, bS)
  has_sinks: bool
  mask_fn: Any
  n_q_ops: int
  q_ops_heads: int  # 1 (q operands shared by the heads), K or N (per kv / query head)
  n_kv_ops: int
  interpret: Any


def flash_attention(
  q,
  k,
  v,
  *,
  block_kinds=None,
  mask_fn=None,
  q_operands=None,
  kv_operands=None,
  bias=None,
  sinks=None,
  scale=None,
  softcap=None,
  return_lse=False,
  block_q=None,
  block_kv=None,
  interpret=False,
  debug_visits=False,
):
  """Flash attention on TPU (Pallas / Mosaic).

  Args:
    q, k, v: ``[B, T, N, H]``, ``[B, S, K, H]``, ``[B, S, K, Hv]``, one float dtype
      (float32 or bfloat16); N % K == 0 (query head n reads kv head n // (N // K)).
    block_kinds, mask_fn, q_operands, kv_operands: the mask, as in ``_blocks.py``
      (``block_kinds(bq, bk)`` → int8 ``[nQ, nK]``, ``[B, nQ, nK]`` or ``[B, Hs, nQ, nK]``
      with Hs = K or N for a list per kv / query head; None = every tile
      FULL, or every tile PARTIAL when a ``mask_fn`` is given, so a predicate is never
      silently ignored; ``mask_fn`` is evaluated on PARTIAL tiles only). ``q_operands`` may
      be per head, ``[B, Hq, T, Cq]`` with Hq = K or N: query head n's predicate then reads
      the columns of its kv head n // G (Hq = K) or its own (Hq = N).
    bias: dense float ``[bB, bN, bT, bS]`` added to the logits after the softcap, each dim 1
      or full (B, N, T, S); differentiable (gradient summed over the broadcast dims).
    sinks: per-head sink logits ``[N]`` (denominator only); differentiable.
    scale: logit scale (a static number), default 1/sqrt(H) of the unpadded H.
    softcap: c in c·tanh(s/c) (a static number), or None.
    return_lse: also return the log-sum-exp ``[B, N, T]`` float32 (differentiable).
    block_q: q tile, a multiple of 8; default min(512, T rounded up to 128) (to 8 when
      T < 128). block_kv: kv tile, a multiple of 128; default min(512, S rounded up to 128).
    interpret: False on TPU; True or a ``pltpu.InterpretParams`` to run every pallas_call of
      the forward and backward in (TPU) interpret mode.
    debug_visits: also return int32 ``[B, N, nQ]``, the kv tiles the forward kernel computed
      per (example, head, q block). Forward only (not differentiable).

  Returns:
    out ``[B, T, N, Hv]`` in q's dtype; then lse when ``return_lse``; then the visit counts
    when ``debug_visits``.
  """
  B, T, N, H, S, K, Hv = _check_qkv(q, k, v)
  bq, bk = _block_sizes(T, S, block_q, block_kv)
  nQ, nK = _blocks.num_blocks(T, bq), _blocks.num_blocks(S, bk)
  Tp, Sp = nQ * bq, nK * bk
  bias_shape = _check_bias(bias, (B, N, T, S))
  if sinks is not None:
    if not hasattr(sinks, "shape") or tuple(sinks.shape) != (N,):
      raise ValueError(f"sinks must have shape [N]=({N},); got {getattr(sinks, 'shape', sinks)}")
    if not jnp.issubdtype(sinks.dtype, jnp.floating):
      raise ValueError(f"sinks must be a float array; got {sinks.dtype}")
  if softcap is not None and not softcap > 0:
    raise ValueError(f"softcap must be a positive number; got {softcap!r}")
  if scale is None:
    scale = 1.0 / float(np.sqrt(H))
  q_ops = _check_operands("q_operands", q_operands, (B, T), axis=1, heads=(N, K))
  kv_ops = _check_operands("kv_operands", kv_operands, (B, S), axis=2)
  if block_kinds is None:
    # No block map: every tile FULL, or PARTIAL when there is a predicate to evaluate.
    kinds = np.full((nQ, nK), _blocks.FULL if mask_fn is None else _blocks.PARTIAL, np.int8)
  else:
    kinds = block_kinds(bq, bk)
    if kinds is None or tuple(kinds.shape[-2:]) != (nQ, nK) or kinds.ndim not in (2, 3, 4):
      raise ValueError(
        f"block_kinds({bq}, {bk}) must return [nQ, nK]=({nQ}, {nK}), [B, nQ, nK] or "
        f"[B, Hs, nQ, nK]; got {None if kinds is None else kinds.shape}"
      )
  kinds = _blocks.finalize_kinds(kinds, B, S, bk, heads=(N, K))
  f_count, f_index, f_full = (jnp.asarray(a, jnp.int32) for a in _blocks.forward_lists(kinds))
  t_count, t_index, t_full = (jnp.asarray(a, jnp.int32) for a in _blocks.transposed_lists(kinds))
  cfg = _Config(
    T=T,
    S=S,
    N=N,
    K=K,
    H=H,
    Hv=Hv,
    bq=bq,
    bk=bk,
    nQ=nQ,
    nK=nK,
    M=int(f_index.shape[-1]),
    Mq=int(t_index.shape[-1]),
    batched=int(kinds.shape[0] != 1),
    heads=int(kinds.shape[1]),
    scale=float(scale),
    softcap=None if softcap is None else float(softcap),
    bias_shape=bias_shape,
    has_sinks=sinks is not None,
    mask_fn=mask_fn,
    n_q_ops=0 if q_ops is None else q_ops.shape[-1],
    q_ops_heads=1 if q_ops is None or q_ops.ndim == 3 else q_ops.shape[1],
    n_kv_ops=0 if kv_ops is None else kv_ops.shape[1],
    interpret=interpret,
  )
  Hp, Hvp = _blocks.round_up(H, LANES), _blocks.round_up(Hv, LANES)
  q_BNTH = _pad2(q.transpose(0, 2, 1, 3), Tp, Hp)
  k_BKSH = _pad2(k.transpose(0, 2, 1, 3), Sp, Hp)
  v_BKSV = _pad2(v.transpose(0, 2, 1, 3), Sp, Hvp)
  if bias is not None:
    bB, bN, bT, bS = bias_shape
    if bias.dtype.itemsize > 4:  # float64 (x64): the TPU has no 64-bit vector math
      bias = bias.astype(jnp.float32)
    bias = _blocks.pad_axis(_blocks.pad_axis(bias, 2, Tp if bT > 1 else 1), 3, Sp if bS > 1 else 1)
  # Per-token operands as [B, C, Tp, 1] columns and [B, C, 1, Sp] rows: one leading index
  # gives the kernel a [bq, 1] / [1, bk] value.
  if q_ops is not None:  # [B, (Hq,) T, C] → [B, Hq·C, Tp, 1]: head hq's columns at hq·C
    q_ops = q_ops.astype(jnp.int32)
    q_ops = q_ops[:, None] if q_ops.ndim == 3 else q_ops
    q_ops = _blocks.pad_axis(q_ops, 2, Tp).transpose(0, 1, 3, 2)
    q_ops = q_ops.reshape(B, -1, Tp)[..., None]
  if kv_ops is not None:
    kv_ops = _blocks.pad_axis(kv_ops.astype(jnp.int32), 2, Sp)[:, :, None, :]
  lists = (f_count.reshape(-1), f_index.reshape(-1), f_full.reshape(-1))
  t_lists = (t_count.reshape(-1), t_index.reshape(-1), t_full.reshape(-1))

  if debug_visits:
    out, lse, visits = _forward(
      cfg, q_BNTH, k_BKSH, v_BKSV, bias, sinks, q_ops, kv_ops, lists, debug_visits=True
    )
  else:
    out, lse = _flash(cfg, q_BNTH, k_BKSH, v_BKSV, bias, sinks, q_ops, kv_ops, lists, t_lists)
  out = out[:, :, :T, :Hv].transpose(0, 2, 1, 3)
  result = (out,)
  if return_lse:
    result += (lse[:, :, :T, 0],)
  if debug_visits:
    result += (visits[:, :, ::SUBLANES, 0],)
  return result[0] if len(result) == 1 else result


# ---------------------------------------------------------------------------------------
# Validation and wrapper helpers.
# ---------------------------------------------------------------------------------------

_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _check_qkv(q, k, v):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not hasattr(x, "shape") or x.ndim != 4:
      raise ValueError(f"{name} must be a 4-d array; got shape {getattr(x, 'shape', None)}")
    if x.dtype not in _DTYPES:
      raise ValueError(f"{name} must be float32 or bfloat16; got {x.dtype}")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
  B, T, N, H = q.shape
  Bk, S, K, Hk = k.shape
  if Bk != B or k.shape[:3] != v.shape[:3]:
    raise ValueError(
      f"k [B, S, K, H] and v [B, S, K, Hv] must share B, S, K with q [B, T, N, H]; got "
      f"q {q.shape}, k {k.shape}, v {v.shape}"
    )
  if Hk != H:
    raise ValueError(f"q and k must share the head dim H; got q {q.shape}, k {k.shape}")
  if min(T, S, N, K, H, v.shape[3]) == 0:
    raise ValueError(f"empty dimension in q {q.shape}, k {k.shape}, v {v.shape}")
  if N % K:
    raise ValueError(f"query heads N={N} must be a multiple of kv heads K={K}")
  return B, T, N, H, S, K, v.shape[3]


def _block_sizes(T, S, block_q, block_kv):
  if block_q is None:
    block_q = min(DEFAULT_MAX_BLOCK, _blocks.round_up(T, LANES if T >= LANES else SUBLANES))
  if block_kv is None:
    block_kv = min(DEFAULT_MAX_BLOCK, _blocks.round_up(S, LANES))
  for name, value, mult in (("block_q", block_q, SUBLANES), ("block_kv", block_kv, LANES)):
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
      raise ValueError(f"{name} must be a positive int; got {value!r}")
    if value % mult:
      raise ValueError(f"{name} must be a multiple of {mult} (the TPU tile); got {value}")
  return int(block_q), int(block_kv)


def _check_bias(bias, full):
  if bias is None:
    return None
  if not hasattr(bias, "shape") or bias.ndim != 4:
    raise ValueError(
      f"bias must be a dense 4-d [bB, bN, bT, bS] array; got {getattr(bias, 'shape', bias)!r}"
    )
  if not jnp.issubdtype(bias.dtype, jnp.floating):
    raise ValueError(f"bias must be a float array; got {bias.dtype}")
  for size, want in zip(bias.shape, full, strict=True):
    if size not in (1, want):
      raise ValueError(
        f"bias dims must each be 1 or the full size [B, N, T, S]={list(full)}; got "
        f"{tuple(bias.shape)}"
      )
  return tuple(int(d) for d in bias.shape)


def _check_operands(name, ops, lead, axis, heads=None):
  """``[B, T, Cq]`` / ``[B, Ck, S]``; q operands may also be per head ``[B, Hq, T, Cq]``
  with Hq in (1, K, N) (``heads = (N, K)``)."""
  if ops is None:
    return None
  want = "[B, T, Cq]" if axis == 1 else "[B, Ck, S]"
  if heads is not None and hasattr(ops, "shape") and ops.ndim == 4:
    if ops.shape[1] not in (1, *heads):
      raise ValueError(
        f"{name} per head must be [B, Hq, T, Cq] with Hq = 1, K or N {(1, *heads)}; got {ops.shape}"
      )
    axis = 2
    want = "[B, Hq, T, Cq]"
  elif not hasattr(ops, "shape") or ops.ndim != 3:
    raise ValueError(f"{name} must be a 3-d int32 {want} array; got {getattr(ops, 'shape', ops)}")
  if not jnp.issubdtype(ops.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array; got {ops.dtype}")
  if ops.shape[0] != lead[0] or ops.shape[axis] != lead[1]:
    raise ValueError(f"{name} must have shape {want} with (B, len)={lead}; got {ops.shape}")
  return ops


def _pad2(x, rows, cols):
  return _blocks.pad_axis(_blocks.pad_axis(x, 2, rows), 3, cols)


def _compiler_params():
  # The list axis carries the accumulators; the other three may be split across cores.
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _dot(a, b, dims):
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


# ---------------------------------------------------------------------------------------
# In-kernel tile math shared by the three kernels.
# ---------------------------------------------------------------------------------------


def _tile_logits(cfg, q, k, bias_ref):
  """(raw scale·q·kᵀ, logits after softcap and bias), float32 [bq, bk]."""
  raw = _dot(q, k, _NT) * cfg.scale
  s = raw
  if cfg.softcap is not None:
    s = cfg.softcap * jnp.tanh(raw / cfg.softcap)
  if bias_ref is not None:
    s = s + bias_ref[...].astype(jnp.float32)
  return raw, s


def _apply_mask(cfg, s, qb, kb, q_ops_ref, kv_ops_ref):
  """PARTIAL tile: sets invisible logits (mask_fn false, or the padded kv tail) to -inf."""
  bq, bk = cfg.bq, cfg.bk
  q_idx = qb * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  kv_idx = kb * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
  visible = None
  if cfg.S % bk:  # a full-tile iota: no boolean broadcast needed
    visible = kb * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1) < cfg.S
  if cfg.mask_fn is not None:
    q_vals = tuple(q_ops_ref[c] for c in range(cfg.n_q_ops))
    kv_vals = tuple(kv_ops_ref[c] for c in range(cfg.n_kv_ops))
    fn = cfg.mask_fn(q_idx, kv_idx, q_vals, kv_vals)
    visible = fn if visible is None else visible & fn
  if visible is None:
    return s
  return jnp.where(visible, s, -jnp.inf)


def _unpack(refs, flags):
  """Splits ``refs`` into a list matching ``flags`` (None where a flag is False)."""
  it = iter(refs)
  out = [next(it) if flag else None for flag in flags]
  return out, list(it)


def _head_row(cfg, n, heads):
  """Row of query head n in an array with ``heads`` = 1 (shared), K or N head rows."""
  if heads == cfg.N:
    return n
  if heads == 1:
    return jnp.int32(0)
  return lax.div(n, jnp.int32(cfg.N // cfg.K))


def _list_head(cfg, n):
  """The list head of query head n (lists shared, per kv head or per query head)."""
  return _head_row(cfg, n, cfg.heads)


def _list_pos(cfg, b, n, row, j, width, rows):
  """Flat position of entry j of list ``row`` for example b and query head n."""
  return (((b * cfg.batched) * cfg.heads + _list_head(cfg, n)) * rows + row) * width + j


# ---------------------------------------------------------------------------------------
# Forward kernel.
# ---------------------------------------------------------------------------------------


def _fwd_kernel(cfg, debug_visits, count_ref, index_ref, full_ref, *refs):
  has_bias = cfg.bias_shape is not None
  (q_ref, k_ref, v_ref, bias_ref, qo_ref, ko_ref, sink_ref), rest = _unpack(
    refs, (True, True, True, has_bias, cfg.n_q_ops > 0, cfg.n_kv_ops > 0, cfg.has_sinks)
  )
  o_ref, lse_ref = rest[:2]
  rest = rest[2:]
  visits_ref = rest.pop(0) if debug_visits else None
  m_scr, l_scr, acc_scr = rest[:3]
  nvis_scr = rest[3] if debug_visits else None

  b, n, qb, j = (pl.program_id(a) for a in range(4))
  pos = _list_pos(cfg, b, n, qb, j, cfg.M, cfg.nQ)
  count = count_ref[_list_pos(cfg, b, n, qb, 0, 1, cfg.nQ)]

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)
    if debug_visits:
      nvis_scr[0] = jnp.int32(0)

  def tile(masked):
    kb = index_ref[pos]
    q = q_ref[...]
    v = v_ref[...]
    _, s = _tile_logits(cfg, q, k_ref[...], bias_ref)
    if masked:
      s = _apply_mask(cfg, s, qb, kb, qo_ref, ko_ref)
    m_prev = m_scr[...]
    m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # all -inf so far: exp(-inf) = 0
    p = jnp.exp(s - m_safe)
    corr = jnp.exp(m_prev - m_safe)
    l_scr[...] = corr * l_scr[...] + p.sum(axis=1, keepdims=True)
    acc_scr[...] = corr * acc_scr[...] + _dot(p.astype(v.dtype), v, _NN)
    m_scr[...] = m_new
    if debug_visits:
      nvis_scr[0] = nvis_scr[0] + 1

  live = j < count
  is_full = full_ref[pos] != 0
  pl.when(live & is_full)(lambda: tile(masked=False))
  pl.when(live & jnp.logical_not(is_full))(lambda: tile(masked=True))

  @pl.when(j == cfg.M - 1)
  def _finish():
    m, l_sum, acc = m_scr[...], l_scr[...], acc_scr[...]
    if cfg.has_sinks:
      sink = jnp.full(m.shape, sink_ref[n], jnp.float32)
      m_fin = jnp.maximum(m, sink)
      corr = jnp.exp(m - m_fin)
      l_sum = corr * l_sum + jnp.exp(sink - m_fin)
      acc = corr * acc
      m = m_fin
    empty = l_sum == 0.0
    safe_l = jnp.where(empty, 1.0, l_sum)
    o_ref[...] = (acc / safe_l).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(safe_l))
    if debug_visits:
      visits_ref[...] = jnp.full(visits_ref.shape, nvis_scr[0], jnp.int32)


def _fwd_index_maps(cfg):
  """Index maps of the (B, N, nQ, M) grid; kv-side maps read the compacted lists."""
  G = cfg.N // cfg.K

  def kv_block(b, n, qb, j, index_ref):
    return index_ref[_list_pos(cfg, b, n, qb, j, cfg.M, cfg.nQ)]

  def q_map(b, n, qb, j, *_):
    return (b, n, qb, 0)

  def kv_map(b, n, qb, j, count_ref, index_ref, full_ref):
    return (b, lax.div(n, jnp.int32(G)), kv_block(b, n, qb, j, index_ref), 0)

  def bias_map(b, n, qb, j, count_ref, index_ref, full_ref):
    bB, bN, bT, bS = cfg.bias_shape
    kb = kv_block(b, n, qb, j, index_ref)
    return (b if bB > 1 else 0, n if bN > 1 else 0, qb if bT > 1 else 0, kb if bS > 1 else 0)

  def q_ops_map(b, n, qb, j, *_):
    return (b, _head_row(cfg, n, cfg.q_ops_heads), qb, 0)

  def kv_ops_map(b, n, qb, j, count_ref, index_ref, full_ref):
    return (b, 0, 0, kv_block(b, n, qb, j, index_ref))

  return q_map, kv_map, bias_map, q_ops_map, kv_ops_map


def _bias_block(cfg):
  _, _, bT, bS = cfg.bias_shape
  return (pl.squeezed, pl.squeezed, cfg.bq if bT > 1 else 1, cfg.bk if bS > 1 else 1)


def _forward(cfg, q, k, v, bias, sinks, q_ops, kv_ops, lists, debug_visits=False):
  """Runs the forward kernel: out [B, N, Tp, Hvp], lse [B, N, Tp, 1] (+ visits)."""
  B, N, Tp, Hp = q.shape
  Hvp = v.shape[-1]
  bq, bk = cfg.bq, cfg.bk
  sq = pl.squeezed
  q_map, kv_map, bias_map, q_ops_map, kv_ops_map = _fwd_index_maps(cfg)
  in_specs = [
    pl.BlockSpec((sq, sq, bq, Hp), q_map),
    pl.BlockSpec((sq, sq, bk, Hp), kv_map),
    pl.BlockSpec((sq, sq, bk, Hvp), kv_map),
  ]
  args = [q, k, v]
  if bias is not None:
    in_specs.append(pl.BlockSpec(_bias_block(cfg), bias_map))
    args.append(bias)
  if q_ops is not None:
    in_specs.append(pl.BlockSpec((sq, cfg.n_q_ops, bq, 1), q_ops_map))
    args.append(q_ops)
  if kv_ops is not None:
    in_specs.append(pl.BlockSpec((sq, cfg.n_kv_ops, 1, bk), kv_ops_map))
    args.append(kv_ops)
  if sinks is not None:
    in_specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
    args.append(sinks.astype(jnp.float32))
  out_specs = [
    pl.BlockSpec((sq, sq, bq, Hvp), q_map),
    pl.BlockSpec((sq, sq, bq, 1), q_map),
  ]
  out_shape = [
    jax.ShapeDtypeStruct((B, N, Tp, Hvp), q.dtype),
    jax.ShapeDtypeStruct((B, N, Tp, 1), jnp.float32),
  ]
  scratch = [
    pltpu.VMEM((bq, 1), jnp.float32),
    pltpu.VMEM((bq, 1), jnp.float32),
    pltpu.VMEM((bq, Hvp), jnp.float32),
  ]
  if debug_visits:
    out_specs.append(pl.BlockSpec((sq, sq, SUBLANES, LANES), q_map))
    out_shape.append(jax.ShapeDtypeStruct((B, N, cfg.nQ * SUBLANES, LANES), jnp.int32))
    scratch.append(pltpu.SMEM((1,), jnp.int32))
  return pl.pallas_call(
    functools.partial(_fwd_kernel, cfg, debug_visits),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(B, N, cfg.nQ, cfg.M),
      in_specs=in_specs,
      out_specs=out_specs,
      scratch_shapes=scratch,
    ),
    out_shape=out_shape,
    compiler_params=_compiler_params(),
    interpret=cfg.interpret,
    name="flash_tpu_fwd",
  )(*lists, *args)


# ---------------------------------------------------------------------------------------
# Backward kernels.
# ---------------------------------------------------------------------------------------


def _dq_kernel(cfg, count_ref, index_ref, full_ref, *refs):
  has_bias = cfg.bias_shape is not None
  (q_ref, k_ref, v_ref, bias_ref, qo_ref, ko_ref), rest = _unpack(
    refs, (True, True, True, has_bias, cfg.n_q_ops > 0, cfg.n_kv_ops > 0)
  )
  lse_ref, delta_ref, do_ref = rest[:3]
  rest = rest[3:]
  if has_bias:
    _zeros_hbm, dq_ref, ds_ref, dq_scr = rest
  else:
    dq_ref, dq_scr = rest
    ds_ref = None

  b, n, qb, j = (pl.program_id(a) for a in range(4))
  pos = _list_pos(cfg, b, n, qb, j, cfg.M, cfg.nQ)
  count = count_ref[_list_pos(cfg, b, n, qb, 0, 1, cfg.nQ)]

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)
    if ds_ref is not None:
      # A row with no tile still maps (and writes back) one bias-gradient block: zero it.
      @pl.when(count == 0)
      def _():
        ds_ref[...] = jnp.zeros(ds_ref.shape, ds_ref.dtype)

  def tile(masked):
    kb = index_ref[pos]
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    raw, s = _tile_logits(cfg, q, k, bias_ref)
    if masked:
      s = _apply_mask(cfg, s, qb, kb, qo_ref, ko_ref)
    p = jnp.exp(s - lse_ref[...])
    dp = _dot(do_ref[...], v, _NT)
    ds = p * (dp - delta_ref[...])
    if ds_ref is not None:
      ds_ref[...] = ds.astype(ds_ref.dtype)
    if cfg.softcap is not None:
      t = jnp.tanh(raw / cfg.softcap)
      ds = ds * (1.0 - t * t)
    ds = ds * cfg.scale
    dq_scr[...] += _dot(ds.astype(k.dtype), k, _NN)

  live = j < count
  is_full = full_ref[pos] != 0
  pl.when(live & is_full)(lambda: tile(masked=False))
  pl.when(live & jnp.logical_not(is_full))(lambda: tile(masked=True))

  @pl.when(j == cfg.M - 1)
  def _finish():
    dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _dkdv_kernel(cfg, count_ref, index_ref, full_ref, *refs):
  has_bias = cfg.bias_shape is not None
  (q_ref, k_ref, v_ref, bias_ref, qo_ref, ko_ref), rest = _unpack(
    refs, (True, True, True, has_bias, cfg.n_q_ops > 0, cfg.n_kv_ops > 0)
  )
  lse_ref, delta_ref, do_ref, dk_ref, dv_ref, dk_scr, dv_scr = rest

  b, kh, kb, t = (pl.program_id(a) for a in range(4))
  j = lax.rem(t, jnp.int32(cfg.Mq))
  n = kh * (cfg.N // cfg.K) + lax.div(t, jnp.int32(cfg.Mq))
  pos = _list_pos(cfg, b, n, kb, j, cfg.Mq, cfg.nK)
  count = count_ref[_list_pos(cfg, b, n, kb, 0, 1, cfg.nK)]

  @pl.when(t == 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  def tile(masked):
    qb = index_ref[pos]
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    raw, s = _tile_logits(cfg, q, k, bias_ref)
    if masked:
      s = _apply_mask(cfg, s, qb, kb, qo_ref, ko_ref)
    p = jnp.exp(s - lse_ref[...])  # [bq, bk]
    dv_scr[...] += _dot(p.astype(do.dtype).T, do, _NN)
    dp = _dot(do, v, _NT)
    ds = p * (dp - delta_ref[...])
    if cfg.softcap is not None:
      th = jnp.tanh(raw / cfg.softcap)
      ds = ds * (1.0 - th * th)
    ds = ds * cfg.scale
    dk_scr[...] += _dot(ds.astype(q.dtype).T, q, _NN)

  live = j < count
  is_full = full_ref[pos] != 0
  pl.when(live & is_full)(lambda: tile(masked=False))
  pl.when(live & jnp.logical_not(is_full))(lambda: tile(masked=True))

  @pl.when(t == (cfg.N // cfg.K) * cfg.Mq - 1)
  def _finish():
    dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _backward_kernels(cfg, q, k, v, bias, q_ops, kv_ops, lists, t_lists, lse, delta, do):
  """dq [B, N, Tp, Hp], dk [B, K, Sp, Hp], dv [B, K, Sp, Hvp], ds [B, N, Tp, Sp] or None."""
  B, N, Tp, Hp = q.shape
  K, Sp = k.shape[1], k.shape[2]
  Hvp = v.shape[-1]
  bq, bk = cfg.bq, cfg.bk
  G = N // K
  sq = pl.squeezed

  # dq (and the logit gradient for a bias): the forward's grid and lists.
  q_map, kv_map, bias_map, q_ops_map, kv_ops_map = _fwd_index_maps(cfg)
  in_specs = [
    pl.BlockSpec((sq, sq, bq, Hp), q_map),
    pl.BlockSpec((sq, sq, bk, Hp), kv_map),
    pl.BlockSpec((sq, sq, bk, Hvp), kv_map),
  ]
  args = [q, k, v]
  if bias is not None:
    in_specs.append(pl.BlockSpec(_bias_block(cfg), bias_map))
    args.append(bias)
  if q_ops is not None:
    in_specs.append(pl.BlockSpec((sq, cfg.n_q_ops, bq, 1), q_ops_map))
    args.append(q_ops)
  if kv_ops is not None:
    in_specs.append(pl.BlockSpec((sq, cfg.n_kv_ops, 1, bk), kv_ops_map))
    args.append(kv_ops)
  in_specs += [
    pl.BlockSpec((sq, sq, bq, 1), q_map),
    pl.BlockSpec((sq, sq, bq, 1), q_map),
    pl.BlockSpec((sq, sq, bq, Hvp), q_map),
  ]
  args += [lse, delta, do]
  out_specs = [pl.BlockSpec((sq, sq, bq, Hp), q_map)]
  out_shape = [jax.ShapeDtypeStruct((B, N, Tp, Hp), q.dtype)]
  aliases = {}
  if bias is not None:

    def ds_map(b, n, qb, j, count_ref, index_ref, full_ref):
      return (b, n, qb, index_ref[_list_pos(cfg, b, n, qb, j, cfg.M, cfg.nQ)])

    aliases = {3 + len(args): 1}  # the zero buffer (after the 3 prefetch lists) → ds
    in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
    args.append(jnp.zeros((B, N, Tp, Sp), jnp.float32))
    out_specs.append(pl.BlockSpec((sq, sq, bq, bk), ds_map))
    out_shape.append(jax.ShapeDtypeStruct((B, N, Tp, Sp), jnp.float32))
  results = pl.pallas_call(
    functools.partial(_dq_kernel, cfg),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(B, N, cfg.nQ, cfg.M),
      in_specs=in_specs,
      out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM((bq, Hp), jnp.float32)],
    ),
    out_shape=out_shape,
    input_output_aliases=aliases,
    compiler_params=_compiler_params(),
    interpret=cfg.interpret,
    name="flash_tpu_dq",
  )(*lists, *args)
  dq = results[0]
  ds = results[1] if bias is not None else None

  # dk / dv: per kv block, the G query heads × its q-block list on the innermost axis.
  Mq = cfg.Mq

  def q_block(b, kh, kb, t, index_ref):
    n = kh * G + lax.div(t, jnp.int32(Mq))
    return index_ref[_list_pos(cfg, b, n, kb, lax.rem(t, jnp.int32(Mq)), Mq, cfg.nK)]

  def tq_map(b, kh, kb, t, count_ref, index_ref, full_ref):
    return (b, kh * G + lax.div(t, jnp.int32(Mq)), q_block(b, kh, kb, t, index_ref), 0)

  def tkv_map(b, kh, kb, t, *_):
    return (b, kh, kb, 0)

  def tbias_map(b, kh, kb, t, count_ref, index_ref, full_ref):
    bB, bN, bT, bS = cfg.bias_shape
    qb = q_block(b, kh, kb, t, index_ref)
    n = kh * G + lax.div(t, jnp.int32(Mq))
    return (b if bB > 1 else 0, n if bN > 1 else 0, qb if bT > 1 else 0, kb if bS > 1 else 0)

  def tq_ops_map(b, kh, kb, t, count_ref, index_ref, full_ref):
    n = kh * G + lax.div(t, jnp.int32(Mq))
    return (b, _head_row(cfg, n, cfg.q_ops_heads), q_block(b, kh, kb, t, index_ref), 0)

  def tkv_ops_map(b, kh, kb, t, *_):
    return (b, 0, 0, kb)

  in_specs = [
    pl.BlockSpec((sq, sq, bq, Hp), tq_map),
    pl.BlockSpec((sq, sq, bk, Hp), tkv_map),
    pl.BlockSpec((sq, sq, bk, Hvp), tkv_map),
  ]
  args = [q, k, v]
  if bias is not None:
    in_specs.append(pl.BlockSpec(_bias_block(cfg), tbias_map))
    args.append(bias)
  if q_ops is not None:
    in_specs.append(pl.BlockSpec((sq, cfg.n_q_ops, bq, 1), tq_ops_map))
    args.append(q_ops)
  if kv_ops is not None:
    in_specs.append(pl.BlockSpec((sq, cfg.n_kv_ops, 1, bk), tkv_ops_map))
    args.append(kv_ops)
  in_specs += [
    pl.BlockSpec((sq, sq, bq, 1), tq_map),
    pl.BlockSpec((sq, sq, bq, 1), tq_map),
    pl.BlockSpec((sq, sq, bq, Hvp), tq_map),
  ]
  args += [lse, delta, do]
  dk, dv = pl.pallas_call(
    functools.partial(_dkdv_kernel, cfg),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(B, K, cfg.nK, G * Mq),
      in_specs=in_specs,
      out_specs=[
        pl.BlockSpec((sq, sq, bk, Hp), tkv_map),
        pl.BlockSpec((sq, sq, bk, Hvp), tkv_map),
      ],
      scratch_shapes=[pltpu.VMEM((bk, Hp), jnp.float32), pltpu.VMEM((bk, Hvp), jnp.float32)],
    ),
    out_shape=[
      jax.ShapeDtypeStruct((B, K, Sp, Hp), k.dtype),
      jax.ShapeDtypeStruct((B, K, Sp, Hvp), v.dtype),
    ],
    compiler_params=_compiler_params(),
    interpret=cfg.interpret,
    name="flash_tpu_dkdv",
  )(*t_lists, *args)
  return dq, dk, dv, ds


# ---------------------------------------------------------------------------------------
# custom_vjp.
# ---------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, bias, sinks, q_ops, kv_ops, lists, t_lists):
  del t_lists
  return _forward(cfg, q, k, v, bias, sinks, q_ops, kv_ops, lists)


def _flash_fwd(cfg, q, k, v, bias, sinks, q_ops, kv_ops, lists, t_lists):
  out, lse = _forward(cfg, q, k, v, bias, sinks, q_ops, kv_ops, lists)
  return (out, lse), (q, k, v, bias, sinks, q_ops, kv_ops, lists, t_lists, out, lse)


def _flash_bwd(cfg, residuals, cotangents):
  q, k, v, bias, sinks, q_ops, kv_ops, lists, t_lists, out, lse = residuals
  dout, dlse = cotangents
  # d lse / d s = p, so an lse cotangent folds into the row term: delta = rowsum(dO·O) - dlse.
  delta = (dout.astype(jnp.float32) * out.astype(jnp.float32)).sum(-1, keepdims=True)
  delta = delta - dlse.astype(jnp.float32)  # [B, N, Tp, 1]
  lse_safe = jnp.where(lse == -jnp.inf, 0.0, lse)  # fully masked rows: every p is 0
  dq, dk, dv, ds = _backward_kernels(
    cfg, q, k, v, bias, q_ops, kv_ops, lists, t_lists, lse_safe, delta, dout.astype(q.dtype)
  )
  dbias = None
  if bias is not None:
    bB, bN, bT, bS = cfg.bias_shape
    ds = ds[:, :, : cfg.T, : cfg.S]
    axes = tuple(a for a, size in enumerate((bB, bN, bT, bS)) if size == 1)
    dbias = ds.sum(axis=axes, keepdims=True)
    dbias = _blocks.pad_axis(_blocks.pad_axis(dbias, 2, bias.shape[2]), 3, bias.shape[3])
    dbias = dbias.astype(bias.dtype)
  dsinks = None
  if sinks is not None:
    valid = (jnp.arange(lse.shape[2]) < cfg.T)[:, None]
    sink_N11 = sinks.astype(jnp.float32)[:, None, None]
    dsinks = -jnp.where(valid, jnp.exp(sink_N11 - lse) * delta, 0.0).sum((0, 2, 3))
    dsinks = dsinks.astype(sinks.dtype)
  return dq, dk, dv, dbias, dsinks, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
