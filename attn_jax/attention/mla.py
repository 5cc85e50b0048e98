"""Multi-head latent attention (MLA) and its absorbed decode form, as pure JAX functions.

Papers: "DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language Model"
(MLA), and "The New LLM Bottleneck: A Systems Perspective on Latent Attention and
Mixture-of-Experts" (absorbed decode, arithmetic intensity).

Dimension key: B batch, T query length, S key/value length, D model dim, N heads,
C latent dim d_c (``kv_lora_rank``), Q query latent dim d_c' (``q_lora_rank``; 0 = full-rank
queries), P non-rotary q/k head dim (``qk_nope_head_dim``), R decoupled rotary dim d_R
(``qk_rope_head_dim``), V value head dim Hv (``v_head_dim``).

Equations (DeepSeek-V2, Sec. 2.1), per token t (h_t the layer input) and head n::

    c_t   = W_DKV h_t                          latent, C numbers       } the whole KV cache:
    k^R_t = RoPE(W_KR h_t)                     shared rotary key, R    } C + R per token
    k_t,n = [W_UK,n c_t ; k^R_t]               key, P + R
    v_t,n = W_UV,n c_t                         value, V
    c^Q_t = W_DQ h_t                           (low-rank queries; full rank: c^Q_t = h_t)
    q_t,n = [W_UQ,n c^Q_t ; RoPE(W_QR,n c^Q_t)]  query, P + R
    o_t,n = Σ_j softmax_j(q_t,n · k_j,n / sqrt(P + R)) v_j,n
    y_t   = Σ_n W_O,n o_t,n

``mla`` computes this "expanded" form: per-head keys and values up-projected from the latent,
one ``dot_product_attention`` call with H = P + R and Hv = V.

Absorbed form (The New LLM Bottleneck, Sec. 2): because q^C·(W_UK,n c_j) = (W_UK,nᵀ q^C)·c_j,
fold W_UK,n into the query, q'_t,n = [W_UK,nᵀ q^C_t,n ; q^R_t,n] (C + R), and let every head
attend over the shared cache [c_j ; k^R_j] with value c_j: ONE MQA call (K = 1, H = C + R,
Hv = C) with the unabsorbed scale 1/sqrt(P + R). W_UV,n folds into the output projection:
y_t = Σ_n W_O,n W_UV,n ō_t,n, applied in factored order (W_UV,n first, then W_O,n), which is
cheaper than the product matrix whenever V·(C + D) < C·D. ``mla_absorbed`` runs every query
this way (prefill as MQA over the latent cache); ``mla_absorbed_decode`` appends new tokens to
a cache and attends. Both equal the expanded form (tested in float64).

Positions. The decoupled rotary parts q^R and k^R are MLA's own position path: they are
always rotated (``rope=None`` means base 10000 over all R dims; a ``rope`` dict sets ``base``
and a partial ``rotary_dim <= R``), whatever positional scheme the rest of the model uses.
The non-rotary parts are never rotated (that is what keeps absorption possible). R = 0 gives
MLA with no positional encoding at all. Self-attention rotates queries and keys at
``positions_BT`` (default ``arange(T)``); cross-attention rotates keys at ``arange(S)`` and
queries at ``positions_BT`` (default ``S − T + arange(T)``: bottom-right aligned, as masks
align queries).

Not included: the RMSNorms DeepSeek-V2 puts on c^Q and c_t, and YaRN's attention-scale
correction (both absent from the equations above; the norms would break the "W_DKV = I
reproduces MHA" identity).

The public functions validate by hand (a ``ValueError`` naming the argument, what it got and
what it needs) and are left to that check (``typing.no_type_check``); the helpers they call
carry jaxtyping shapes.
"""

import math
import typing
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from attn_jax.attention import api as api_lib
from attn_jax.attention import masks as masks_lib
from attn_jax.attention import registry
from attn_jax.attention import rope as rope_lib

PAPER_MLA = "DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language Model"
PAPER_ABSORBED = (
  "The New LLM Bottleneck: A Systems Perspective on Latent Attention and Mixture-of-Experts"
)
DEFAULT_ROPE_BASE = rope_lib.DEFAULT_BASE
# Options of init_mla; None (or -1, the config form) derives the size from head_dim.
OPTION_KEYS = (
  "kv_lora_rank",
  "q_lora_rank",
  "qk_nope_head_dim",
  "qk_rope_head_dim",
  "v_head_dim",
)


class MLADims(NamedTuple):
  """Sizes of an MLA layer (see the module's dimension key)."""

  D: int
  N: int
  C: int
  Q: int
  P: int
  R: int
  V: int

  @property
  def scale(self) -> float:
    """The softmax scale of both forms: that of the unabsorbed head dim P + R."""
    return 1.0 / math.sqrt(self.P + self.R)


# ---------------------------------------------------------------------------------------
# Sizes and parameters.
# ---------------------------------------------------------------------------------------


def _int_option(name, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}; got {value}")
  return int(value)


def resolve_dims(
  *,
  d_model: int,
  num_heads: int,
  head_dim: int | None = None,
  kv_lora_rank: int | None = None,
  q_lora_rank: int | None = 0,
  qk_nope_head_dim: int | None = None,
  qk_rope_head_dim: int | None = None,
  v_head_dim: int | None = None,
) -> MLADims:
  """Resolves the sizes; None or -1 take DeepSeek-V2's ratios to the head dim.

  ``head_dim`` (default ``d_model // num_heads``) = d_h; then P = d_h, R = d_h / 2 (rounded
  down to even), C = 4·d_h, V = d_h, Q = 0 (full-rank queries).
  """
  d_model = _int_option("d_model", d_model, 1)
  num_heads = _int_option("num_heads", num_heads, 1)
  if head_dim is None:
    head_dim = d_model // num_heads
  head_dim = _int_option("head_dim", head_dim, 1)

  def pick(name, value, default, minimum):
    return default if value is None or value == -1 else _int_option(name, value, minimum)

  dims = MLADims(
    D=d_model,
    N=num_heads,
    C=pick("kv_lora_rank", kv_lora_rank, 4 * head_dim, 1),
    Q=pick("q_lora_rank", q_lora_rank, 0, 0),
    P=pick("qk_nope_head_dim", qk_nope_head_dim, head_dim, 1),
    R=pick("qk_rope_head_dim", qk_rope_head_dim, 2 * (head_dim // 4), 0),
    V=pick("v_head_dim", v_head_dim, head_dim, 1),
  )
  if dims.R % 2:
    raise ValueError(f"qk_rope_head_dim must be even (RoPE rotates pairs); got {dims.R}")
  return dims


def param_specs(dims: MLADims) -> dict[str, tuple[tuple[int, ...], int, tuple]]:
  """``{name: (shape, fan_in, logical_axes)}`` of the parameters for ``dims``.

  Low-rank queries (Q > 0) have ``w_dq``/``w_uq``, full-rank ones ``w_q``; the rotary
  projections ``w_qr``/``w_kr`` exist only when R > 0.
  """
  D, N, C, Q, P, R, V = dims
  specs = {}
  if Q:
    specs["w_dq"] = ((D, Q), D, ("embed", None))
    specs["w_uq"] = ((Q, N, P), Q, (None, "heads", None))
    if R:
      specs["w_qr"] = ((Q, N, R), Q, (None, "heads", None))
  else:
    specs["w_q"] = ((D, N, P), D, ("embed", "heads", None))
    if R:
      specs["w_qr"] = ((D, N, R), D, ("embed", "heads", None))
  specs["w_dkv"] = ((D, C), D, ("embed", None))
  if R:
    specs["w_kr"] = ((D, R), D, ("embed", None))
  specs["w_uk"] = ((C, N, P), C, (None, "heads", None))
  specs["w_uv"] = ((C, N, V), C, (None, "heads", None))
  specs["w_o"] = ((N, V, D), N * V, ("heads", None, "embed"))
  return specs


def init_mla(
  key,
  *,
  d_model: int,
  num_heads: int,
  num_kv_heads: int | None = None,
  head_dim: int | None = None,
  dtype=jnp.float32,
  **options,
) -> dict[str, Array]:
  """Parameters of ``mla`` / ``mla_absorbed``: truncated normals with std 1/sqrt(fan_in).

  Args:
    key: PRNG key.
    d_model, num_heads, head_dim: D, N and d_h (default D // N).
    num_kv_heads: ignored (MLA's keys and values come from one shared latent); accepted so
      every layer-interface init takes the same arguments.
    dtype: parameter dtype.
    options: ``kv_lora_rank``, ``q_lora_rank``, ``qk_nope_head_dim``, ``qk_rope_head_dim``,
      ``v_head_dim`` (see ``resolve_dims`` for the defaults).

  Returns:
    A dict of arrays (see ``param_specs``).
  """
  unknown = set(options) - set(OPTION_KEYS)
  if unknown:
    raise ValueError(f"unknown MLA options {sorted(unknown)}; known: {OPTION_KEYS}")
  del num_kv_heads
  dims = resolve_dims(d_model=d_model, num_heads=num_heads, head_dim=head_dim, **options)
  specs = param_specs(dims)
  keys = jax.random.split(key, len(specs))
  return {
    name: jax.random.truncated_normal(k, -2.0, 2.0, shape, dtype) * (fan_in**-0.5)
    for k, (name, (shape, fan_in, _)) in zip(keys, specs.items(), strict=True)
  }


init_mla_absorbed = init_mla


def mla_dims(params) -> MLADims:
  """The sizes of ``params``, validated (ValueError for missing keys or mismatched shapes)."""
  if not isinstance(params, dict):
    raise ValueError(f"params must be a dict of arrays (see init_mla); got {type(params).__name__}")
  for name in ("w_dkv", "w_uk", "w_uv", "w_o"):
    if name not in params:
      raise ValueError(f"params must hold {name!r} (see init_mla); got keys {sorted(params)}")
  if ("w_q" in params) == ("w_dq" in params):
    raise ValueError(
      "params must hold either 'w_q' (full-rank queries) or 'w_dq' and 'w_uq' (low-rank "
      f"queries); got keys {sorted(params)}"
    )
  for name, rank in (("w_dkv", 2), ("w_uk", 3), ("w_uv", 3), ("w_dq", 2), ("w_kr", 2)):
    if name in params and np.ndim(params[name]) != rank:
      raise ValueError(
        f"params[{name!r}] must have rank {rank} (see param_specs); got shape "
        f"{np.shape(params[name])}"
      )
  D, C = np.shape(params["w_dkv"])
  _, N, P = np.shape(params["w_uk"])
  V = np.shape(params["w_uv"])[-1]
  Q = np.shape(params["w_dq"])[1] if "w_dq" in params else 0
  R = np.shape(params["w_kr"])[1] if "w_kr" in params else 0
  dims = MLADims(D, N, C, Q, P, R, V)
  specs = param_specs(dims)
  if set(specs) != set(params):
    raise ValueError(
      f"params must hold exactly {sorted(specs)} for sizes {dims}; got {sorted(params)}"
    )
  for name, (shape, _, _) in specs.items():
    if tuple(np.shape(params[name])) != shape:
      raise ValueError(
        f"params[{name!r}] must have shape {shape} for sizes {dims}; got "
        f"{tuple(np.shape(params[name]))}"
      )
  return dims


# ---------------------------------------------------------------------------------------
# Validation of calls.
# ---------------------------------------------------------------------------------------


def _check_tokens(name: str, x, D: int, layout: str):
  if not hasattr(x, "shape") or not hasattr(x, "dtype") or x.ndim != 3:
    raise ValueError(f"{name} must be an array of shape {layout}; got {np.shape(x)}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must have a floating dtype; got {x.dtype}")
  if x.shape[2] != D:
    raise ValueError(f"{name} must have model dim D={D} (params); got shape {tuple(x.shape)}")
  if x.shape[1] == 0:
    raise ValueError(f"{name} must hold at least one token; got shape {tuple(x.shape)}")


def resolve_rope(rope, R: int) -> tuple[float, int]:
  """Resolves ``rope`` (None or dict(base=..., rotary_dim=...)) to (base, rotary_dim)."""
  if rope is None:
    return DEFAULT_ROPE_BASE, R
  if not isinstance(rope, dict) or set(rope) - {"base", "rotary_dim"}:
    raise ValueError(f"rope must be None or a dict with keys 'base', 'rotary_dim'; got {rope!r}")
  base = rope.get("base", DEFAULT_ROPE_BASE)
  if isinstance(base, bool) or not isinstance(base, (int, float, np.integer, np.floating)):
    raise ValueError(f"rope['base'] must be a float > 0; got {base!r}")
  if not (math.isfinite(base) and base > 0):
    raise ValueError(f"rope['base'] must be finite and > 0; got {base}")
  rotary_dim = rope.get("rotary_dim")
  rotary_dim = R if rotary_dim is None else rotary_dim
  if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, (int, np.integer)):
    raise ValueError(f"rope['rotary_dim'] must be an int or None; got {rotary_dim!r}")
  if not 0 <= rotary_dim <= R or rotary_dim % 2:
    raise ValueError(
      f"rope['rotary_dim'] must be even and in [0, qk_rope_head_dim={R}] (MLA rotates only "
      f"its decoupled dims); got {rotary_dim}"
    )
  return base, int(rotary_dim)


def _positions(positions, name: str, B: int, L: int, default):
  if positions is None:
    return jnp.broadcast_to(default, (B, L))
  if not hasattr(positions, "shape"):
    positions = np.asarray(positions)
  if not jnp.issubdtype(positions.dtype, jnp.integer):
    raise ValueError(f"{name} must have an integer dtype; got {positions.dtype}")
  if tuple(positions.shape) not in ((B, L), (L,)):
    raise ValueError(f"{name} must have shape ({B}, {L}) or ({L},); got {tuple(positions.shape)}")
  return jnp.broadcast_to(jnp.asarray(positions), (B, L))


def _check_cache(cache, dims: MLADims, B: int, dtype):
  """An empty cache for None; else validates ``(c [B, S, C], kr [B, S, R])``."""
  if cache is None:
    return jnp.zeros((B, 0, dims.C), dtype), jnp.zeros((B, 0, dims.R), dtype)
  if not isinstance(cache, (tuple, list)) or len(cache) != 2:
    raise ValueError(f"cache must be a pair (c_BSC, kr_BSR) from mla_cache; got {type(cache)}")
  c, kr = cache
  S = np.shape(c)[1] if np.ndim(c) == 3 else -1
  if np.shape(c) != (B, S, dims.C) or np.shape(kr) != (B, S, dims.R):
    raise ValueError(
      f"cache must be (c [B, S, C], kr [B, S, R]) with B={B}, C={dims.C}, R={dims.R}; got "
      f"c {np.shape(c)}, kr {np.shape(kr)}"
    )
  return jnp.asarray(c, dtype), jnp.asarray(kr, dtype)


# ---------------------------------------------------------------------------------------
# The computation (inputs validated).
# ---------------------------------------------------------------------------------------


def _w(params, name: str, dtype):
  return params[name].astype(dtype)


def _latent(
  params, x_BSD: Float[Array, "B S D"], pos_BS: Int[Array, "B S"], base: float, rotary_dim: int
) -> tuple[Float[Array, "B S C"], Float[Array, "B S R"]]:
  """The cache entries: latent c = W_DKV h and rotary key k^R = RoPE(W_KR h)."""
  dtype = x_BSD.dtype
  c_BSC = x_BSD @ _w(params, "w_dkv", dtype)
  if "w_kr" not in params:
    return c_BSC, jnp.zeros(x_BSD.shape[:2] + (0,), dtype)
  kr_BSR = x_BSD @ _w(params, "w_kr", dtype)
  kr_BS1R = rope_lib.apply_rope(kr_BSR[:, :, None, :], pos_BS, base=base, rotary_dim=rotary_dim)
  return c_BSC, kr_BS1R[:, :, 0, :]


def _queries(
  params, x_BTD: Float[Array, "B T D"], pos_BT: Int[Array, "B T"], base: float, rotary_dim: int
) -> tuple[Float[Array, "B T N P"], Float[Array, "B T N R"] | None]:
  """Non-rotary queries q^C and rotated queries q^R (None when R = 0)."""
  dtype = x_BTD.dtype
  if "w_dq" in params:
    src_BTQ = x_BTD @ _w(params, "w_dq", dtype)
    q_BTNP = jnp.einsum("BTQ,QNP->BTNP", src_BTQ, _w(params, "w_uq", dtype))
  else:
    src_BTQ = x_BTD  # full-rank queries read h directly (Q = D)
    q_BTNP = jnp.einsum("BTQ,QNP->BTNP", src_BTQ, _w(params, "w_q", dtype))
  if "w_qr" not in params:
    return q_BTNP, None
  qr_BTNR = jnp.einsum("BTQ,QNR->BTNR", src_BTQ, _w(params, "w_qr", dtype))
  return q_BTNP, rope_lib.apply_rope(qr_BTNR, pos_BT, base=base, rotary_dim=rotary_dim)


def expanded_heads(
  params,
  q_BTNP: Float[Array, "B T N P"],
  qr_BTNR: Float[Array, "B T N R"] | None,
  c_BSC: Float[Array, "B S C"],
  kr_BSR: Float[Array, "B S R"],
) -> tuple[Float[Array, "B T N H"], Float[Array, "B S N H"], Float[Array, "B S N V"]]:
  """Per-head q = [q^C ; q^R], k = [W_UK c ; k^R] (H = P + R) and v = W_UV c."""
  dtype = c_BSC.dtype
  k_BSNP = jnp.einsum("BSC,CNP->BSNP", c_BSC, _w(params, "w_uk", dtype))
  v_BSNV = jnp.einsum("BSC,CNV->BSNV", c_BSC, _w(params, "w_uv", dtype))
  if qr_BTNR is None:
    return q_BTNP, k_BSNP, v_BSNV
  B, S, N, _ = k_BSNP.shape
  kr_BSNR = jnp.broadcast_to(kr_BSR[:, :, None, :], (B, S, N, kr_BSR.shape[-1]))
  q_BTNH = jnp.concatenate([q_BTNP, qr_BTNR], axis=-1)
  return q_BTNH, jnp.concatenate([k_BSNP, kr_BSNR], axis=-1), v_BSNV


def output_projection(params, o_BTNV: Float[Array, "B T N V"]) -> Float[Array, "B T D"]:
  """y = Σ_n W_O,n o_n."""
  return jnp.einsum("BTNV,NVD->BTD", o_BTNV, _w(params, "w_o", o_BTNV.dtype))


def _attend(params, dims, q_BTNP, qr_BTNR, c_BSC, kr_BSR, mask, implementation, absorbed):
  """Attention over the latent cache: expanded per-head K/V, or absorbed single-MQA."""
  if not absorbed:
    q_BTNH, k_BSNH, v_BSNV = expanded_heads(params, q_BTNP, qr_BTNR, c_BSC, kr_BSR)
    o_BTNV = api_lib.dot_product_attention(
      q_BTNH, k_BSNH, v_BSNV, mask=mask, scale=dims.scale, implementation=implementation
    )
    return output_projection(params, o_BTNV)
  dtype = c_BSC.dtype
  # q'_n = W_UK,nᵀ q^C_n: the query moves into latent space, so K/V are never up-projected.
  q_BTNC = jnp.einsum("BTNP,CNP->BTNC", q_BTNP, _w(params, "w_uk", dtype))
  k_BSC = c_BSC
  if qr_BTNR is not None:
    q_BTNC = jnp.concatenate([q_BTNC, qr_BTNR], axis=-1)  # [B, T, N, C + R]
    k_BSC = jnp.concatenate([c_BSC, kr_BSR], axis=-1)  # [B, S, C + R]
  # One MQA call: K = 1 shared kv head, H = C + R, Hv = C; the scale of the unabsorbed head.
  o_BTNC = api_lib.dot_product_attention(
    q_BTNC,
    k_BSC[:, :, None, :],
    c_BSC[:, :, None, :],
    mask=mask,
    scale=dims.scale,
    implementation=implementation,
  )
  # W_UV,n folded into the output projection, applied in factored order.
  o_BTNV = jnp.einsum("BTNC,CNV->BTNV", o_BTNC, _w(params, "w_uv", dtype))
  return output_projection(params, o_BTNV)


# ---------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------


@typing.no_type_check
def mla_expanded_qkv(
  params, x_BTD: Float[Array, "B T D"], positions_BT: Int[Array, "B T"] | None = None, *, rope=None
):
  """The expanded per-head ``(q [B, T, N, H], k [B, T, N, H], v [B, T, N, V])`` of
  self-attention over ``x`` (H = P + R), for inspection (e.g. attention maps); attend with
  ``scale=mla_dims(params).scale``."""
  c_BTC, kr_BTR = mla_cache(params, x_BTD, positions_BT, rope=rope)
  B, T, _ = x_BTD.shape
  base, rotary_dim = resolve_rope(rope, mla_dims(params).R)
  pos_BT = _positions(positions_BT, "positions_BT", B, T, jnp.arange(T))
  q_BTNP, qr_BTNR = _queries(params, x_BTD, pos_BT, base, rotary_dim)
  return expanded_heads(params, q_BTNP, qr_BTNR, c_BTC, kr_BTR)


@typing.no_type_check
def mla_cache(
  params, x_BTD: Float[Array, "B T D"], positions_BT: Int[Array, "B T"] | None = None, *, rope=None
) -> tuple[Float[Array, "B T C"], Float[Array, "B T R"]]:
  """The KV cache of MLA for tokens ``x``: C + R numbers per token.

  Args:
    params: from ``init_mla``.
    x_BTD: layer inputs h ``[B, T, D]``.
    positions_BT: integer positions of the tokens ``[B, T]`` or ``[T]``; default arange(T).
    rope: None or dict(base=..., rotary_dim=...) for the rotary key (see the module doc).

  Returns:
    ``(c [B, T, C], k^R [B, T, R])``: the latent and the rotated shared key (R may be 0).
  """
  dims = mla_dims(params)
  _check_tokens("x_BTD", x_BTD, dims.D, "[B, T, D]")
  B, T, _ = x_BTD.shape
  base, rotary_dim = resolve_rope(rope, dims.R)
  pos_BT = _positions(positions_BT, "positions_BT", B, T, jnp.arange(T))
  return _latent(params, x_BTD, pos_BT, base, rotary_dim)


def _layer(params, x_BTD, context_BSD, causal, implementation, mask, positions_BT, rope, absorbed):
  dims = mla_dims(params)
  _check_tokens("x_BTD", x_BTD, dims.D, "[B, T, D]")
  B, T, _ = x_BTD.shape
  if not isinstance(causal, (bool, np.bool_)):
    raise ValueError(f"causal must be a bool; got {causal!r}")
  if mask is not None and not isinstance(mask, masks_lib.Mask):
    raise ValueError(f"mask must be an attn_jax.attention.masks.Mask or None; got {type(mask)}")
  base, rotary_dim = resolve_rope(rope, dims.R)
  if context_BSD is None:
    src_BSD, S = x_BTD, T
    q_pos_BT = _positions(positions_BT, "positions_BT", B, T, jnp.arange(T))
    kv_pos_BS = q_pos_BT
  else:
    _check_tokens("context_BSD", context_BSD, dims.D, "[B, S, D]")
    if context_BSD.shape[0] != B or context_BSD.dtype != x_BTD.dtype:
      raise ValueError(
        f"context_BSD must share x's batch size and dtype ({B}, {x_BTD.dtype}); got shape "
        f"{tuple(context_BSD.shape)}, dtype {context_BSD.dtype}"
      )
    src_BSD, S = context_BSD, context_BSD.shape[1]
    q_pos_BT = _positions(positions_BT, "positions_BT", B, T, S - T + jnp.arange(T))
    kv_pos_BS = jnp.broadcast_to(jnp.arange(S), (B, S))
  full_mask = masks_lib.CausalMask() if causal else None
  if mask is not None:
    full_mask = mask if full_mask is None else full_mask & mask
  c_BSC, kr_BSR = _latent(params, src_BSD, kv_pos_BS, base, rotary_dim)
  q_BTNP, qr_BTNR = _queries(params, x_BTD, q_pos_BT, base, rotary_dim)
  return _attend(params, dims, q_BTNP, qr_BTNR, c_BSC, kr_BSR, full_mask, implementation, absorbed)


@typing.no_type_check
def mla(
  params,
  x_BTD: Float[Array, "B T D"],
  *,
  context_BSD: Float[Array, "B S D"] | None = None,
  causal: bool,
  implementation: str | None = None,
  mask=None,
  positions_BT: Int[Array, "B T"] | None = None,
  rope=None,
  return_aux: bool = False,
):
  """Multi-head latent attention, expanded per-head form (DeepSeek-V2: A Strong, Economical,
  and Efficient Mixture-of-Experts Language Model).

  Keys ``[W_UK,n c ; k^R]`` and values ``W_UV,n c`` are up-projected from the latent and all
  heads run as one ``dot_product_attention`` with H = P + R, Hv = V, scale 1/sqrt(P + R).

  Args:
    params: from ``init_mla``.
    x_BTD: layer inputs ``[B, T, D]`` (the queries' tokens).
    context_BSD: keys' and values' tokens ``[B, S, D]`` for cross-attention; None for self.
    causal: causal (queries bottom-right aligned) or bidirectional.
    implementation: passed to ``dot_product_attention`` ("reference" is the naive oracle).
    mask: an extra ``masks.Mask`` ANDed with the causal mask (e.g. a ``SegmentMask``).
    positions_BT: query positions (and key positions in self-attention) for the decoupled
      RoPE; see the module doc for the defaults.
    rope: None (base 10000, all R rotary dims) or dict(base=..., rotary_dim=...).
    return_aux: also return the (empty) dict of auxiliary losses.

  Returns:
    ``y [B, T, D]`` in x's dtype, and ``{}`` when ``return_aux``.
  """
  y_BTD = _layer(
    params, x_BTD, context_BSD, causal, implementation, mask, positions_BT, rope, False
  )
  return (y_BTD, {}) if return_aux else y_BTD


@typing.no_type_check
def mla_absorbed(
  params,
  x_BTD: Float[Array, "B T D"],
  *,
  context_BSD: Float[Array, "B S D"] | None = None,
  causal: bool,
  implementation: str | None = None,
  mask=None,
  positions_BT: Int[Array, "B T"] | None = None,
  rope=None,
  return_aux: bool = False,
):
  """MLA with absorbed weights for every query (The New LLM Bottleneck: A Systems
  Perspective on Latent Attention and Mixture-of-Experts).

  Same parameters and arguments as ``mla`` and the same result: queries move into latent
  space (q'_n = W_UK,nᵀ q^C_n) and all heads attend over the shared ``[c ; k^R]`` as one MQA
  call (K = 1, H = C + R, Hv = C, scale 1/sqrt(P + R)); W_UV,n is applied after attention.
  For prefill this trades the per-head K/V up-projection for C + R-wide logits.
  """
  y_BTD = _layer(params, x_BTD, context_BSD, causal, implementation, mask, positions_BT, rope, True)
  return (y_BTD, {}) if return_aux else y_BTD


@typing.no_type_check
def mla_decode(
  params,
  x_new_BTD: Float[Array, "B T D"],
  cache,
  positions=None,
  *,
  absorbed: bool = False,
  rope=None,
  implementation: str | None = None,
):
  """Decodes new tokens against a latent cache, in the expanded or the absorbed form.

  The new tokens' entries are appended to the cache; the new tokens then attend causally
  (bottom-right aligned) over the whole cache, so one step with T = 1 equals the last row of
  causal ``mla`` over the full sequence.

  Args:
    params: from ``init_mla``.
    x_new_BTD: the new tokens' layer inputs ``[B, T, D]`` (T = 1 for one decode step).
    cache: ``(c [B, S, C], k^R [B, S, R])`` of the previous tokens (``mla_cache`` or an
      earlier ``mla_decode``), or None for an empty cache.
    positions: integer positions of the new tokens ``[B, T]`` or ``[T]``; default
      ``S + arange(T)``.
    absorbed: attend with absorbed weights (one MQA call over the latent cache).
    rope, implementation: as in ``mla``.

  Returns:
    ``(y [B, T, D], cache)`` with the cache extended to S + T tokens.
  """
  dims = mla_dims(params)
  _check_tokens("x_new_BTD", x_new_BTD, dims.D, "[B, T, D]")
  B, T, _ = x_new_BTD.shape
  c_old, kr_old = _check_cache(cache, dims, B, x_new_BTD.dtype)
  S_old = c_old.shape[1]
  base, rotary_dim = resolve_rope(rope, dims.R)
  pos_BT = _positions(positions, "positions", B, T, S_old + jnp.arange(T))
  c_new, kr_new = _latent(params, x_new_BTD, pos_BT, base, rotary_dim)
  c_BSC = jnp.concatenate([c_old, c_new], axis=1)
  kr_BSR = jnp.concatenate([kr_old, kr_new], axis=1)
  q_BTNP, qr_BTNR = _queries(params, x_new_BTD, pos_BT, base, rotary_dim)
  mask = masks_lib.CausalMask() if T > 1 else None  # one new token sees the whole cache
  y_BTD = _attend(params, dims, q_BTNP, qr_BTNR, c_BSC, kr_BSR, mask, implementation, absorbed)
  return y_BTD, (c_BSC, kr_BSR)


@typing.no_type_check
def mla_absorbed_decode(
  params,
  x_new_B1D: Float[Array, "B T D"],
  cache,
  positions=None,
  *,
  rope=None,
  implementation: str | None = None,
):
  """One absorbed decode step (or T new tokens): ``mla_decode(..., absorbed=True)``."""
  return mla_decode(
    params,
    x_new_B1D,
    cache,
    positions,
    absorbed=True,
    rope=rope,
    implementation=implementation,
  )


# ---------------------------------------------------------------------------------------
# Decode arithmetic intensity (The New LLM Bottleneck, abstract and Sec. 3).
# ---------------------------------------------------------------------------------------

DECODE_KINDS = ("mha", "gqa", "mqa", "mla_absorbed")


def decode_roofline(
  kind: str,
  *,
  context_len: int,
  num_heads: int,
  batch: int = 1,
  head_dim: int = 128,
  num_kv_heads: int | None = None,
  kv_lora_rank: int = 512,
  qk_rope_head_dim: int = 64,
  bytes_per_element: int = 2,
) -> dict[str, float]:
  """FLOPs, KV-cache bytes read and their ratio for one attention decode step.

  One new query per sequence attends over ``context_len`` cached tokens; only the attention
  core is counted (logits and value sums, 2 FLOPs per multiply-add) against the bytes of
  the KV cache it reads. Each sequence reads its own cache, so ``batch`` cancels in the ratio.

    mha/gqa/mqa (K kv heads; K = N, K < N, K = 1):
      FLOPs = 4·B·N·S·H, bytes = 2·B·K·S·H·b, intensity = 2N / (K·b)
    mla_absorbed (all N heads read one cache of C + R per token):
      FLOPs = 2·B·N·S·(C + R) + 2·B·N·S·C, bytes = B·S·(C + R)·b

  Returns:
    ``{"flops": ..., "bytes": ..., "intensity": flops / bytes}``.
  """
  if kind not in DECODE_KINDS:
    raise ValueError(f"kind must be one of {DECODE_KINDS}; got {kind!r}")
  B, S, N, b = batch, context_len, num_heads, bytes_per_element
  for name, value in (("batch", B), ("context_len", S), ("num_heads", N), ("bytes", b)):
    _int_option(name, value, 1)
  if kind == "mla_absorbed":
    C, R = kv_lora_rank, qk_rope_head_dim
    flops = 2 * B * N * S * (C + R) + 2 * B * N * S * C
    nbytes = B * S * (C + R) * b
  else:
    K = {"mha": N, "mqa": 1}.get(kind, num_kv_heads)
    if K is None or K < 1 or N % K:
      raise ValueError(f"num_kv_heads must divide num_heads={N} for kind 'gqa'; got {K}")
    flops = 4 * B * N * S * head_dim
    nbytes = 2 * B * K * S * head_dim * b
  return {"flops": float(flops), "bytes": float(nbytes), "intensity": flops / nbytes}


# ---------------------------------------------------------------------------------------
# Registry entries.
# ---------------------------------------------------------------------------------------


registry.register(
  registry.Mechanism(
    id="mla",
    family="b",
    paper=PAPER_MLA,
    entry_point="attn_jax.attention.mla:mla",
    implementations=registry.KERNEL_IMPLEMENTATIONS,
    patterns=registry.ALL_PATTERNS,
    decode=True,
    tier=1,
    check="The cache holds d_c + d_R numbers per token. Without RoPE, with d_c = D, "
    "W_DKV = I, W_UK,n = W_K,n and W_UV,n = W_V,n, it reproduces an MHA exactly.",
    build=registry.build_nothing,
    module="attn_jax.nn.mla:MLAAttention",
    interface="layer",
    init="attn_jax.attention.mla:init_mla",
  )
)
registry.register(
  registry.Mechanism(
    id="mla_absorbed",
    family="b",
    paper=PAPER_ABSORBED,
    entry_point="attn_jax.attention.mla:mla_absorbed",
    implementations=registry.KERNEL_IMPLEMENTATIONS,
    patterns=registry.ALL_PATTERNS,
    decode=True,
    tier=1,
    check="Absorbed decode equals the expanded per-head K/V path to fp32 tolerance. "
    "`roofline` reproduces the abstract's claim that MLA's arithmetic intensity is more "
    "than two orders of magnitude above MHA's.",
    build=registry.build_nothing,
    module="attn_jax.nn.mla:MLAAttention",
    interface="layer",
    init="attn_jax.attention.mla:init_mla_absorbed",
  )
)
