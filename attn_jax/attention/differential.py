"""Differential attention (catalog family (e), ``diff_attn``) as a pure JAX function.

"Differential Transformer" (the formula as restated in "Grouped Differential Attention"),
and ``grouped_diff_attn`` from "Grouped Differential Attention".

Dimension key: B batch, T query length, S key/value length, D model dim, N differential
heads, K kv heads (N % K == 0), h the half head dim of q and k, V = 2h the value head dim.

Each head has two query halves and two key halves and one value of width 2h::

    A_i = softmax(q_i k_iᵀ / sqrt(h))               i = 1, 2
    o   = (A_1 − λ A_2) v = A_1 v − λ A_2 v
    y   = Σ_n (1 − λ_init) · RMSNorm_n(o_n) W_O,n

    λ      = exp(λ_q1 · λ_k1) − exp(λ_q2 · λ_k2) + λ_init
    λ_init = 0.8 − 0.6 · exp(−0.3 · (l − 1))          for layer l = 1, 2, ...

with λ_q1, λ_k1, λ_q2, λ_k2 ∈ R^h shared by the heads of a layer and the RMS normalisation
taken per head over its 2h outputs with a learned scale (our reading where accounts differ:
shared λ vectors and an affine per-head RMSNorm, eps 1e-5).

Fast path: one ``dot_product_attention`` call with 2N query heads ([q_1 heads, q_2 heads])
against 2K kv heads ([k_1 heads, k_2 heads], the values repeated once), so the kernel's GQA
map pairs q_1 with k_1 and q_2 with k_2; the difference is taken on the two outputs. No
T×S map is ever formed; the cost is one extra copy of V (2K value heads instead of K).

**grouped_diff_attn.** N signal heads share Nn = N / r noise heads (r the ratio, GQA-style):
head i subtracts the map of noise head g(i) = i // r (our reading of the grouping)::

    o_i = softmax(q_i^s k_i^sᵀ / sqrt(h)) v_i − λ softmax(q_g(i)^n k_g(i)^nᵀ / sqrt(h)) v_i

then the same RMSNorm, (1 − λ_init) and output projection. Two attention calls: the signal
heads (N maps), and the noise heads with the values of their r signal heads concatenated
along the feature axis (Nn maps of width r·2h), so each noise map is computed once. Ratio
1:1 is ``diff_attn`` with K = N. The paper's group-differentiated growth (replicating signal
heads to scale a trained model) is not built.
"""

import math
import typing

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from attn_jax.attention import api as api_lib
from attn_jax.attention import heads as heads_lib
from attn_jax.attention import reference, registry

PAPER = "Differential Transformer"
_NAMES = ("w_q", "w_k", "w_v", "w_o", "lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2", "norm")
RMS_EPS = 1e-5


def lambda_init(layer_index: int) -> float:
  """λ_init = 0.8 − 0.6 exp(−0.3 (l − 1)) for the 1-based layer index l."""
  l = heads_lib._int("layer_index", layer_index, 1)
  return 0.8 - 0.6 * math.exp(-0.3 * (l - 1))


def differential_heads(
  q1_BTNH: Float[Array, "B T N h"],
  k1_BSKH: Float[Array, "B S K h"],
  q2_BTNH: Float[Array, "B T N h"],
  k2_BSKH: Float[Array, "B S K h"],
  v_BSKV: Float[Array, "B S K V"],
  lam,
  *,
  mask=None,
  implementation: str | None = None,
) -> Float[Array, "B T N V"]:
  """``A_1 v − λ A_2 v`` per head as one attention call (see the module docstring);
  ``lam`` is a scalar or broadcasts against ``[B, T, N, 1]``."""
  if q1_BTNH.shape != q2_BTNH.shape or k1_BSKH.shape != k2_BSKH.shape:
    raise ValueError(
      f"the two halves must have equal shapes; got q {q1_BTNH.shape} / {q2_BTNH.shape}, "
      f"k {k1_BSKH.shape} / {k2_BSKH.shape}"
    )
  N = q1_BTNH.shape[2]
  q = jnp.concatenate([q1_BTNH, q2_BTNH], axis=2)
  k = jnp.concatenate([k1_BSKH, k2_BSKH], axis=2)
  v = jnp.concatenate([v_BSKV, v_BSKV], axis=2)
  o = api_lib.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
  lam = jnp.asarray(lam, o.dtype)
  return o[:, :, :N] - lam * o[:, :, N:]


class DiffDims(typing.NamedTuple):
  D: int
  N: int
  K: int
  h: int


def diff_dims(params) -> DiffDims:
  if not isinstance(params, dict) or set(params) != set(_NAMES):
    got = sorted(params) if isinstance(params, dict) else type(params)
    raise ValueError(f"diff_attn params must hold {sorted(_NAMES)}; got {got}")
  shapes = {n: tuple(np.shape(params[n])) for n in _NAMES}
  if len(shapes["w_q"]) != 4 or shapes["w_q"][2] != 2:
    raise ValueError(f"params['w_q'] must have shape [D, N, 2, h]; got {shapes['w_q']}")
  D, N, _, h = shapes["w_q"]
  K = shapes["w_k"][1] if len(shapes["w_k"]) == 4 else -1
  want = {
    "w_k": (D, K, 2, h),
    "w_v": (D, K, 2 * h),
    "w_o": (N, 2 * h, D),
    "norm": (2 * h,),
    **{n: (h,) for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")},
  }
  for name, shape in want.items():
    if shapes[name] != shape or K < 1:
      raise ValueError(f"params[{name!r}] must have shape {shape}; got {shapes[name]}")
  if N % K:
    raise ValueError(f"kv heads K={K} must divide the heads N={N}")
  return DiffDims(D, N, K, h)


def diff_lambda(params, layer_index: int) -> Float[Array, ""]:
  """λ = exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init (at least float32)."""
  dtype = jnp.promote_types(params["lambda_q1"].dtype, jnp.float32)
  f = {n: params[n].astype(dtype) for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")}
  return (
    jnp.exp(jnp.dot(f["lambda_q1"], f["lambda_k1"]))
    - jnp.exp(jnp.dot(f["lambda_q2"], f["lambda_k2"]))
    + lambda_init(layer_index)
  )


def _rms_norm(x, scale):
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  xf = x.astype(dtype)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + RMS_EPS)
  return (y * scale.astype(dtype)).astype(x.dtype)


@typing.no_type_check
def diff_attn(
  params,
  x_BTD: Float[Array, "B T D"],
  *,
  context_BSD: Float[Array, "B S D"] | None = None,
  causal: bool,
  implementation: str | None = None,
  mask=None,
  positions_BT: Int[Array, "B T"] | None = None,
  rope=None,
  layer_index: int = 1,
  return_aux: bool = False,
):
  """Differential attention (Differential Transformer); see the module docstring.

  Args:
    params: ``init_diff_attn`` pytree: ``w_q [D, N, 2, h]``, ``w_k [D, K, 2, h]``,
      ``w_v [D, K, 2h]``, ``w_o [N, 2h, D]``, ``lambda_q1``/``k1``/``q2``/``k2 [h]``,
      ``norm [2h]`` (the per-head RMSNorm scale).
    x_BTD, context_BSD, causal, implementation, mask, positions_BT, rope: as every layer
      function (``attn_jax.attention.heads``); RoPE rotates each half.
    layer_index: the 1-based depth l of the layer (sets λ_init).
    return_aux: also return ``{"lambda": λ}``.
  """
  dims = diff_dims(params)
  call = heads_lib._check_call(dims.D, x_BTD, context_BSD, causal, mask, positions_BT, rope)
  dtype = x_BTD.dtype
  q = jnp.einsum("BTD,DNIh->BTNIh", x_BTD, params["w_q"].astype(dtype))
  k = jnp.einsum("BSD,DKIh->BSKIh", call.src_BSD, params["w_k"].astype(dtype))
  v = jnp.einsum("BSD,DKV->BSKV", call.src_BSD, params["w_v"].astype(dtype))
  q1, q2 = (heads_lib._rotate(q[:, :, :, i], call.q_pos_BT, call.rope) for i in (0, 1))
  k1, k2 = (heads_lib._rotate(k[:, :, :, i], call.kv_pos_BS, call.rope) for i in (0, 1))
  lam = diff_lambda(params, layer_index)
  o = differential_heads(q1, k1, q2, k2, v, lam, mask=call.mask, implementation=implementation)
  o = _rms_norm(o, params["norm"]) * jnp.asarray(1 - lambda_init(layer_index), o.dtype)
  y = heads_lib.output_projection(params, o)
  return heads_lib._finish(y, {"lambda": lam}, return_aux)


def diff_attn_probs(
  params,
  x_BTD: Float[Array, "B T D"],
  *,
  causal: bool,
  mask=None,
  positions_BT: Int[Array, "B T"] | None = None,
  rope=None,
  layer_index: int = 1,
) -> Float[Array, "B N T T"]:
  """The differential map ``A_1 − λ A_2`` per head, materialised (self-attention; for
  inspection and plots: rows sum to 1 − λ and may hold negative weights)."""
  dims = diff_dims(params)
  call = heads_lib._check_call(dims.D, x_BTD, None, causal, mask, positions_BT, rope)
  dtype = x_BTD.dtype
  q = jnp.einsum("BTD,DNIh->BTNIh", x_BTD, params["w_q"].astype(dtype))
  k = jnp.einsum("BSD,DKIh->BSKIh", x_BTD, params["w_k"].astype(dtype))
  maps = []
  for i in (0, 1):
    qi = heads_lib._rotate(q[:, :, :, i], call.q_pos_BT, call.rope)
    ki = heads_lib._rotate(k[:, :, :, i], call.kv_pos_BS, call.rope)
    v = jnp.zeros(ki.shape[:3] + (1,), dtype)
    _, probs = reference.attention_reference(qi, ki, v, mask=call.mask, return_probs=True)
    maps.append(probs)
  return maps[0] - diff_lambda(params, layer_index).astype(maps[0].dtype) * maps[1]


# ---------------------------------------------------------------------------------------
# grouped_diff_attn
# ---------------------------------------------------------------------------------------

_GROUPED = ("w_q_s", "w_k_s", "w_q_n", "w_k_n", "w_v", "w_o") + _NAMES[4:]


def grouped_differential_heads(
  qs_BTNH: Float[Array, "B T N h"],
  ks_BSNH: Float[Array, "B S N h"],
  qn_BTMH: Float[Array, "B T Nn h"],
  kn_BSMH: Float[Array, "B S Nn h"],
  v_BSNV: Float[Array, "B S N V"],
  lam,
  *,
  mask=None,
  implementation: str | None = None,
) -> Float[Array, "B T N V"]:
  """``A_i^s v_i − λ A_(i // r)^n v_i`` as two calls; the noise call reads the r values of
  each group concatenated, so every noise map is computed once."""
  B, T, N, _ = qs_BTNH.shape
  S, Nn, V = v_BSNV.shape[1], qn_BTMH.shape[2], v_BSNV.shape[3]
  if N % Nn or kn_BSMH.shape[2] != Nn or ks_BSNH.shape[2] != N or v_BSNV.shape[2] != N:
    raise ValueError(
      f"signal q/k/v need N heads and noise q/k Nn heads with Nn dividing N; got q_s "
      f"{qs_BTNH.shape}, k_s {ks_BSNH.shape}, q_n {qn_BTMH.shape}, k_n {kn_BSMH.shape}, "
      f"v {v_BSNV.shape}"
    )
  r = N // Nn
  o_s = api_lib.dot_product_attention(
    qs_BTNH, ks_BSNH, v_BSNV, mask=mask, implementation=implementation
  )
  v_cat = v_BSNV.reshape(B, S, Nn, r * V)
  o_n = api_lib.dot_product_attention(
    qn_BTMH, kn_BSMH, v_cat, mask=mask, implementation=implementation
  ).reshape(B, T, N, V)
  return o_s - jnp.asarray(lam, o_s.dtype) * o_n


def grouped_dims(params) -> tuple[int, int, int, int]:
  """(D, N, Nn, h) of grouped_diff_attn params, every array checked."""
  if not isinstance(params, dict) or set(params) != set(_GROUPED):
    got = sorted(params) if isinstance(params, dict) else type(params)
    raise ValueError(f"grouped_diff_attn params must hold {sorted(_GROUPED)}; got {got}")
  shapes = {n: tuple(np.shape(params[n])) for n in _GROUPED}
  if len(shapes["w_q_s"]) != 3 or len(shapes["w_q_n"]) != 3:
    raise ValueError(
      f"w_q_s / w_q_n must be [D, heads, h]; got {shapes['w_q_s']}, {shapes['w_q_n']}"
    )
  D, N, h = shapes["w_q_s"]
  Nn = shapes["w_q_n"][1]
  want = {
    "w_k_s": (D, N, h),
    "w_q_n": (D, Nn, h),
    "w_k_n": (D, Nn, h),
    "w_v": (D, N, 2 * h),
    "w_o": (N, 2 * h, D),
    "norm": (2 * h,),
    **{n: (h,) for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")},
  }
  for name, shape in want.items():
    if shapes[name] != shape:
      raise ValueError(f"params[{name!r}] must have shape {shape}; got {shapes[name]}")
  if Nn < 1 or N % Nn:
    raise ValueError(f"noise heads Nn={Nn} must divide the signal heads N={N}")
  return D, N, Nn, h


@typing.no_type_check
def grouped_diff_attn(
  params,
  x_BTD: Float[Array, "B T D"],
  *,
  context_BSD: Float[Array, "B S D"] | None = None,
  causal: bool,
  implementation: str | None = None,
  mask=None,
  positions_BT: Int[Array, "B T"] | None = None,
  rope=None,
  layer_index: int = 1,
  return_aux: bool = False,
):
  """Grouped differential attention (Grouped Differential Attention); see the module
  docstring. Params (``init_grouped_diff_attn``): ``w_q_s``/``w_k_s [D, N, h]``,
  ``w_q_n``/``w_k_n [D, Nn, h]``, ``w_v [D, N, 2h]``, ``w_o [N, 2h, D]``, the λ vectors and
  ``norm`` as ``diff_attn``. Other arguments as ``diff_attn``."""
  D, _, _, _ = grouped_dims(params)
  call = heads_lib._check_call(D, x_BTD, context_BSD, causal, mask, positions_BT, rope)
  dtype = x_BTD.dtype

  def proj(name, src, pos):
    out = jnp.einsum("BLD,DNh->BLNh", src, params[name].astype(dtype))
    return heads_lib._rotate(out, pos, call.rope)

  qs, qn = (proj(n, x_BTD, call.q_pos_BT) for n in ("w_q_s", "w_q_n"))
  ks, kn = (proj(n, call.src_BSD, call.kv_pos_BS) for n in ("w_k_s", "w_k_n"))
  v = jnp.einsum("BSD,DNV->BSNV", call.src_BSD, params["w_v"].astype(dtype))
  lam = diff_lambda(params, layer_index)
  o = grouped_differential_heads(
    qs, ks, qn, kn, v, lam, mask=call.mask, implementation=implementation
  )
  o = _rms_norm(o, params["norm"]) * jnp.asarray(1 - lambda_init(layer_index), o.dtype)
  y = heads_lib.output_projection(params, o)
  return heads_lib._finish(y, {"lambda": lam}, return_aux)


def default_ratio(num_heads: int) -> int:
  """4:1 when 4 divides N, else 3:1, 2:1, 1:1 (the paper found 3:1–4:1 best)."""
  return next(r for r in (4, 3, 2, 1) if num_heads % r == 0)


def grouped_param_specs(
  *,
  d_model: int,
  num_heads: int,
  head_dim: int | None = None,
  gdiff_ratio: int | None = None,
) -> dict:
  """Specs of ``grouped_diff_attn``: N = ``num_heads`` signal heads, Nn = N / r noise heads
  (r = ``gdiff_ratio``, default ``default_ratio(N)``), h as ``param_specs``."""
  base = param_specs(d_model=d_model, num_heads=num_heads, head_dim=head_dim)
  (D, N, _, h) = base["w_q"][0]
  r = heads_lib._opt("gdiff_ratio", gdiff_ratio, default_ratio(N))
  if N % r:
    raise ValueError(f"gdiff_ratio={r} must divide num_heads={N}")
  fan_in = heads_lib._fan_in(D)
  specs = {
    "w_q_s": ((D, N, h), fan_in, ("embed", "heads", None)),
    "w_k_s": ((D, N, h), fan_in, ("embed", "heads", None)),
    "w_q_n": ((D, N // r, h), fan_in, ("embed", None, None)),
    "w_k_n": ((D, N // r, h), fan_in, ("embed", None, None)),
  }
  specs["w_v"] = ((D, N, 2 * h), fan_in, ("embed", "heads", None))
  for name in ("w_o",) + _NAMES[4:]:
    specs[name] = base[name]
  return specs


def param_specs(
  *,
  d_model: int,
  num_heads: int,
  num_kv_heads: int | None = None,
  head_dim: int | None = None,
) -> dict:
  """``{name: (shape, init, logical_axes)}``. ``head_dim`` is the half dim h (default
  D // (2N), so q/k/v widths match an N-head MHA of head dim 2h); K defaults to N. λ vectors
  start N(0, 0.1²) (as in the paper's code), the norm scale at 1."""
  D = heads_lib._int("d_model", d_model, 1)
  N = heads_lib._int("num_heads", num_heads, 1)
  K = heads_lib._opt("num_kv_heads", num_kv_heads, N)
  h = heads_lib._opt("head_dim", head_dim, D // (2 * N))
  if h < 1:
    raise ValueError(f"head_dim must be >= 1; got D // (2N) = {D} // {2 * N} = 0 (pass head_dim)")
  if N % K:
    raise ValueError(f"num_kv_heads={K} must divide num_heads={N}")
  fan_in = heads_lib._fan_in
  return {
    "w_q": ((D, N, 2, h), fan_in(D), ("embed", "heads", None, None)),
    "w_k": ((D, K, 2, h), fan_in(D), ("embed", "kv_heads", None, None)),
    "w_v": ((D, K, 2 * h), fan_in(D), ("embed", "kv_heads", None)),
    "w_o": ((N, 2 * h, D), fan_in(N * 2 * h), ("heads", None, "embed")),
    **{
      n: ((h,), heads_lib._normal_init(0.1), (None,))
      for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")
    },
    "norm": ((2 * h,), lambda key, shape, dtype: jnp.ones(shape, dtype), (None,)),
  }


init_diff_attn = heads_lib.make_init("diff_attn", ("layer_index",), param_specs, ("layer_index",))


def _grouped_specs(*, num_kv_heads=None, **kwargs):
  if num_kv_heads not in (None, -1):
    raise ValueError(
      "grouped_diff_attn takes gdiff_ratio (signal:noise heads), not num_kv_heads; got "
      f"num_kv_heads={num_kv_heads}"
    )
  return grouped_param_specs(**kwargs)


init_grouped_diff_attn = heads_lib.make_init(
  "grouped_diff_attn", ("layer_index", "gdiff_ratio"), _grouped_specs, ("layer_index",)
)


def _build(key, dims, causal):
  del key, dims, causal
  return {"layer_index": 3}


CHECKS = {
  "diff_attn": "λ = 0 without the normalisation equals standard attention on the first half. "
  "The one-call form equals the materialised difference of maps.",
  "grouped_diff_attn": "Ratio 1:1 equals `diff_attn`. Shared noise maps equal repeating the "
  "noise heads. (Group-differentiated growth not built.)",
}

for _kind, _tier in (("diff_attn", 1), ("grouped_diff_attn", 2)):
  registry.register(
    registry.Mechanism(
      id=_kind,
      family="e",
      paper=PAPER if _kind == "diff_attn" else "Grouped Differential Attention",
      entry_point=f"attn_jax.attention.differential:{_kind}",
      implementations=registry.KERNEL_IMPLEMENTATIONS,
      patterns=registry.ALL_PATTERNS,
      decode=False,
      tier=_tier,
      check=CHECKS[_kind],
      build=_build,
      module="attn_jax.nn.differential:DiffAttention",
      interface="layer",
      init=f"attn_jax.attention.differential:init_{_kind}",
    )
  )
