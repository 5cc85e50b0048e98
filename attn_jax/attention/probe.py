"""Efficient probing (catalog family (e), ``efficient_probe``): multi-query attention pooling.

"Attention, Please! Revisiting Attentive Probing for Masked Image Modeling".

Dimension key: B batch, S tokens (e.g. frozen patch features), D feature dim, M learned
queries, C = Dv / M value channels per query, Dv pooled dim.

M learned queries ``q_m`` read the raw tokens: no query or key projection, the keys are the
tokens themselves. One value projection ``W_v [D, Dv]`` is split channel-wise into M slices
of C channels, and query m reads only its slice::

    a_m = softmax(q_m · Xᵀ / √D),    pooled = concat_m(a_m · X W_v[:, mC:(m+1)C])   [B, Dv]

The pooled vector feeds a linear classifier (``attn_jax.models.encoder.Encoder`` with
``pooling="efficient_probe"``). M = 1 without value splitting is single-query attention
pooling. The parameter count, M·D + D·Dv, is below that of an MHA probe (a query and four
D×D projections with biases, ``mha_probe_param_count``): with Dv = D, whenever M < 3D + 5.

Pooling entries have the registry's ``"pool"`` interface: ``entry(params, x_BSD, *,
valid_BS=None, implementation=None) -> [B, F]``, parameters from ``init(key, *, d_model,
**options)``. They are not token mixers, so the stacks do not take them as attention kinds.

Fast path (every ``dot_product_attention`` implementation): one attention call with the M
queries as M query positions of one head against the tokens as one kv head and the full
value ``X W_v`` (Dv channels), then each query keeps its own slice. The value contraction
costs M·S·Dv instead of S·Dv (as much as the logits when Dv = D), in exchange for the
blocked, memory-efficient kernels at any S. ``implementation="reference"`` materialises the
``[B, M, S]`` weights and contracts each slice once.
"""

import math
import typing

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from attn_jax.attention import api as api_lib
from attn_jax.attention import masks as masks_lib
from attn_jax.attention import registry

PAPER = "Attention, Please! Revisiting Attentive Probing for Masked Image Modeling"
_NAMES = ("queries", "w_v")


def probe_dims(params) -> tuple[int, int, int]:
  """``(M, D, Dv)`` of ``efficient_probe`` parameters, validated."""
  if not isinstance(params, dict) or set(params) != set(_NAMES):
    got = sorted(params) if isinstance(params, dict) else type(params).__name__
    raise ValueError(f"efficient_probe params must hold {sorted(_NAMES)}; got {got}")
  qs, ws = jnp.shape(params["queries"]), jnp.shape(params["w_v"])
  if len(qs) != 2 or len(ws) != 2 or qs[1] != ws[0]:
    raise ValueError(
      f"params['queries'] must be [M, D] and params['w_v'] [D, Dv] with the same D; got "
      f"{qs} and {ws}"
    )
  M, D, Dv = qs[0], qs[1], ws[1]
  if Dv % M:
    raise ValueError(f"the pooled dim Dv={Dv} must be divisible by the number of queries M={M}")
  return M, D, Dv


def _check_inputs(x_BSD, valid_BS, D):
  if getattr(x_BSD, "ndim", None) != 3 or x_BSD.shape[-1] != D:
    raise ValueError(f"x must have shape [B, S, D={D}]; got {getattr(x_BSD, 'shape', x_BSD)}")
  if valid_BS is not None:
    if jnp.shape(valid_BS) != x_BSD.shape[:2] or jnp.asarray(valid_BS).dtype != jnp.bool_:
      raise ValueError(
        f"valid_BS must be a bool array of shape {x_BSD.shape[:2]}; got shape "
        f"{jnp.shape(valid_BS)}, dtype {jnp.asarray(valid_BS).dtype}"
      )


@typing.no_type_check
def efficient_probe(
  params,
  x_BSD: Float[Array, "B S D"],
  *,
  valid_BS: Bool[Array, "B S"] | None = None,
  implementation: str | None = None,
) -> Float[Array, "B Dv"]:
  """Multi-query attention pooling (Attention, Please! Revisiting Attentive Probing for
  Masked Image Modeling): ``[B, S, D]`` tokens to a ``[B, Dv]`` vector.

  Args:
    params: ``queries [M, D]`` and ``w_v [D, Dv]`` (Dv divisible by M).
    x_BSD: the tokens (frozen features); they are the keys as they are.
    valid_BS: which tokens exist (padding is False); a sample with no valid token pools to 0.
    implementation: ``dot_product_attention``'s names ("reference" is the materialised form).
  """
  M, D, Dv = probe_dims(params)
  _check_inputs(x_BSD, valid_BS, D)
  B, S, _ = x_BSD.shape
  dtype = x_BSD.dtype
  queries, w_v = params["queries"].astype(dtype), params["w_v"].astype(dtype)
  v_BSV = x_BSD @ w_v
  if implementation == "reference":
    logits_BMS = jnp.einsum("MD,BSD->BMS", queries, x_BSD).astype(jnp.float32) / math.sqrt(D)
    if valid_BS is not None:
      logits_BMS = jnp.where(valid_BS[:, None, :], logits_BMS, -jnp.inf)
    m = jnp.max(logits_BMS, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(logits_BMS - m)
    a_BMS = e / jnp.maximum(e.sum(-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    pooled_BMC = jnp.einsum("BMS,BSMC->BMC", a_BMS.astype(dtype), v_BSV.reshape(B, S, M, -1))
    return pooled_BMC.reshape(B, Dv)
  q_BMNH = jnp.broadcast_to(queries[None, :, None, :], (B, M, 1, D))
  mask = None
  if valid_BS is not None:
    # Segment 1 = a real token; padding gets 0, which no query shares.
    mask = masks_lib.SegmentMask(jnp.ones((B, M), jnp.int32), valid_BS.astype(jnp.int32))
  o_BMNV = api_lib.dot_product_attention(
    q_BMNH, x_BSD[:, :, None, :], v_BSV[:, :, None, :], mask=mask, implementation=implementation
  )
  o_BMMC = o_BMNV[:, :, 0, :].reshape(B, M, M, Dv // M)
  return jnp.diagonal(o_BMMC, axis1=1, axis2=2).swapaxes(1, 2).reshape(B, Dv)


def init_efficient_probe(
  key, *, d_model: int, num_queries: int = 32, v_dim: int | None = None, dtype=jnp.float32
) -> dict[str, Array]:
  """``queries [M, D] ~ N(0, 1)`` (so q·x/√D starts at unit scale) and ``w_v [D, Dv]`` with
  fan-in scaling; ``v_dim`` (Dv) defaults to ``d_model`` rounded down to a multiple of M."""
  for name, value in (("d_model", d_model), ("num_queries", num_queries)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int; got {value!r}")
  Dv = v_dim if v_dim is not None else (d_model // num_queries) * num_queries
  if not isinstance(Dv, int) or Dv < num_queries or Dv % num_queries:
    raise ValueError(
      f"v_dim must be a positive multiple of num_queries={num_queries}; got {Dv!r} (with "
      f"d_model={d_model}, pass v_dim explicitly when d_model < num_queries)"
    )
  kq, kv = jax.random.split(key)
  return {
    "queries": jax.random.normal(kq, (num_queries, d_model), dtype),
    "w_v": jax.random.normal(kv, (d_model, Dv), dtype) / math.sqrt(d_model),
  }


def mha_probe_param_count(d_model: int) -> int:
  """Parameters of a one-query MHA pooling probe of width D: a learned query and the q, k, v
  and output projections with biases (the baseline the paper compares against)."""
  return d_model + 4 * (d_model * d_model + d_model)


registry.register(
  registry.Mechanism(
    id="efficient_probe",
    family="e",
    paper=PAPER,
    entry_point="attn_jax.attention.probe:efficient_probe",
    implementations=registry.KERNEL_IMPLEMENTATIONS,
    patterns=frozenset({registry.CROSS}),
    decode=False,
    tier=2,
    check="M = 1 without value splitting equals single-query attention pooling. The parameter "
    "count is below that of an MHA probe.",
    build=registry.build_nothing,
    module="attn_jax.nn.probe:EfficientProbe",
    interface="pool",
    init="attn_jax.attention.probe:init_efficient_probe",
  )
)
