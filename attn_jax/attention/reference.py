"""The oracle: softmax attention computed naively, with every option.

Dimension key: B batch, T query length, S key/value length, N query heads, K kv heads,
G = N // K query heads per kv head, H q/k head dim, Hv value head dim.

Materialises fp32 logits ``[B, N, T, S]`` (float64 for float64 inputs, as tests use under
``jax_enable_x64``). Never the thing under test: the fast paths are tested against it.

Logit pipeline, in the library order: ``s = scale·q·k`` → soft-cap ``c·tanh(s/c)`` →
``+ bias`` → mask (``-inf``). A per-head sink logit σ enters only the denominator:
``p_ij = exp(s_ij) / (exp(σ) + Σ_j exp(s_ij))``. The returned lse is the log of that
denominator. Fully masked rows give output 0 and lse = -inf (lse = σ with a sink), and no
NaN in values or gradients.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from attn_jax.attention import _checks
from attn_jax.attention import biases as biases_lib


def attention_reference(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K Hv"],
  *,
  mask=None,
  bias=None,
  scale: float | None = None,
  softcap: float | None = None,
  sinks: Float[Array, " N"] | None = None,
  return_lse: bool = False,
  return_probs: bool = False,
  signed: bool = False,
):
  """Naive softmax attention.

  Args:
    q, k, v: ``[B, T, N, H]``, ``[B, S, K, H]``, ``[B, S, K, Hv]``; N % K == 0.
    mask: a ``masks.Mask`` or None (every key visible).
    bias: float array broadcastable to ``[B, N, T, S]``, or a ``biases.ScoreBias``.
    scale: logit scale, default ``1/sqrt(H)``.
    softcap: c in ``c·tanh(s/c)``, or None.
    sinks: per-head sink logits ``[N]``, or None.
    return_lse: also return the per-row log-sum-exp ``[B, N, T]`` (float32/float64).
    return_probs: also return the probabilities ``[B, N, T, S]``.
    signed: signed weights ``sign(s)·exp(|s|) / Σ exp(|s|)`` ("More Expressive Attention
      with Negative Weights"); the lse is then over |s|.

  Returns:
    out ``[B, T, N, Hv]`` in q's dtype, followed by lse and/or probs when asked.
  """
  dims = _checks.check_qkv(q, k, v)
  _checks.check_options(dims, mask=mask, bias=bias, scale=scale, softcap=softcap, sinks=sinks)
  B, T, S, N, K, H, Hv = dims
  G = N // K
  scale = _checks.default_scale(H, scale)
  dtype = _checks.compute_dtype(q.dtype)

  k_BSNH = jnp.repeat(k.astype(dtype), G, axis=2)  # query head n reads kv head n // G
  v_BSNV = jnp.repeat(v.astype(dtype), G, axis=2)
  logits_BNTS = jnp.einsum("BTNH,BSNH->BNTS", q.astype(dtype), k_BSNH) * scale
  if softcap is not None:
    logits_BNTS = softcap * jnp.tanh(logits_BNTS / softcap)
  q_offset = S - T
  if isinstance(bias, biases_lib.ScoreBias):
    q_pos, kv_pos = jnp.arange(T) + q_offset, jnp.arange(S)
    logits_BNTS = logits_BNTS + bias(jnp.arange(N), q_pos, kv_pos).astype(dtype)[None]
  elif bias is not None:
    logits_BNTS = logits_BNTS + bias.astype(dtype)
  if mask is not None:
    visible = mask.dense(T, S)
    visible_BNTS = visible[:, None] if visible.ndim == 3 else visible[None, None]
    logits_BNTS = jnp.where(visible_BNTS, logits_BNTS, -jnp.inf)

  sign_BNTS = None
  if signed:
    sign_BNTS = jnp.sign(logits_BNTS)
    logits_BNTS = jnp.where(logits_BNTS == -jnp.inf, -jnp.inf, jnp.abs(logits_BNTS))
  # The row max only stabilises exp; softmax does not depend on it, so no gradient.
  row_max_BNT = jnp.max(logits_BNTS, axis=-1)
  if sinks is not None:
    sink_BNT = jnp.broadcast_to(sinks.astype(dtype)[None, :, None], (B, N, T))
    row_max_BNT = jnp.maximum(row_max_BNT, sink_BNT)
  row_max_BNT = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max_BNT), row_max_BNT, 0.0))
  exp_BNTS = jnp.exp(logits_BNTS - row_max_BNT[..., None])
  denom_BNT = exp_BNTS.sum(-1)
  if sinks is not None:
    denom_BNT = denom_BNT + jnp.exp(sink_BNT - row_max_BNT)
  empty_BNT = denom_BNT == 0
  safe_denom_BNT = jnp.where(empty_BNT, 1.0, denom_BNT)
  probs_BNTS = exp_BNTS / safe_denom_BNT[..., None]
  if signed:
    probs_BNTS = jnp.where(sign_BNTS == 0, 0.0, sign_BNTS) * probs_BNTS
  out_BTNV = jnp.einsum("BNTS,BSNV->BTNV", probs_BNTS, v_BSNV).astype(q.dtype)

  extras = []
  if return_lse:
    extras.append(jnp.where(empty_BNT, -jnp.inf, jnp.log(safe_denom_BNT) + row_max_BNT))
  if return_probs:
    extras.append(probs_BNTS)
  return (out_BTNV, *extras) if extras else out_BTNV
