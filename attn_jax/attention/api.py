"""The front door of softmax attention: one function, several implementations.

Dimension key: B batch, T query length, S key/value length, N query heads, K kv heads
(N % K == 0), H q/k head dim, Hv value head dim.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from attn_jax.attention import _checks
from attn_jax.attention import pallas as pallas_lib
from attn_jax.attention import reference as reference_lib
from attn_jax.attention import xla as xla_lib

IMPLEMENTATIONS = ("reference", "xla", "pallas_tpu", "pallas_gpu", "pallas_interpret")
_PALLAS = ("pallas_tpu", "pallas_gpu", "pallas_interpret")


def default_implementation(backend: str | None = None, *, mask=None, bias=None) -> str:
  """The implementation ``implementation=None`` picks on ``backend`` (default: jax's).

  TPU → ``pallas_tpu``, GPU → ``pallas_gpu``, anything else (CPU) → ``xla``. A call the flash
  kernels cannot take (a ``ScoreBias``, a ``BlockSparseMask`` under ``|`` or with blocks no
  kernel tile divides) goes to ``xla`` everywhere.
  """
  if backend is None:
    backend = jax.default_backend()
  kernel = {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu"}.get(backend)
  if kernel is None or pallas_lib.unsupported_reason(mask, bias, kernel) is not None:
    return "xla"
  return kernel


def dot_product_attention(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K Hv"],
  *,
  mask=None,
  bias=None,
  scale: float | None = None,
  softcap: float | None = None,
  sinks: Float[Array, " N"] | None = None,
  implementation: str | None = None,
  return_lse: bool = False,
  block_q: int | None = None,
  block_kv: int | None = None,
  signed: bool = False,
):
  """Softmax attention ``softmax(softcap(scale·q·kᵀ) + bias, masked) · v``.

  Args:
    q: queries ``[B, T, N, H]``.
    k: keys ``[B, S, K, H]``; query head n reads kv head ``n // (N // K)`` (GQA/MQA).
    v: values ``[B, S, K, Hv]``.
    mask: a ``masks.Mask`` (``CausalMask()``, ``LocalMask(l, r)``, ``SegmentMask(...)``, ...
      combined with ``&`` / ``|``), or None for full attention. Queries are aligned
      bottom-right: query i sits at position ``i + S - T``.
    bias: additive logit bias, a float array broadcastable to ``[B, N, T, S]`` (rank 4,
      each dim 1 or full; differentiable) or a ``biases.ScoreBias`` computed in-tile.
    scale: logit scale; default ``1/sqrt(H)``.
    softcap: c in ``c·tanh(s/c)``, applied before bias and mask; None for no cap.
    sinks: per-head sink logits ``[N]`` entering only the softmax denominator.
    implementation: ``"reference"`` (naive oracle), ``"xla"`` (blocked, memory-efficient,
      skips empty blocks), ``"pallas_tpu"`` / ``"pallas_gpu"`` (flash kernels),
      ``"pallas_interpret"`` (the TPU kernel simulated on any backend; slow, for
      debugging), or None for the best on the current backend (see
      ``default_implementation``). An explicit name is never replaced.
    return_lse: also return the per-row log-sum-exp ``[B, N, T]`` (float32).
    block_q, block_kv: tile sizes for the blocked paths (defaults tuned per backend).
    signed: signed weights ``sign(s)·exp(|s|) / Σ_j exp(|s|)`` instead of softmax (cog
      attention: the running max and sum are over |s|); "reference" and "xla" only.

  Returns:
    ``[B, T, N, Hv]`` in q's dtype, and the lse when ``return_lse``. Fully masked rows
    give 0 and lse = -inf.
  """
  # Validate here, before any implementation (or a type checker wrapped around one) sees
  # the arrays, so every path reports the same ValueError.
  dims = _checks.check_qkv(q, k, v)
  _checks.check_options(dims, mask=mask, bias=bias, scale=scale, softcap=softcap, sinks=sinks)
  if implementation is None:
    implementation = default_implementation(jax.default_backend(), mask=mask, bias=bias)
    if signed is True and implementation in _PALLAS:
      implementation = "xla"  # the kernels take no signed weights
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
      f"implementation must be one of {IMPLEMENTATIONS} or None; got {implementation!r}"
    )
  options = dict(
    mask=mask, bias=bias, scale=scale, softcap=softcap, sinks=sinks, return_lse=return_lse
  )
  if not isinstance(signed, bool):
    raise ValueError(f"signed must be a bool; got {signed!r}")
  if signed:
    if implementation in _PALLAS:
      raise NotImplementedError(
        f"signed attention weights are not built in the Pallas kernels ({implementation!r}); "
        "use 'xla' or 'reference'"
      )
    options["signed"] = True
  if implementation in _PALLAS:
    return pallas_lib.pallas_attention(
      q, k, v, implementation=implementation, block_q=block_q, block_kv=block_kv, **options
    )
  if implementation == "reference":
    if block_q is not None or block_kv is not None:
      raise ValueError(
        "block_q / block_kv apply to blocked implementations; the 'reference' "
        f"implementation takes none (got block_q={block_q}, block_kv={block_kv})"
      )
    return reference_lib.attention_reference(q, k, v, **options)
  # Tile sizes default per implementation; validated here with every other argument.
  for name, size in (("block_q", block_q), ("block_kv", block_kv)):
    if size is not None:
      _checks.check_block_size(name, size)
      options[name] = size
  return xla_lib.blocked_attention(q, k, v, **options)


def heads_folded_attention(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K Hv"],
  *,
  mask,
  **options,
) -> Float[Array, "B T N Hv"]:
  """``dot_product_attention`` under a mask that differs per (example, head): the heads are
  folded into the batch (B·N rows, example-major; K/V read per query head) and ``mask``'s
  batch axis indexes those rows. One call, so the blocked path sees each row's tile lists
  as data (a vmap over heads would batch its loops' trip counts instead). ``options`` as
  ``dot_product_attention`` (no per-head bias or sinks)."""
  B, T, N, _ = q.shape
  G = N // k.shape[2]

  def fold(x_BLNX):  # [B, L, N, X] -> [B·N, L, 1, X]
    if x_BLNX.shape[2] != N:
      x_BLNX = jnp.repeat(x_BLNX, G, axis=2)
    B_, L, _, X = x_BLNX.shape
    return x_BLNX.transpose(0, 2, 1, 3).reshape(B_ * N, L, 1, X)

  out = dot_product_attention(fold(q), fold(k), fold(v), mask=mask, **options)
  return out.reshape(B, N, T, -1).transpose(0, 2, 1, 3)
