"""Query-adaptive long-context heads (catalog family (d), ``qada``) as a pure JAX function.

"Unveiling Simplicities of Attention: Adaptive Long-Context Head Identification".

Dimension key: B batch, T query length, S key/value length, N query heads, K kv heads
(G = N // K), H head dim, Hv value head dim.

Training-free and causal. For a query at position p (bottom-right aligned, p = S − T + t)
the keys split into the local set — the first ``qada_sinks`` keys and the ``qada_window``
most recent keys up to p — and the bulk U = {s : sinks <= s <= p − window}. The bulk keys
are modelled as Gaussian with mean μ and covariance Σ, so the bulk's log attention mass is
estimated as

    log m_bulk ≈ log |U| + c·q·μ + c²·qᵀΣq / 2          (c the softmax scale)

and compared with the exact log-sum-exp over the local set. The head answers this query
with local attention when the bulk's estimated share of the mass,
sigmoid(log m_bulk − lse_local), is below ``qada_tau``, and with full causal attention
otherwise (τ = 0: always full; τ = 1: always local). μ and Σ here are the bulk's empirical
moments for each query (so c·q·μ and c²·qᵀΣq are the mean and variance of the bulk logits,
computed exactly by one blocked pass over the keys, never a [T, S] tensor).

What is and is not saved: this function computes the local and the full attention for
every query and selects, so it measures the decision (and its quality) but saves no work; a
decode path that caches μ and Σ after prefill and reads only the local keys for heads that
choose local is not built. The per-query moments ignore an extra ``mask`` (packed
documents), which applies to both attentions.
"""

import math
import typing

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from attn_jax.attention import _checks, registry
from attn_jax.attention import api as api_lib
from attn_jax.attention import masks as masks_lib

PAPER = "Unveiling Simplicities of Attention: Adaptive Long-Context Head Identification"
IMPLEMENTATIONS = ("reference", "xla")


def _int(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
  return value


def local_mask(sinks: int, window: int) -> masks_lib.Mask:
  """The first ``sinks`` keys and the ``window`` most recent keys, causally."""
  return masks_lib.sliding_window(window) | (masks_lib.SinkKeysMask(sinks) & masks_lib.CausalMask())


def bulk_logit_moments(
  q_BTNH: Float[Array, "B T N H"],
  k_BSKH: Float[Array, "B S K H"],
  *,
  sinks: int,
  window: int,
  scale: float,
  block: int = 256,
) -> tuple[Float[Array, " T"], Float[Array, "B N T"], Float[Array, "B N T"]]:
  """Size |U|, mean and variance of the logits c·q·k over each query's bulk keys, by a
  blocked pass over the keys (no gradient: they only feed the decision)."""
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  dtype = jnp.promote_types(q_BTNH.dtype, jnp.float32)
  q = jax.lax.stop_gradient(q_BTNH).astype(dtype).reshape(B, T, K, N // K, H)
  bk = min(block, S)
  n_blocks = -(-S // bk)
  pad = ((0, 0), (0, n_blocks * bk - S), (0, 0), (0, 0))
  k = jnp.pad(jax.lax.stop_gradient(k_BSKH).astype(dtype), pad)
  k = k.reshape(B, n_blocks, bk, K, H)
  pos_T = S - T + jnp.arange(T)

  def step(carry, j):
    s1, s2 = carry
    z = jnp.einsum("BTKGH,BSKH->BKGTS", q, k[:, j]) * scale
    s_idx = j * bk + jnp.arange(bk)
    bulk_TS = (s_idx[None, :] >= sinks) & (s_idx[None, :] <= pos_T[:, None] - window)
    z = jnp.where(bulk_TS, z, 0)
    return (s1 + z.sum(-1), s2 + (z * z).sum(-1)), None

  zeros = jnp.zeros((B, K, N // K, T), dtype)
  (s1, s2), _ = jax.lax.scan(step, (zeros, zeros), jnp.arange(n_blocks))
  n_T = jnp.maximum(pos_T - window - sinks + 1, 0).astype(dtype)
  denom = jnp.maximum(n_T, 1)
  mean = (s1 / denom).reshape(B, N, T)
  var = jnp.maximum((s2 / denom).reshape(B, N, T) - mean**2, 0)
  return n_T, mean, var


def _logit(tau: float) -> float:
  if tau <= 0:
    return -math.inf
  if tau >= 1:
    return math.inf
  return math.log(tau) - math.log1p(-tau)


@typing.no_type_check
def qada(
  q_BTNH: Float[Array, "B T N H"],
  k_BSKH: Float[Array, "B S K H"],
  v_BSKV: Float[Array, "B S K Hv"],
  *,
  causal: bool = True,
  qada_sinks: int = 4,
  qada_window: int = 64,
  qada_tau: float = 0.5,
  mask: masks_lib.Mask | None = None,
  implementation: str | None = None,
  return_aux: bool = False,
):
  """Per (query, head) choice between local and full attention (Unveiling Simplicities of
  Attention: Adaptive Long-Context Head Identification); see the module docstring.

  Args:
    q_BTNH, k_BSKH, v_BSKV: queries, keys, values.
    causal: must be True (the local set is "sinks + recent keys").
    qada_sinks: leading keys always in the local set (default 4).
    qada_window: recent keys in the local set, the query's own included (default 64).
    qada_tau: threshold on the bulk's estimated share of the attention mass, in [0, 1].
    mask: an extra mask (e.g. packed documents) for both attentions.
    implementation: "reference" or "xla" (default "xla").
    return_aux: also return ``{"local": bool [B, N, T], "bulk_share": [B, N, T]}``.
  """
  dims = _checks.check_qkv(q_BTNH, k_BSKH, v_BSKV)
  if causal is not True:
    raise ValueError(f"qada is causal only (local = sinks + recent keys); got causal={causal!r}")
  sinks = _int("qada_sinks", qada_sinks, 0)
  window = _int("qada_window", qada_window, 1)
  if isinstance(qada_tau, bool) or not isinstance(qada_tau, (int, float)):
    raise ValueError(f"qada_tau must be a number in [0, 1]; got {qada_tau!r}")
  if not 0 <= qada_tau <= 1:
    raise ValueError(f"qada_tau must be in [0, 1]; got {qada_tau}")
  if mask is not None and not isinstance(mask, masks_lib.Mask):
    raise ValueError(f"mask must be an attn_jax.attention.masks.Mask or None; got {type(mask)}")
  impl = implementation or "xla"
  if impl not in IMPLEMENTATIONS:
    if impl in api_lib.IMPLEMENTATIONS:
      raise NotImplementedError(
        f"qada implementation {impl!r} is not built: the sink-keys mask is not lowered for the "
        "flash kernels; use 'xla' or 'reference'"
      )
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; got {impl!r}")
  local = local_mask(sinks, window)
  full = masks_lib.CausalMask()
  if mask is not None:
    local, full = local & mask, full & mask
  out_local, lse_local = api_lib.dot_product_attention(
    q_BTNH, k_BSKH, v_BSKV, mask=local, implementation=impl, return_lse=True
  )
  out_full = api_lib.dot_product_attention(q_BTNH, k_BSKH, v_BSKV, mask=full, implementation=impl)
  n_T, mean, var = bulk_logit_moments(
    q_BTNH, k_BSKH, sinks=sinks, window=window, scale=dims.H**-0.5
  )
  log_bulk = jnp.where(n_T > 0, jnp.log(jnp.maximum(n_T, 1)) + mean + var / 2, -jnp.inf)
  margin = log_bulk - jax.lax.stop_gradient(lse_local).astype(log_bulk.dtype)
  use_local = margin < _logit(float(qada_tau))  # [B, N, T]
  out = jnp.where(jnp.swapaxes(use_local, 1, 2)[..., None], out_local, out_full)
  if return_aux:
    return out, {"local": use_local, "bulk_share": jax.nn.sigmoid(margin)}
  return out


def _build(key, dims, causal):
  del key, dims
  return {"causal": causal, "qada_sinks": 2, "qada_window": 4, "qada_tau": 0.5}


registry.register(
  registry.Mechanism(
    id="qada",
    family="d",
    paper=PAPER,
    entry_point="attn_jax.attention.qada:qada",
    implementations=IMPLEMENTATIONS,
    patterns=frozenset((registry.SELF_CAUSAL, registry.CROSS_CAUSAL)),
    decode=True,
    tier=2,
    check="τ = 0 always picks full, and τ = 1 always picks local. For synthetic Gaussian keys "
    "with large n, the estimate matches the exact bulk LSE. (Both attentions are computed and "
    "selected: the decode saving is not built.)",
    build=_build,
    module=registry.NN_ATTENTION,
  )
)
