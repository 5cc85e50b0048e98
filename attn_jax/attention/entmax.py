"""Learned-α entmax attention (catalog family (e), ``entmax``) as pure JAX functions.

"Adaptively Sparse Transformers".

Dimension key: B batch, T query length, S key/value length, N query heads, K kv heads,
H head dim, Hv value head dim, L the normalised axis.

α-entmax of a score row z (α > 1)::

    p_i = [(α − 1) z_i − τ]_+^(1/(α−1)),   τ such that Σ_i p_i = 1

α → 1 is softmax, α = 2 is sparsemax; for α > 1 rows get exact zeros. ``entmax`` finds τ by
bisection (halvings of the bracket [max − 1, max − L^(1−α)] of (α − 1) z, as many as the
score dtype has mantissa bits plus 2 — 25 in float32, 54 in float64 — after which the
midpoint no longer moves at the dtype's resolution, then a final renormalisation) and has a
custom VJP: with s_i = p_i^(2−α) on the support (0 off it),

    ∂L/∂z = s ⊙ g − s (sᵀg) / Σ s
    ∂L/∂α = Σ_i g_i [−p_i log p_i + s_i (z_i − τ')] / (α − 1),  τ' = (Σ s z − Σ p log p) / Σ s

(the second from differentiating p_i = u_i^(1/(α−1)), u_i = (α−1) z_i − τ, under Σ p = 1).
``sparsemax`` is the sort-based closed form of α = 2, used as the check.

``entmax_attention`` normalises scaled, masked logits row by row (masked entries get
p = 0; a fully masked row gives output 0) with α per head, α = 1 + sigmoid(a) ∈ (1, 2) for
the learned logit a (the paper's parametrisation; our reading). It materialises the
[B, N, T, S] scores: entmax needs the whole row to find τ, so there is no flash form here
(a two-pass blocked bisection is possible and not built) — ``implementations`` is
"reference" only.
"""

import typing

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from attn_jax.attention import _checks, registry
from attn_jax.attention import heads as heads_lib
from attn_jax.attention import masks as masks_lib

PAPER = "Adaptively Sparse Transformers"


def bisection_steps(dtype) -> int:
  """Halvings of a bracket of width <= 1 that reach ``dtype``'s resolution (mantissa + 2)."""
  return int(jnp.finfo(dtype).nmant) + 2


def _masked_max(z, valid):
  return jnp.max(jnp.where(valid, z, -jnp.inf), -1, keepdims=True)


def _entmax_forward(z, alpha, valid):
  """p and τ for rows of z (last axis); ``alpha`` broadcasts against z[..., :1]."""
  am1 = alpha - 1
  x = jnp.where(valid, am1 * z, -jnp.inf)
  n = jnp.maximum(jnp.sum(valid, -1, keepdims=True), 1).astype(z.dtype)
  top = _masked_max(x, valid)
  top = jnp.where(jnp.isfinite(top), top, 0)
  lo, hi = top - 1, top - n ** (-am1)  # Σp >= 1 at lo, <= 1 at hi

  def p_of(tau):
    return jnp.where(valid, jnp.maximum(x - tau, 0) ** (1 / am1), 0)

  def step(_, bounds):
    lo, hi = bounds
    mid = (lo + hi) / 2
    big = jnp.sum(p_of(mid), -1, keepdims=True) >= 1
    return jnp.where(big, mid, lo), jnp.where(big, hi, mid)

  lo, hi = jax.lax.fori_loop(0, bisection_steps(x.dtype), step, (lo, hi))
  tau = (lo + hi) / 2
  p = p_of(tau)
  p = p / jnp.maximum(jnp.sum(p, -1, keepdims=True), jnp.finfo(z.dtype).tiny)
  return p, tau


@jax.custom_vjp
def _entmax(z, alpha, valid):
  return _entmax_forward(z, alpha, valid)[0]


def _entmax_fwd(z, alpha, valid):
  p, _ = _entmax_forward(z, alpha, valid)
  return p, (p, z, alpha, valid)


def _entmax_bwd(res, g):
  p, z, alpha, valid = res
  am1 = alpha - 1
  support = p > 0
  s = jnp.where(support, p ** (2 - alpha), 0)
  s_sum = jnp.maximum(jnp.sum(s, -1, keepdims=True), jnp.finfo(p.dtype).tiny)
  dz = s * g - s * jnp.sum(s * g, -1, keepdims=True) / s_sum
  plogp = jnp.where(support, p * jnp.log(jnp.where(support, p, 1)), 0)
  zs = jnp.where(support, z, 0)
  tau_prime = (jnp.sum(s * zs, -1, keepdims=True) - jnp.sum(plogp, -1, keepdims=True)) / s_sum
  dp_dalpha = (-plogp + s * (zs - tau_prime)) / am1
  dalpha = jnp.sum(g * dp_dalpha, -1, keepdims=True)
  # Reduce to alpha's shape (it broadcasts against z[..., :1]).
  extra = dalpha.ndim - jnp.ndim(alpha)
  dalpha = jnp.sum(dalpha, axis=tuple(range(extra))) if extra > 0 else dalpha
  for axis, size in enumerate(jnp.shape(alpha)):
    if size == 1 and dalpha.shape[axis] != 1:
      dalpha = jnp.sum(dalpha, axis=axis, keepdims=True)
  return dz, dalpha.reshape(jnp.shape(alpha)), None


_entmax.defvjp(_entmax_fwd, _entmax_bwd)


def entmax(z: Float[Array, "... L"], alpha, *, valid: Array | None = None) -> Float[Array, "... L"]:
  """α-entmax over the last axis (see the module docstring). ``alpha`` > 1, a scalar or an
  array broadcasting against ``z[..., :1]``; ``valid`` (bool, like z) marks the entries that
  take part (others get 0; an all-invalid row is all 0)."""
  z = jnp.asarray(z)
  if not jnp.issubdtype(z.dtype, jnp.floating):
    raise ValueError(f"z must be floating; got {z.dtype}")
  alpha = jnp.asarray(alpha, z.dtype)
  if not isinstance(alpha, jax.core.Tracer) and np.any(np.asarray(alpha) <= 1):
    raise ValueError(f"alpha must be > 1 (alpha -> 1 is softmax); got {np.asarray(alpha)}")
  valid = jnp.ones(z.shape, bool) if valid is None else jnp.broadcast_to(valid, z.shape)
  return _entmax(z, alpha, valid)


def sparsemax(z: Float[Array, "... L"]) -> Float[Array, "... L"]:
  """The sort-based closed form of α = 2 (Euclidean projection onto the simplex)."""
  zs = jnp.sort(z, -1)[..., ::-1]
  k = jnp.arange(1, z.shape[-1] + 1, dtype=z.dtype)
  cums = jnp.cumsum(zs, -1)
  support = 1 + k * zs > cums
  k_z = jnp.sum(support, -1, keepdims=True)
  tau = (jnp.take_along_axis(cums, k_z - 1, -1) - 1) / k_z.astype(z.dtype)
  return jnp.maximum(z - tau, 0)


def alpha_from_logit(a):
  """α = 1 + sigmoid(a) ∈ (1, 2)."""
  return 1 + jax.nn.sigmoid(a)


def entmax_attention(
  q_BTNH: Float[Array, "B T N H"],
  k_BSKH: Float[Array, "B S K H"],
  v_BSKV: Float[Array, "B S K Hv"],
  alpha_N: Float[Array, " N"],
  *,
  mask: masks_lib.Mask | None = None,
  scale: float | None = None,
  return_probs: bool = False,
):
  """Attention with α-entmax rows (α per head, > 1) instead of softmax; materialised."""
  dims = _checks.check_qkv(q_BTNH, k_BSKH, v_BSKV)
  _checks.check_options(dims, mask=mask, bias=None, scale=scale, softcap=None, sinks=None)
  if tuple(np.shape(alpha_N)) != (dims.N,):
    raise ValueError(f"alpha_N must have shape ({dims.N},); got {np.shape(alpha_N)}")
  B, T, S, N, K, H, Hv = dims
  dtype = jnp.promote_types(q_BTNH.dtype, jnp.float32)
  G = N // K
  q = q_BTNH.astype(dtype).reshape(B, T, K, G, H)
  s = jnp.einsum("BTKGH,BSKH->BKGTS", q, k_BSKH.astype(dtype)).reshape(B, N, T, S)
  s = s * (H**-0.5 if scale is None else scale)
  valid = jnp.ones((B, N, T, S), bool)
  if mask is not None:
    mask.check_shapes(B, T, S)
    valid = valid & mask.dense(T, S)[:, None] if mask.batched else valid & mask.dense(T, S)
  p = entmax(s, alpha_N.astype(dtype)[:, None, None], valid=valid)
  v = v_BSKV.astype(dtype)
  out = jnp.einsum("BKGTS,BSKV->BTKGV", p.reshape(B, K, G, T, S), v).reshape(B, T, N, Hv)
  out = out.astype(q_BTNH.dtype)
  return (out, p) if return_probs else out


# ---------------------------------------------------------------------------------------
# The layer: MHA/GQA projections plus one α logit per head.
# ---------------------------------------------------------------------------------------

_NAMES = ("w_q", "w_k", "w_v", "w_o", "alpha_logit")


@typing.no_type_check
def entmax_layer(
  params,
  x_BTD: Float[Array, "B T D"],
  *,
  context_BSD: Float[Array, "B S D"] | None = None,
  causal: bool,
  implementation: str | None = None,
  mask=None,
  positions_BT: Int[Array, "B T"] | None = None,
  rope=None,
):
  """Adaptively sparse attention layer (Adaptively Sparse Transformers): the GQA
  projections of ``attn_jax.attention.heads`` with α-entmax rows, α_n = 1 + sigmoid(a_n).

  Args:
    params: ``init_entmax`` pytree (``w_q``, ``w_k``, ``w_v``, ``w_o``, ``alpha_logit [N]``).
    implementation: None or "reference" (entmax has no flash form here).
    Other arguments as every layer function (``attn_jax.attention.heads``).
  """
  if implementation not in (None, "reference"):
    raise NotImplementedError(
      f"entmax implementation {implementation!r} is not built: the normaliser needs the whole "
      "row (bisection over τ), so only the materialised 'reference' path exists"
    )
  if not isinstance(params, dict) or set(params) != set(_NAMES):
    got = sorted(params) if isinstance(params, dict) else type(params)
    raise ValueError(f"entmax params must hold {sorted(_NAMES)}; got {got}")
  base = {k: params[k] for k in _NAMES[:4]}
  dims = heads_lib.static_dims(base, "gqa")
  if tuple(np.shape(params["alpha_logit"])) != (dims.N,):
    raise ValueError(
      f"params['alpha_logit'] must have shape ({dims.N},); got {np.shape(params['alpha_logit'])}"
    )
  call = heads_lib._check_call(dims.D, x_BTD, context_BSD, causal, mask, positions_BT, rope)
  q, k, v = heads_lib._static_qkv(base, x_BTD, call.src_BSD, call)
  o = entmax_attention(q, k, v, alpha_from_logit(params["alpha_logit"]), mask=call.mask)
  return heads_lib.output_projection(base, o)


def param_specs(
  *,
  d_model: int,
  num_heads: int,
  num_kv_heads: int | None = None,
  head_dim: int | None = None,
  v_head_dim: int | None = None,
) -> dict:
  """The GQA projections (K default N) and ``alpha_logit [N]`` at 0 (α = 1.5, the paper's
  starting point; our reading)."""
  specs = heads_lib.param_specs(
    "head_dims",
    d_model=d_model,
    num_heads=num_heads,
    num_kv_heads=num_kv_heads,
    head_dim=head_dim,
    v_head_dim=v_head_dim,
  )
  N = specs["w_q"][0][1]
  specs["alpha_logit"] = ((N,), lambda key, shape, dtype: jnp.zeros(shape, dtype), ("heads",))
  return specs


init_entmax = heads_lib.make_init("entmax", ("v_head_dim",), param_specs)


registry.register(
  registry.Mechanism(
    id="entmax",
    family="e",
    paper=PAPER,
    entry_point="attn_jax.attention.entmax:entmax_layer",
    implementations=("reference",),
    patterns=registry.ALL_PATTERNS,
    decode=False,
    tier=2,
    check="α → 1 matches softmax, and α = 2 matches sparsemax's sort-based closed form. Exact "
    "zeros appear. The custom gradient equals finite differences. (Materialised rows only: no "
    "blocked form built.)",
    build=registry.build_nothing,
    module="attn_jax.nn.entmax:EntmaxAttention",
    interface="layer",
    init="attn_jax.attention.entmax:init_entmax",
  )
)
