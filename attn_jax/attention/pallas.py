"""Softmax attention through the Pallas flash kernels of ``pallas_kernels/``.

``dot_product_attention(implementation="pallas_tpu" | "pallas_gpu" | "pallas_interpret")``
lands here. The mask is lowered with ``kernel_mask.lower`` (block map + in-tile predicate +
per-token operands), so the kernels skip empty tiles and evaluate the mask only on partial
ones.

  * ``pallas_tpu``: the Mosaic kernel (``pallas_kernels/flash_tpu.py``), compiled for TPU.
  * ``pallas_gpu``: the Triton kernel (``pallas_kernels/flash_gpu.py``), compiled for GPU.
  * ``pallas_interpret``: the TPU kernel under Pallas's TPU interpret mode, which simulates
    TPU memory semantics on any backend (CPU included): for debugging and tests, slow.

What the kernels do not take (each raises ``NotImplementedError`` naming the alternative;
``implementation=None`` never picks a kernel for such a call):
  * a ``ScoreBias`` (e.g. ``AlibiBias``): the kernels take dense additive biases only;
  * a ``BlockSparseMask``: block lists belong to the block-sparse kernels.
"""

from attn_jax.attention import biases as biases_lib
from attn_jax.attention import kernel_mask
from attn_jax.attention import masks as masks_lib

KERNELS = ("pallas_tpu", "pallas_gpu", "pallas_interpret")


def unsupported_reason(mask=None, bias=None) -> str | None:
  """Why the flash kernels cannot run this call, or None when they can."""
  if isinstance(bias, biases_lib.ScoreBias):
    return (
      f"the Pallas flash kernels take dense additive biases, not a score-bias function "
      f"({bias!r}); use implementation='xla', which computes it in-tile"
    )
  if mask is not None and _has_block_sparse(mask):
    return (
      "the Pallas flash kernels do not take a BlockSparseMask (block lists belong to the "
      "block-sparse kernels); use implementation='xla' or 'reference'"
    )
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
  if isinstance(mask, masks_lib.BlockSparseMask):
    return True
  if isinstance(mask, masks_lib.AndMask | masks_lib.OrMask):
    return _has_block_sparse(mask.left) or _has_block_sparse(mask.right)
  return False


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
  reason = unsupported_reason(mask, bias)
  if reason is not None:
    raise NotImplementedError(f"implementation={implementation!r}: {reason}")
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
