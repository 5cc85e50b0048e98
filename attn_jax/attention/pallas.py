"""Softmax attention through the Pallas flash kernels of ``pallas_kernels/``.

``dot_product_attention(implementation="pallas_tpu" | "pallas_gpu" | "pallas_interpret")``
lands here. The mask is lowered with ``kernel_mask.lower`` (block map + in-tile predicate +
per-token operands), so the kernels skip empty tiles and evaluate the mask only on partial
ones.

  * ``pallas_tpu``: the Mosaic kernel (``pallas_kernels/flash_tpu.py``), compiled for TPU.
  * ``pallas_gpu``: the Triton kernel (``pallas_kernels/flash_gpu.py``), compiled for GPU.
  * ``pallas_interpret``: the TPU kernel under Pallas's TPU interpret mode, which simulates
    TPU memory semantics on any backend (CPU included): for debugging and tests, slow.

Block-sparse masks. A ``BlockSparseMask`` (alone or ANDed with other masks: causal, local,
segments, ...) runs block-sparse: its block lists become the kernel's block map, so unlisted
blocks cost no load and no compute (``pallas_kernels/block_sparse.py`` is the per-head list
API). The kernel tiles are chosen to divide the mask's blocks, so every non-empty tile lies
inside one listed block and the mask's in-tile predicate is "visible"; the other ANDed masks
are evaluated in-tile as usual. Tiles: TPU bk the largest multiple of 128 (<= 512) dividing
the kv block, bq the largest multiple of 8 (<= 512) dividing the q block; GPU the largest
power of two (16 … 64) dividing each.

What the kernels do not take (each raises ``NotImplementedError`` naming the alternative;
``implementation=None`` never picks a kernel for such a call):
  * a ``ScoreBias`` (e.g. ``AlibiBias``): the kernels take dense additive biases only;
  * a ``BlockSparseMask`` under ``|`` (a union needs the mask's lists inside PARTIAL tiles),
    or with blocks no kernel tile divides (TPU: kv blocks not a multiple of 128; GPU:
    blocks without a power-of-two divisor >= 16).
"""

import math

from attn_jax.attention import biases as biases_lib
from attn_jax.attention import kernel_mask
from attn_jax.attention import masks as masks_lib

KERNELS = ("pallas_tpu", "pallas_gpu", "pallas_interpret")


def unsupported_reason(mask=None, bias=None, implementation="pallas_tpu") -> str | None:
  """Why the flash kernels cannot run this call, or None when they can."""
  if isinstance(bias, biases_lib.ScoreBias):
    return (
      f"the Pallas flash kernels take dense additive biases, not a score-bias function "
      f"({bias!r}); use implementation='xla', which computes it in-tile"
    )
  if mask is not None and _has_block_sparse(mask):
    if _block_sparse_under_or(mask):
      return (
        "the Pallas kernels do not take a BlockSparseMask combined with | (a union needs the "
        "block lists inside partial tiles); use implementation='xla' or 'reference'"
      )
    try:
      sparse_tiles(mask, implementation)
    except ValueError as err:
      return f"{err}; use implementation='xla' or 'reference'"
  refusal = None if mask is None else _kernel_refusal(mask)
  if refusal is not None:
    return f"the Pallas flash kernels do not take this mask: {refusal}; use 'xla' or 'reference'"
  return None


def _kernel_refusal(mask) -> str | None:
  """A mask class's own reason (its ``KERNEL_REFUSAL``) for staying off the kernels."""
  if isinstance(mask, masks_lib.AndMask | masks_lib.OrMask):
    return _kernel_refusal(mask.left) or _kernel_refusal(mask.right)
  return getattr(mask, "KERNEL_REFUSAL", None)


def _has_block_sparse(mask) -> bool:
  return bool(_block_sparse_leaves(mask))


def _block_sparse_leaves(mask) -> list:
  if isinstance(mask, masks_lib.BlockSparseMask):
    return [mask]
  if isinstance(mask, masks_lib.AndMask | masks_lib.OrMask):
    return _block_sparse_leaves(mask.left) + _block_sparse_leaves(mask.right)
  return []


def _block_sparse_under_or(mask) -> bool:
  if isinstance(mask, masks_lib.OrMask):
    return _has_block_sparse(mask)
  if isinstance(mask, masks_lib.AndMask):
    return _block_sparse_under_or(mask.left) or _block_sparse_under_or(mask.right)
  return False


def _largest_divisor(length: int, candidates) -> int | None:
  return next((c for c in candidates if length % c == 0), None)


def sparse_tiles(mask, implementation: str) -> tuple[int, int] | None:
  """Kernel tiles (bq, bk) dividing every BlockSparseMask block of ``mask`` (None: no such
  leaf). Raises ValueError when the kernel has no tile that divides them."""
  leaves = _block_sparse_leaves(mask)
  if not leaves:
    return None
  Lq = math.gcd(*(leaf.block_size[0] for leaf in leaves))
  Lk = math.gcd(*(leaf.block_size[1] for leaf in leaves))
  if implementation == "pallas_gpu":
    pow2 = (64, 32, 16)
    bq, bk = _largest_divisor(Lq, pow2), _largest_divisor(Lk, pow2)
    need = "a power of two >= 16"
  else:
    bq = _largest_divisor(Lq, range(512, 0, -8))
    bk = _largest_divisor(Lk, (512, 384, 256, 128))
    need = "a multiple of 8 (q) / 128 (kv)"
  if bq is None or bk is None:
    raise ValueError(
      f"the {implementation} kernel has no tile dividing the BlockSparseMask blocks "
      f"({Lq}, {Lk}): each needs a divisor that is {need}"
    )
  return bq, bk


def _kernel_module(implementation: str):
  # Imported on first use: each kernel module imports its Pallas backend.
  if implementation == "pallas_gpu":
    from pallas_kernels import flash_gpu

    return flash_gpu
  from pallas_kernels import flash_tpu

  return flash_tpu


def pallas_attention(
  q,
  k,
  v,
  *,
  implementation: str,
  mask=None,
  bias=None,
  scale=None,
  softcap=None,
  sinks=None,
  return_lse=False,
  block_q=None,
  block_kv=None,
):
  """Runs the flash kernel ``implementation`` (inputs already validated by the caller)."""
  if implementation not in KERNELS:
    raise ValueError(f"implementation must be one of {KERNELS}; got {implementation!r}")
  reason = unsupported_reason(mask, bias, implementation)
  if reason is not None:
    raise NotImplementedError(f"implementation={implementation!r}: {reason}")
  tiles = None if mask is None else sparse_tiles(mask, implementation)
  if tiles is not None:
    Lq, Lk = (
      math.gcd(*sizes)
      for sizes in zip(*(m.block_size for m in _block_sparse_leaves(mask)), strict=True)
    )
    for name, size, block in (("block_q", block_q, Lq), ("block_kv", block_kv, Lk)):
      if size is not None and block % size:
        raise ValueError(
          f"{name}={size} must divide the BlockSparseMask block ({block}) so that every "
          "kernel tile lies inside one mask block"
        )
    block_q = tiles[0] if block_q is None else block_q
    block_kv = tiles[1] if block_kv is None else block_kv
  B, T = q.shape[:2]
  S = k.shape[1]
  lowered = kernel_mask.lower(mask, B, T, S)
  kernel = _kernel_module(implementation)
  interpret = False
  if implementation == "pallas_interpret":
    # Passed to every pallas_call of the kernel, the custom_vjp backward included (a
    # force_tpu_interpret_mode() context would not cover a backward traced later).
    from jax.experimental.pallas import tpu as pltpu

    interpret = pltpu.InterpretParams()
  return kernel.flash_attention(
    q,
    k,
    v,
    block_kinds=lowered.block_kinds,
    mask_fn=lowered.mask_fn,
    q_operands=lowered.q_operands,
    kv_operands=lowered.kv_operands,
    bias=bias,
    sinks=sinks,
    scale=scale,
    softcap=softcap,
    return_lse=return_lse,
    block_q=block_q,
    block_kv=block_kv,
    interpret=interpret,
  )
