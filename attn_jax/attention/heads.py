"""Head structure and KV sharing (catalog family (b) except MLA), as pure JAX functions.

Mechanisms (registry ids) and papers:
  * ``mqa`` — "Fast Transformer Decoding: One Write-Head is All You Need".
  * ``gqa`` — "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head
    Checkpoints" (+ ``gqa_from_mha``, the mean-pool conversion).
  * ``kdgqa`` — "Beyond Uniform Query Distribution: Key-Driven Grouped Query Attention".
  * ``head_dims`` — "Low-Rank Bottleneck in Multi-head Attention Models"; "On the Benefits of
    Rank in Attention Layers".
  * ``mhe`` — "Pit One Against Many: Leveraging Attention-head Embeddings for
    Parameter-efficient Multi-head Attention".
  * ``dha`` — "DHA: Learning Decoupled-Head Attention from Transformer Checkpoints via
    Adaptive Heads Fusion".
  * ``sigma_diffqkv`` — "Sigma: Differential Rescaling of Query, Key and Value for Efficient
    Language Models".

Dimension key: B batch, T query length, S key/value length, D model dim, N query heads,
K kv heads (Kk key heads and Kv value heads where they differ; N % Kk == N % Kv == 0),
G = N // K query heads per group, H q/k head dim, Hv value head dim, A the augmented query
dim of ``sigma_diffqkv``, M members of a DHA fusion group.

The static structures (``mqa``, ``gqa``, ``head_dims``, ``dha``, ``sigma_diffqkv``) share one
parameter layout and one computation, differing in which shapes they allow::

    q_t,n = x_t W_Q,n                  (sigma: q_t,n = (x_t W_Q,n) W_A,n, A -> H)
    k_s,j = c_s W_K,j   j < Kk         v_s,i = c_s W_V,i   i < Kv     (c = x, or the context)
    o_t,n = Σ_s softmax_s(q_t,n · k_s,n//(N/Kk) / sqrt(H)) v_s,n//(N/Kv)
    y_t   = Σ_n o_t,n W_O,n

with ``{w_q [D, N, H|A], w_k [D, Kk, H], w_v [D, Kv, Hv], w_o [N, Hv, D]}`` (+ ``w_qa
[N, A, H]`` for sigma; + ``omega_k [N, Mk]``, ``omega_v [N, Mv]`` for DHA's fusion form).
mqa is Kk = Kv = 1, gqa Kk = Kv = K, head_dims any H / Hv, dha and sigma Kk != Kv allowed.
Attention is one ``dot_product_attention`` call. When Kk == Kv the kernel maps query head n to
kv head n // G and nothing is repeated. When Kk != Kv (DHA, Sigma) the call runs with
L = lcm(Kk, Kv) kv heads: keys repeated L/Kk times and values L/Kv times (query head n's
L-group n // (N/L) falls inside key group n // (N/Kk) and value group n // (N/Kv)). Only that
repeat is materialised, never N heads unless L = N; the cache keeps Kk and Kv heads.

Positions: ``rope=None`` leaves q/k alone; ``rope=dict(base=..., rotary_dim=...)`` rotates the
per-head q and k (after Sigma's augmentation, i.e. in the H-dim space where they meet) at
``positions_BT`` (default ``arange(T)``) in self-attention; cross-attention rotates keys at
``arange(S)`` and queries at ``positions_BT`` (default ``S − T + arange(T)``, bottom-right
aligned like the masks).

The public functions validate by hand (a ``ValueError`` naming the argument, what it got and
what it needs) and are left to that check (``typing.no_type_check``).
"""

import functools
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

PAPERS = {
  "mqa": "Fast Transformer Decoding: One Write-Head is All You Need",
  "gqa": "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints",
  "kdgqa": "Beyond Uniform Query Distribution: Key-Driven Grouped Query Attention",
  "head_dims": "Low-Rank Bottleneck in Multi-head Attention Models; On the Benefits of Rank in "
  "Attention Layers",
  "mhe": "Pit One Against Many: Leveraging Attention-head Embeddings for Parameter-efficient "
  "Multi-head Attention",
  "dha": "DHA: Learning Decoupled-Head Attention from Transformer Checkpoints via Adaptive "
  "Heads Fusion",
  "sigma_diffqkv": "Sigma: Differential Rescaling of Query, Key and Value for Efficient "
  "Language Models",
}
KINDS = tuple(PAPERS)
STATIC_KINDS = ("mqa", "gqa", "head_dims", "dha", "sigma_diffqkv")
MHE_VARIANTS = ("additive", "multiplicative")
# Options each init takes besides the common arguments (None or -1: the default size).
OPTION_KEYS = {
  "mqa": ("v_head_dim",),
  "gqa": ("v_head_dim",),
  "kdgqa": ("v_head_dim",),
  "head_dims": ("v_head_dim",),
  "mhe": ("v_head_dim", "mhe_variant"),
  "dha": ("v_head_dim", "dha_value_heads"),
  "sigma_diffqkv": ("v_head_dim", "sigma_key_heads", "sigma_key_head_dim", "sigma_q_aug_dim"),
}


# ---------------------------------------------------------------------------------------
# Validation helpers.
# ---------------------------------------------------------------------------------------


def _int(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}; got {value}")
  return int(value)


def _opt(name: str, value, default: int, minimum: int = 1) -> int:
  """An optional size: None or -1 (the config form) take ``default``."""
  return default if value is None or value == -1 else _int(name, value, minimum)


def _check_tokens(name: str, x, D: int, layout: str) -> None:
  if not hasattr(x, "shape") or not hasattr(x, "dtype") or x.ndim != 3:
    raise ValueError(f"{name} must be an array of shape {layout}; got {np.shape(x)}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must have a floating dtype; got {x.dtype}")
  if x.shape[2] != D:
    raise ValueError(f"{name} must have model dim D={D} (params); got shape {tuple(x.shape)}")
  if x.shape[1] == 0:
    raise ValueError(f"{name} must hold at least one token; got shape {tuple(x.shape)}")


def _check_rope(rope) -> dict | None:
  if rope is None:
    return None
  if not isinstance(rope, dict) or set(rope) - {"base", "rotary_dim"}:
    raise ValueError(f"rope must be None or a dict with keys 'base', 'rotary_dim'; got {rope!r}")
  return {"base": rope.get("base", rope_lib.DEFAULT_BASE), "rotary_dim": rope.get("rotary_dim")}


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


class _Call(NamedTuple):
  """A validated call: key/value source tokens, positions, the full mask, RoPE."""

  src_BSD: Array
  q_pos_BT: Array
  kv_pos_BS: Array
  mask: masks_lib.Mask | None
  rope: dict | None


def _check_call(D, x_BTD, context_BSD, causal, mask, positions_BT, rope) -> _Call:
  _check_tokens("x_BTD", x_BTD, D, "[B, T, D]")
  B, T, _ = x_BTD.shape
  if not isinstance(causal, (bool, np.bool_)):
    raise ValueError(f"causal must be a bool; got {causal!r}")
  if mask is not None and not isinstance(mask, masks_lib.Mask):
    raise ValueError(f"mask must be an attn_jax.attention.masks.Mask or None; got {type(mask)}")
  rope = _check_rope(rope)
  if context_BSD is None:
    src_BSD = x_BTD
    q_pos_BT = _positions(positions_BT, "positions_BT", B, T, jnp.arange(T))
    kv_pos_BS = q_pos_BT
  else:
    _check_tokens("context_BSD", context_BSD, D, "[B, S, D]")
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
  return _Call(src_BSD, q_pos_BT, kv_pos_BS, full_mask, rope)


def _rotate(x_BLNH, pos_BL, rope):
  return x_BLNH if rope is None else rope_lib.apply_rope(x_BLNH, pos_BL, **rope)


def _w(params, name: str, dtype):
  return params[name].astype(dtype)


def _finish(y_BTD, aux: dict, return_aux: bool):
  return (y_BTD, aux) if return_aux else y_BTD


# ---------------------------------------------------------------------------------------
# Attention with separate key and value head maps.
# ---------------------------------------------------------------------------------------


def attend_kv_heads(
  q_BTNH: Float[Array, "B T N H"],
  k_BSKH: Float[Array, "B S Kk H"],
  v_BSKV: Float[Array, "B S Kv Hv"],
  *,
  mask=None,
  implementation: str | None = None,
  return_lse: bool = False,
):
  """Softmax attention where query head n reads key head n // (N/Kk), value head n // (N/Kv).

  One ``dot_product_attention`` call with L = lcm(Kk, Kv) kv heads; keys are repeated L/Kk
  and values L/Kv times (nothing is repeated when Kk == Kv: the kernel's GQA map does it).
  """
  N, Kk, Kv = q_BTNH.shape[2], k_BSKH.shape[2], v_BSKV.shape[2]
  if N % Kk or N % Kv:
    raise ValueError(f"key heads Kk={Kk} and value heads Kv={Kv} must divide query heads N={N}")
  L = math.lcm(Kk, Kv)
  k_BSLH = jnp.repeat(k_BSKH, L // Kk, axis=2) if L != Kk else k_BSKH
  v_BSLV = jnp.repeat(v_BSKV, L // Kv, axis=2) if L != Kv else v_BSKV
  return api_lib.dot_product_attention(
    q_BTNH, k_BSLH, v_BSLV, mask=mask, implementation=implementation, return_lse=return_lse
  )


def output_projection(params, o_BTNV: Float[Array, "B T N Hv"]) -> Float[Array, "B T D"]:
  """y = Σ_n o_n W_O,n."""
  return jnp.einsum("BTNV,NVD->BTD", o_BTNV, _w(params, "w_o", o_BTNV.dtype))


# ---------------------------------------------------------------------------------------
# The static structures: mqa, gqa, head_dims, dha, sigma_diffqkv.
# ---------------------------------------------------------------------------------------


class StaticDims(NamedTuple):
  """Sizes of a static-structure layer (see the module's dimension key)."""

  D: int
  N: int
  Kk: int
  Kv: int
  H: int
  Hv: int
  A: int  # query projection width: A = H unless Sigma's augmentation w_qa is present
  fusion: bool  # DHA fusion form (per-head weights and omega_k / omega_v)


def _shape(params, name):
  return tuple(np.shape(params[name]))


def static_dims(params, kind: str = "any") -> StaticDims:
  """The sizes of ``params``, validated for ``kind`` ("any": every static layout)."""
  if not isinstance(params, dict):
    raise ValueError(f"params must be a dict of arrays (see init_{kind}); got {type(params)}")
  need = {"w_q", "w_k", "w_v", "w_o"}
  allowed = set(need)
  if kind in ("sigma_diffqkv", "any"):
    allowed |= {"w_qa"}
  if kind in ("dha", "any"):
    allowed |= {"omega_k", "omega_v"}
  if not need <= set(params) or set(params) - allowed:
    raise ValueError(
      f"params of {kind!r} must hold {sorted(need)} (optional: {sorted(allowed - need)}); got "
      f"keys {sorted(params)}"
    )
  for name, rank in (("w_q", 3), ("w_k", 3), ("w_v", 3), ("w_o", 3), ("w_qa", 3)):
    if name in params and np.ndim(params[name]) != rank:
      raise ValueError(f"params[{name!r}] must have rank {rank}; got shape {_shape(params, name)}")
  D, N, A = _shape(params, "w_q")
  _, Kk, H = _shape(params, "w_k")
  _, Kv, Hv = _shape(params, "w_v")
  fusion = "omega_k" in params or "omega_v" in params
  if "w_qa" in params and _shape(params, "w_qa") != (N, A, H):
    raise ValueError(f"params['w_qa'] must have shape {(N, A, H)}; got {_shape(params, 'w_qa')}")
  if "w_qa" not in params and A != H:
    raise ValueError(f"params['w_q'] must have head dim H={H} (w_k); got {_shape(params, 'w_q')}")
  want = {"w_k": (D, Kk, H), "w_v": (D, Kv, Hv), "w_o": (N, Hv, D)}
  if fusion:
    for name in ("omega_k", "omega_v"):
      shape = tuple(np.shape(params.get(name)))
      if name not in params or len(shape) != 2 or shape[0] != N or shape[1] < 1 or N % shape[1]:
        raise ValueError(
          f"params[{name!r}] (DHA fusion weights) must have shape [N={N}, M] with M dividing N; "
          f"got {shape if name in params else 'nothing'}"
        )
    want["w_k"], want["w_v"] = (D, N, H), (D, N, Hv)
    Kk, Kv = N // params["omega_k"].shape[1], N // params["omega_v"].shape[1]
  for name, shape in want.items():
    if _shape(params, name) != shape:
      raise ValueError(f"params[{name!r}] must have shape {shape}; got {_shape(params, name)}")
  if N % Kk or N % Kv:
    raise ValueError(f"key heads Kk={Kk} and value heads Kv={Kv} must divide query heads N={N}")
  if kind == "mqa" and (Kk, Kv) != (1, 1):
    raise ValueError(f"mqa params must have one kv head; got Kk={Kk}, Kv={Kv}")
  if kind in ("gqa", "head_dims", "kdgqa") and Kk != Kv:
    raise ValueError(f"{kind} params must have as many key as value heads; got {Kk} and {Kv}")
  return StaticDims(D, N, Kk, Kv, H, Hv, A, fusion)


def dha_fused_weights(params) -> tuple[Float[Array, "D N H"], Float[Array, "D N Hv"]]:
  """DHA's fused per-head weights W_K,n = Σ_m ω_k[n, m] W_K,(group(n), m) (and W_V,n).

  Query head n belongs to key group g = n // Mk; its key weight mixes the Mk original heads
  of that group with the n-th row of ``omega_k``. ω = identity (ω[n, m] = [m == n % Mk])
  returns the original heads; rows equal within each group make the group's heads identical,
  so ``dha_collapse`` can keep one head per group.
  """
  out = []
  for w, omega in ((params["w_k"], params["omega_k"]), (params["w_v"], params["omega_v"])):
    D, N, H = w.shape
    M = omega.shape[1]
    w_DKMH = w.reshape(D, N // M, M, H)
    omega_KRM = omega.astype(w.dtype).reshape(N // M, M, M)  # [group, row, member]
    out.append(jnp.einsum("DKMH,KRM->DKRH", w_DKMH, omega_KRM).reshape(D, N, H))
  return out[0], out[1]


def _static_qkv(params, x_BTD, src_BSD, call: _Call):
  """Per-head queries [B, T, N, H], keys [B, S, Kk, H] and values [B, S, Kv, Hv], rotated."""
  dtype = x_BTD.dtype
  q_BTNH = jnp.einsum("BTD,DNA->BTNA", x_BTD, _w(params, "w_q", dtype))
  if "w_qa" in params:
    q_BTNH = jnp.einsum("BTNA,NAH->BTNH", q_BTNH, _w(params, "w_qa", dtype))
  if "omega_k" in params:
    w_k, w_v = dha_fused_weights(params)
    w_k, w_v = w_k.astype(dtype), w_v.astype(dtype)
  else:
    w_k, w_v = _w(params, "w_k", dtype), _w(params, "w_v", dtype)
  k_BSKH = jnp.einsum("BSD,DKH->BSKH", src_BSD, w_k)
  v_BSKV = jnp.einsum("BSD,DKV->BSKV", src_BSD, w_v)
  q_BTNH = _rotate(q_BTNH, call.q_pos_BT, call.rope)
  return q_BTNH, _rotate(k_BSKH, call.kv_pos_BS, call.rope), v_BSKV


def gated_heads(
  params,
  x_BTD: Float[Array, "B T D"],
  gates_BTN: Float[Array, "B T N"],
  call: _Call,
  implementation: str | None = None,
) -> Float[Array, "B T D"]:
  """``y_t = Σ_n g_t,n o_t,n W_O,n``: the static layer with each head's output scaled by its
  gate (one attention call for all heads; gates of ones give the plain layer)."""
  q_BTNH, k_BSKH, v_BSKV = _static_qkv(params, x_BTD, call.src_BSD, call)
  o_BTNV = attend_kv_heads(q_BTNH, k_BSKH, v_BSKV, mask=call.mask, implementation=implementation)
  return output_projection(params, o_BTNV * gates_BTN[..., None].astype(o_BTNV.dtype))


def _static_layer(kind, params, x_BTD, context_BSD, causal, implementation, mask, pos, rope):
  dims = static_dims(params, kind)
  call = _check_call(dims.D, x_BTD, context_BSD, causal, mask, pos, rope)
  q_BTNH, k_BSKH, v_BSKV = _static_qkv(params, x_BTD, call.src_BSD, call)
  o_BTNV = attend_kv_heads(q_BTNH, k_BSKH, v_BSKV, mask=call.mask, implementation=implementation)
  return output_projection(params, o_BTNV)


def _dha_fusion_loss(params):
  """Mean squared distance of each ω row from its group's mean row (0 once fused)."""
  losses = []
  for name in ("omega_k", "omega_v"):
    omega = params[name]
    N, M = omega.shape
    omega_KRM = omega.reshape(N // M, M, M)
    losses.append(jnp.mean(jnp.square(omega_KRM - omega_KRM.mean(axis=1, keepdims=True))))
  return losses[0] + losses[1]


_LAYER_ARGS = """
  Args:
    params: from the init of this id (a dict of arrays).
    x_BTD: layer inputs ``[B, T, D]`` (the queries' tokens).
    context_BSD: keys' and values' tokens ``[B, S, D]`` for cross-attention; None for self.
    causal: causal (queries bottom-right aligned) or bidirectional.
    implementation: passed to ``dot_product_attention`` ("reference" is the naive oracle).
    mask: an extra ``masks.Mask`` ANDed with the causal mask (e.g. a ``SegmentMask``).
    positions_BT: query positions (and key positions in self-attention) for RoPE.
    rope: None, or dict(base=..., rotary_dim=...) to rotate the per-head q and k.
    return_aux: also return the dict of auxiliary losses.

  Returns:
    ``y [B, T, D]`` in x's dtype (and the aux dict when ``return_aux``).
"""


def _static_entry(kind: str, doc: str):
  @typing.no_type_check
  def entry(
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
    y_BTD = _static_layer(
      kind, params, x_BTD, context_BSD, causal, implementation, mask, positions_BT, rope
    )
    aux = {}
    if return_aux and kind == "dha" and "omega_k" in params:
      aux["dha_fusion"] = _dha_fusion_loss(params)
    return _finish(y_BTD, aux, return_aux)

  entry.__name__ = entry.__qualname__ = kind
  entry.__doc__ = doc + _LAYER_ARGS
  return entry


mqa = _static_entry(
  "mqa",
  """Multi-query attention (Fast Transformer Decoding: One Write-Head is All You Need).

  One key head and one value head shared by all N query heads (K = 1)::

      o_t,n = Σ_s softmax_s(q_t,n · k_s / sqrt(H)) v_s,   q_t,n = x_t W_Q,n, k_s = c_s W_K

  The cache holds one key and one value per token (N× smaller than MHA's); the kernel maps
  every query head to kv head 0 without repeating K/V.
""",
)
gqa = _static_entry(
  "gqa",
  """Grouped-query attention (GQA: Training Generalized Multi-Query Transformer Models from
  Multi-Head Checkpoints).

  K kv heads, G = N / K query heads per group; query head n uses kv head n // G::

      o_t,n = Σ_s softmax_s(q_t,n · k_s,n//G / sqrt(H)) v_s,n//G

  K = N is MHA, K = 1 is MQA. ``gqa_from_mha`` converts an MHA checkpoint by mean-pooling.
""",
)
head_dims = _static_entry(
  "head_dims",
  """Attention with decoupled head sizes (Low-Rank Bottleneck in Multi-head Attention
  Models; On the Benefits of Rank in Attention Layers).

  The q/k head dim H and the value head dim Hv are free of D / N: W_Q, W_K ∈ R^(D×N·H),
  W_V ∈ R^(D×K·Hv). Each head's logit matrix ``Q_n K_nᵀ = X W_Q,n W_K,nᵀ Xᵀ`` has rank
  ≤ min(H, T): H ≥ T lifts the low-rank bottleneck, H ≪ D/N gives low-rank heads.
  Any H works on the "reference" and "xla" paths; kernels may need H within their tiling.
""",
)
dha = _static_entry(
  "dha",
  """Decoupled-head attention (DHA: Learning Decoupled-Head Attention from Transformer
  Checkpoints via Adaptive Heads Fusion).

  Deployed form: Kk key heads and Kv value heads with separate sharing maps; query head n
  reads key head n // (N/Kk) and value head n // (N/Kv)::

      o_t,n = Σ_s softmax_s(q_t,n · k_s,n//(N/Kk) / sqrt(H)) v_s,n//(N/Kv)

  Groups are contiguous: permute the heads of a checkpoint (W_Q, W_K, W_V, W_O together)
  beforehand to bring similar heads together. The attention runs with lcm(Kk, Kv) kv heads
  (see ``attend_kv_heads``); the cache keeps Kk keys and Kv values per token.

  Fusion form (params with ``omega_k [N, Mk]``, ``omega_v [N, Mv]`` beside per-head
  ``w_k [D, N, H]``, ``w_v [D, N, Hv]``; from ``dha_from_mha``): each head's weights are a
  learnable mix of the heads of its group, W_K,n = Σ_m ω_k[n, m] W_K,(n//Mk, m) (and for V),
  starting at ω = identity (= the MHA). ``return_aux`` gives ``dha_fusion``: the mean
  squared distance of ω's rows from their group mean (our reading of the paper's push
  towards fused heads); once rows agree, ``dha_collapse`` yields the deployed form.
""",
)
sigma_diffqkv = _static_entry(
  "sigma_diffqkv",
  """DiffQKV attention (Sigma: Differential Rescaling of Query, Key and Value for Efficient
  Language Models).

  Keys are compressed harder than values: Kk key heads of dim H and Kv value heads of dim Hv
  (typically Kk < Kv, H < Hv). Our reading of the "augmented" query: each query head is
  projected to a wider A-dim space and brought to the key dim by a per-head map
  (``w_qa [N, A, H]``), q_t,n = (x_t W_Q,n) W_A,n; without ``w_qa`` the query is x_t W_Q,n
  directly (A = H). Being linear, the augmentation folds into W_Q,n W_A,n at deployment.
  Equal head counts and dims (Kk = Kv = N, H = Hv, no w_qa) are MHA.
""",
)


# ---------------------------------------------------------------------------------------
# Cache and decode for the static structures.
# ---------------------------------------------------------------------------------------


@typing.no_type_check
def static_kv_cache(params, x_BTD, positions_BT=None, *, rope=None):
  """The KV cache ``(k [B, T, Kk, H] rotated, v [B, T, Kv, Hv])`` of tokens ``x``."""
  dims = static_dims(params)
  call = _check_call(dims.D, x_BTD, None, False, None, positions_BT, rope)
  _, k_BSKH, v_BSKV = _static_qkv(params, x_BTD, x_BTD, call)
  return k_BSKH, v_BSKV


@typing.no_type_check
def static_decode(params, x_new_BTD, cache, positions=None, *, rope=None, implementation=None):
  """Decodes new tokens against a cache (mqa, gqa, head_dims, dha, sigma_diffqkv).

  The new tokens' keys and values are appended; the new tokens then attend causally
  (bottom-right aligned) over the whole cache, so one step with T = 1 equals the last row of
  the causal layer over the full sequence.

  Args:
    params: static-structure params.
    x_new_BTD: the new tokens' layer inputs ``[B, T, D]``.
    cache: ``(k [B, S, Kk, H], v [B, S, Kv, Hv])`` or None for an empty cache.
    positions: positions of the new tokens (default ``S + arange(T)``).
    rope, implementation: as in the layer functions.

  Returns:
    ``(y [B, T, D], cache)`` with the cache extended to S + T tokens.
  """
  dims = static_dims(params)
  _check_tokens("x_new_BTD", x_new_BTD, dims.D, "[B, T, D]")
  B, T, _ = x_new_BTD.shape
  dtype = x_new_BTD.dtype
  if cache is None:
    cache = (jnp.zeros((B, 0, dims.Kk, dims.H), dtype), jnp.zeros((B, 0, dims.Kv, dims.Hv), dtype))
  if not isinstance(cache, (tuple, list)) or len(cache) != 2:
    raise ValueError(f"cache must be a pair (k_BSKH, v_BSKV); got {type(cache)}")
  k_old, v_old = cache
  S = np.shape(k_old)[1] if np.ndim(k_old) == 4 else -1
  if np.shape(k_old) != (B, S, dims.Kk, dims.H) or np.shape(v_old) != (B, S, dims.Kv, dims.Hv):
    raise ValueError(
      f"cache must be (k [B, S, {dims.Kk}, {dims.H}], v [B, S, {dims.Kv}, {dims.Hv}]) with "
      f"B={B}; got k {np.shape(k_old)}, v {np.shape(v_old)}"
    )
  pos_BT = _positions(positions, "positions", B, T, S + jnp.arange(T))
  call = _check_call(dims.D, x_new_BTD, None, False, None, pos_BT, rope)
  q_BTNH, k_new, v_new = _static_qkv(params, x_new_BTD, x_new_BTD, call)
  k_BSKH = jnp.concatenate([k_old.astype(dtype), k_new], axis=1)
  v_BSKV = jnp.concatenate([v_old.astype(dtype), v_new], axis=1)
  mask = masks_lib.CausalMask() if T > 1 else None  # one new token sees the whole cache
  o_BTNV = attend_kv_heads(q_BTNH, k_BSKH, v_BSKV, mask=mask, implementation=implementation)
  return output_projection(params, o_BTNV), (k_BSKH, v_BSKV)


# ---------------------------------------------------------------------------------------
# Conversions from MHA checkpoints.
# ---------------------------------------------------------------------------------------


def _mha_params(params):
  dims = static_dims(params, "gqa")
  if dims.Kk != dims.N:
    raise ValueError(f"params must be an MHA (as many kv heads as heads, {dims.N}); got {dims.Kk}")
  return dims


def gqa_from_mha(params, num_kv_heads: int) -> dict[str, Array]:
  """Converts MHA params (K = N) to GQA with ``num_kv_heads`` groups by mean-pooling.

  The GQA paper's uptraining recipe: each group's key (value) projection is the mean of the
  key (value) projections of its G = N / K heads; queries and the output projection are kept.
  Exact when the heads within each group are identical; otherwise continue training
  (the paper: about 5% of the original pre-training compute).
  """
  dims = _mha_params(params)
  K = _int("num_kv_heads", num_kv_heads, 1)
  if dims.N % K:
    raise ValueError(f"num_kv_heads must divide num_heads={dims.N}; got {K}")
  out = dict(params)
  for name, width in (("w_k", dims.H), ("w_v", dims.Hv)):
    out[name] = params[name].reshape(dims.D, K, dims.N // K, width).mean(axis=2)
  return out


def dha_from_mha(params, num_key_heads: int, num_value_heads: int) -> dict[str, Array]:
  """DHA fusion-form params from MHA params: ω = identity, so the output equals the MHA."""
  dims = _mha_params(params)
  out = dict(params)
  for name, arg, heads in (
    ("omega_k", "num_key_heads", num_key_heads),
    ("omega_v", "num_value_heads", num_value_heads),
  ):
    heads = _int(arg, heads, 1)
    if dims.N % heads:
      raise ValueError(f"{arg} must divide num_heads={dims.N}; got {heads}")
    M = dims.N // heads
    # ω[n, m] = [m == n % M]: each head starts as itself.
    out[name] = jnp.tile(jnp.eye(M, dtype=params["w_k"].dtype), (heads, 1))
  return out


def dha_collapse(params) -> dict[str, Array]:
  """Deployed DHA params from fusion-form params: one head per group, the mean of the group's
  fused heads. Exact when ω's rows agree within every group (then the fused heads do)."""
  dims = static_dims(params, "dha")
  if not dims.fusion:
    raise ValueError("params must be in DHA fusion form (with 'omega_k' and 'omega_v')")
  w_k, w_v = dha_fused_weights(params)
  return {
    "w_q": params["w_q"],
    "w_k": w_k.reshape(dims.D, dims.Kk, dims.N // dims.Kk, dims.H).mean(axis=2),
    "w_v": w_v.reshape(dims.D, dims.Kv, dims.N // dims.Kv, dims.Hv).mean(axis=2),
    "w_o": params["w_o"],
  }


# ---------------------------------------------------------------------------------------
# kdgqa: key-norm-driven assignment of query heads to KV groups.
# ---------------------------------------------------------------------------------------


def kdgqa_group_counts(norms_BK: Float[Array, "B K"], num_heads: int) -> Int[Array, "B K"]:
  """Query heads per KV group, proportional to the key-head norms (our reading).

  Every group first gets one head; the other N − K are shared in proportion to the norms
  by largest remainder (floors, then one more to the largest fractional parts; ties go to
  the lower group index). So counts ≥ 1, they sum to N, and equal norms give N / K each.
  """
  B, K = norms_BK.shape
  spare = num_heads - K
  share_BK = norms_BK / jnp.maximum(jnp.sum(norms_BK, axis=-1, keepdims=True), 1e-30)
  quota_BK = spare * share_BK.astype(jnp.float32)
  base_BK = jnp.floor(quota_BK).astype(jnp.int32)
  left_B1 = spare - jnp.sum(base_BK, axis=-1, keepdims=True)
  rank_BK = jnp.argsort(jnp.argsort(-(quota_BK - base_BK), axis=-1, stable=True), axis=-1)
  return 1 + base_BK + (rank_BK < left_B1).astype(jnp.int32)


def kdgqa_assignment(counts_BK: Int[Array, "B K"], num_heads: int) -> Int[Array, "B N"]:
  """The KV group of each query head: heads fill groups in order, ``counts[g]`` to group g."""
  ends_BK = jnp.cumsum(counts_BK, axis=-1)
  n_N = jnp.arange(num_heads)
  return jnp.sum(ends_BK[:, None, :] <= n_N[None, :, None], axis=-1).astype(jnp.int32)


def _kdgqa_gather(k_BSKH, v_BSKV, N: int):
  """Keys and values of each query head's assigned group ([B, S, N, ·], one-hot gather)."""
  norms_BK = jnp.mean(jnp.linalg.norm(jax.lax.stop_gradient(k_BSKH), axis=-1), axis=1)
  counts_BK = kdgqa_group_counts(norms_BK, N)
  K = k_BSKH.shape[2]
  onehot_BNK = jax.nn.one_hot(kdgqa_assignment(counts_BK, N), K, dtype=k_BSKH.dtype)
  k_BSNH = jnp.einsum("BSKH,BNK->BSNH", k_BSKH, onehot_BNK)
  return k_BSNH, jnp.einsum("BSKV,BNK->BSNV", v_BSKV, onehot_BNK)


@typing.no_type_check
def kdgqa(
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
  """Key-driven grouped-query attention (Beyond Uniform Query Distribution: Key-Driven
  Grouped Query Attention), the KDGQA variant.

  Each forward pass, per example, measures each KV head's key norm
  ν_g = mean_s ‖k_s,g‖₂, gives group g ``kdgqa_group_counts`` query heads (∝ ν_g, ≥ 1 each,
  summing to N), and assigns query heads to groups in order (``kdgqa_assignment``). The
  assignment is a static-shape one-hot (query head → KV head) under jit; the K kv heads are
  gathered to N heads for one MHA-shaped ``dot_product_attention`` call (the materialised
  [B, S, N, H] keys and values are the cost of a data-dependent map; the cache stays K).
  No gradient flows through the discrete assignment.

  Bidirectional only: the norms average over all keys, so in a causal model a token's
  grouping would depend on later tokens. Not included: DGQA (norms tracked by an EMA during
  training) and PGQA (Gaussian noise on the attention maps).
  """
  dims = static_dims(params, "kdgqa")
  if causal:
    raise ValueError(
      "kdgqa needs causal=False: its head assignment averages key norms over the whole "
      "sequence, which would leak later tokens into earlier outputs"
    )
  call = _check_call(dims.D, x_BTD, context_BSD, causal, mask, positions_BT, rope)
  q_BTNH, k_BSKH, v_BSKV = _static_qkv(params, x_BTD, call.src_BSD, call)
  k_BSNH, v_BSNV = _kdgqa_gather(k_BSKH, v_BSKV, dims.N)
  o_BTNV = api_lib.dot_product_attention(
    q_BTNH, k_BSNH, v_BSNV, mask=call.mask, implementation=implementation
  )
  return _finish(output_projection(params, o_BTNV), {}, return_aux)


# ---------------------------------------------------------------------------------------
# mhe: one shared single-head projection plus per-head embeddings.
# ---------------------------------------------------------------------------------------

MHE_KEYS = ("w_q", "w_k", "w_v", "e_q", "e_k", "e_v", "w_o")


def mhe_dims(params) -> tuple[int, int, int, int]:
  """(D, N, H, Hv) of MHE params, validated."""
  if not isinstance(params, dict) or set(params) != set(MHE_KEYS):
    got = sorted(params) if isinstance(params, dict) else type(params)
    raise ValueError(f"mhe params must hold exactly {sorted(MHE_KEYS)}; got {got}")
  for name in MHE_KEYS:
    if np.ndim(params[name]) != (3 if name == "w_o" else 2):
      raise ValueError(f"params[{name!r}] has the wrong rank; got shape {_shape(params, name)}")
  D, H = _shape(params, "w_q")
  N, Hv = _shape(params, "e_v")
  want = {
    "w_k": (D, H),
    "w_v": (D, Hv),
    "e_q": (N, H),
    "e_k": (N, H),
    "w_o": (N, Hv, D),
  }
  for name, shape in want.items():
    if _shape(params, name) != shape:
      raise ValueError(f"params[{name!r}] must have shape {shape}; got {_shape(params, name)}")
  return D, N, H, Hv


def mhe_heads_qkv(params, x_BTD, src_BSD, variant: str):
  """Per-head q [B, T, N, H], k [B, S, N, H], v [B, S, N, Hv] written out (materialised)."""
  dtype = x_BTD.dtype
  q_BTH = x_BTD @ _w(params, "w_q", dtype)
  k_BSH, v_BSV = src_BSD @ _w(params, "w_k", dtype), src_BSD @ _w(params, "w_v", dtype)
  e_q, e_k, e_v = (_w(params, n, dtype) for n in ("e_q", "e_k", "e_v"))
  if variant == "additive":
    return q_BTH[:, :, None] + e_q, k_BSH[:, :, None] + e_k, v_BSV[:, :, None] + e_v
  return q_BTH[:, :, None] * e_q, k_BSH[:, :, None] * e_k, v_BSV[:, :, None] * e_v


@typing.no_type_check
def mhe(
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
  mhe_variant: str = "additive",
):
  """Multi-head embedding attention (Pit One Against Many: Leveraging Attention-head
  Embeddings for Parameter-efficient Multi-head Attention).

  One shared single-head projection W_Q, W_K ∈ R^(D×H), W_V ∈ R^(D×Hv) and per-head
  embeddings e_n^Q, e_n^K, e_n^V::

      additive:        q_n = x W_Q + e_n^Q,    k_n = c W_K + e_n^K,    v_n = c W_V + e_n^V
      multiplicative:  q_n = x W_Q ⊙ e_n^Q,   k_n = c W_K ⊙ e_n^K,   v_n = c W_V ⊙ e_n^V
      y = Σ_n softmax(q_n k_nᵀ / sqrt(H)) v_n W_O,n

  Over single-head attention this adds 3·N·H parameters (3·N·H for Hv = H).

  Without RoPE every head is computed from ONE shared key/value head, as one MQA call:
  additive, q_n·(k + e_n^K) = q_n·k + q_n·e_n^K and the second term is constant along the
  keys (softmax-invariant, so e^K has no effect and gets zero gradient), and
  Σ_s p_s (v_s + e_n^V) = (Σ_s p_s v_s) + e_n^V on rows that see any key; multiplicative,
  q_n·(k ⊙ e_n^K) = (q_n ⊙ e_n^K)·k and Σ_s p_s (v_s ⊙ e_n^V) = (Σ_s p_s v_s) ⊙ e_n^V. So the
  cache is a single head. With RoPE (which does not commute with the embeddings) the
  per-head q/k/v are materialised for an MHA-shaped call.

  Args: as the other layer functions, plus ``mhe_variant`` ("additive" or "multiplicative").
  """
  D, N, H, Hv = mhe_dims(params)
  if mhe_variant not in MHE_VARIANTS:
    raise ValueError(f"mhe_variant must be one of {MHE_VARIANTS}; got {mhe_variant!r}")
  call = _check_call(D, x_BTD, context_BSD, causal, mask, positions_BT, rope)
  dtype = x_BTD.dtype
  if call.rope is not None:
    q_BTNH, k_BSNH, v_BSNV = mhe_heads_qkv(params, x_BTD, call.src_BSD, mhe_variant)
    q_BTNH = _rotate(q_BTNH, call.q_pos_BT, call.rope)
    k_BSNH = _rotate(k_BSNH, call.kv_pos_BS, call.rope)
    o_BTNV = api_lib.dot_product_attention(
      q_BTNH, k_BSNH, v_BSNV, mask=call.mask, implementation=implementation
    )
    return _finish(output_projection(params, o_BTNV), {}, return_aux)
  q_BTH = x_BTD @ _w(params, "w_q", dtype)
  k_BS1H = (call.src_BSD @ _w(params, "w_k", dtype))[:, :, None]
  v_BS1V = (call.src_BSD @ _w(params, "w_v", dtype))[:, :, None]
  e_v = _w(params, "e_v", dtype)
  if mhe_variant == "additive":
    q_BTNH = q_BTH[:, :, None] + _w(params, "e_q", dtype)
    o_BTNV, lse_BNT = api_lib.dot_product_attention(
      q_BTNH, k_BS1H, v_BS1V, mask=call.mask, implementation=implementation, return_lse=True
    )
    # A row that sees no key is 0 in the library's convention, as is the written-out form.
    seen_BTN1 = jnp.isfinite(jnp.swapaxes(lse_BNT, 1, 2))[..., None]
    o_BTNV = o_BTNV + jnp.where(seen_BTN1, e_v, 0).astype(dtype)
  else:
    q_BTNH = q_BTH[:, :, None] * _w(params, "e_q", dtype) * _w(params, "e_k", dtype)
    o_BTNV = (
      api_lib.dot_product_attention(
        q_BTNH, k_BS1H, v_BS1V, mask=call.mask, implementation=implementation
      )
      * e_v
    )
  return _finish(output_projection(params, o_BTNV), {}, return_aux)


# ---------------------------------------------------------------------------------------
# Per-head view (attention maps, tests).
# ---------------------------------------------------------------------------------------


@typing.no_type_check
def per_head_qkv(
  kind: str, params, x_BTD, *, positions_BT=None, rope=None, mhe_variant: str = "additive"
):
  """Self-attention's per-head ``(q [B, T, N, H], k [B, T, N, H], v [B, T, N, Hv])`` of any
  kind, each query head paired with its own (repeated, gathered or embedded) key and value,
  for inspection; plain MHA over them (default scale) gives the layer's per-head outputs."""
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
  if kind == "mhe":
    D = mhe_dims(params)[0]
    if mhe_variant not in MHE_VARIANTS:
      raise ValueError(f"mhe_variant must be one of {MHE_VARIANTS}; got {mhe_variant!r}")
    call = _check_call(D, x_BTD, None, False, None, positions_BT, rope)
    q_BTNH, k_BTNH, v_BTNV = mhe_heads_qkv(params, x_BTD, x_BTD, mhe_variant)
    q_BTNH = _rotate(q_BTNH, call.q_pos_BT, call.rope)
    return q_BTNH, _rotate(k_BTNH, call.kv_pos_BS, call.rope), v_BTNV
  dims = static_dims(params, kind)
  call = _check_call(dims.D, x_BTD, None, False, None, positions_BT, rope)
  q_BTNH, k_BTKH, v_BTKV = _static_qkv(params, x_BTD, x_BTD, call)
  if kind == "kdgqa":
    return (q_BTNH, *_kdgqa_gather(k_BTKH, v_BTKV, dims.N))
  k_BTNH = jnp.repeat(k_BTKH, dims.N // dims.Kk, axis=2)
  return q_BTNH, k_BTNH, jnp.repeat(v_BTKV, dims.N // dims.Kv, axis=2)


# ---------------------------------------------------------------------------------------
# Sizes, parameter specs and inits.
# ---------------------------------------------------------------------------------------


def _default_groups(N: int) -> int:
  return N // 2 if N % 2 == 0 else 1


def _normal_init(std: float, mean: float = 0.0):
  def init(key, shape, dtype):
    return mean + std * jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype)

  return init


def _fan_in(fan_in: int):
  return _normal_init(fan_in**-0.5)


def param_specs(
  kind: str,
  *,
  d_model: int,
  num_heads: int,
  num_kv_heads: int | None = None,
  head_dim: int | None = None,
  v_head_dim: int | None = None,
  mhe_variant: str = "additive",
  dha_value_heads: int | None = None,
  sigma_key_heads: int | None = None,
  sigma_key_head_dim: int | None = None,
  sigma_q_aug_dim: int | None = 0,
) -> dict[str, tuple[tuple[int, ...], typing.Callable, tuple]]:
  """``{name: (shape, init(key, shape, dtype), logical_axes)}`` of a layer of ``kind``.

  Defaults (None or -1): H = head_dim or D // N; Hv = v_head_dim or H. kv heads:
  mqa 1 (``num_kv_heads`` ignored); gqa and kdgqa N/2 for even N, else 1; head_dims N;
  dha key heads ``num_kv_heads`` (default as gqa) and value heads ``dha_value_heads``
  (default N); sigma_diffqkv value heads ``num_kv_heads`` (default N), key heads
  ``sigma_key_heads`` (default half the value heads when even), key head dim
  ``sigma_key_head_dim`` (default 2·max(1, H // 4)), query augmentation ``sigma_q_aug_dim``
  A (0: none). Projections are truncated normals with std 1/sqrt(fan_in); MHE embeddings
  are N(0, 1) (additive) or 1 + N(0, 1)/2 (multiplicative), truncated at 2 std.
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
  D = _int("d_model", d_model, 1)
  N = _int("num_heads", num_heads, 1)
  H = _opt("head_dim", head_dim, D // N)
  if H < 1:
    raise ValueError(f"head_dim must be >= 1; got D // N = {D} // {N} = 0 (pass head_dim)")
  Hv = _opt("v_head_dim", v_head_dim, H)
  if kind == "mhe":
    if mhe_variant not in MHE_VARIANTS:
      raise ValueError(f"mhe_variant must be one of {MHE_VARIANTS}; got {mhe_variant!r}")
    emb = _normal_init(1.0) if mhe_variant == "additive" else _normal_init(0.5, 1.0)
    return {
      "w_q": ((D, H), _fan_in(D), ("embed", None)),
      "w_k": ((D, H), _fan_in(D), ("embed", None)),
      "w_v": ((D, Hv), _fan_in(D), ("embed", None)),
      "e_q": ((N, H), emb, ("heads", None)),
      "e_k": ((N, H), emb, ("heads", None)),
      "e_v": ((N, Hv), emb, ("heads", None)),
      "w_o": ((N, Hv, D), _fan_in(N * Hv), ("heads", None, "embed")),
    }
  A = 0
  if kind == "mqa":
    Kk = Kv = 1
  elif kind in ("gqa", "kdgqa"):
    Kk = Kv = _opt("num_kv_heads", num_kv_heads, _default_groups(N))
  elif kind == "head_dims":
    Kk = Kv = _opt("num_kv_heads", num_kv_heads, N)
  elif kind == "dha":
    Kk = _opt("num_kv_heads", num_kv_heads, _default_groups(N))
    Kv = _opt("dha_value_heads", dha_value_heads, N)
  else:  # sigma_diffqkv
    Kv = _opt("num_kv_heads", num_kv_heads, N)
    Kk = _opt("sigma_key_heads", sigma_key_heads, Kv // 2 if Kv % 2 == 0 else Kv)
    H = _opt("sigma_key_head_dim", sigma_key_head_dim, 2 * max(1, H // 4))
    A = _opt("sigma_q_aug_dim", sigma_q_aug_dim, 0, minimum=0)
  for name, heads in (("key heads", Kk), ("value heads", Kv)):
    if N % heads:
      raise ValueError(f"{kind}: {name} must divide num_heads={N}; got {heads}")
  specs = {"w_q": ((D, N, A or H), _fan_in(D), ("embed", "heads", None))}
  if A:
    specs["w_qa"] = ((N, A, H), _fan_in(A), ("heads", None, None))
  specs["w_k"] = ((D, Kk, H), _fan_in(D), ("embed", "kv_heads", None))
  specs["w_v"] = ((D, Kv, Hv), _fan_in(D), ("embed", "kv_heads", None))
  specs["w_o"] = ((N, Hv, D), _fan_in(N * Hv), ("heads", None, "embed"))
  return specs


def make_init(kind: str, option_keys, specs_fn, call_options=()) -> typing.Callable:
  """``init_<kind>(key, *, d_model, num_heads, num_kv_heads, head_dim, dtype, **options)``
  of the layer interface: one draw per entry of ``specs_fn(d_model=..., ..., **options)``
  (``{name: (shape, init, logical_axes)}``), refusing options outside ``option_keys``.
  Options named in ``call_options`` are accepted and not passed on (they matter to the
  layer call, not the shapes), so one config's options serve both."""

  def init(
    key,
    *,
    d_model: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    dtype=jnp.float32,
    **options,
  ) -> dict[str, Array]:
    unknown = set(options) - set(option_keys)
    if unknown:
      raise ValueError(f"unknown {kind} options {sorted(unknown)}; known: {tuple(option_keys)}")
    options = {k: v for k, v in options.items() if k not in call_options}
    specs = specs_fn(
      d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, **options
    )
    keys = jax.random.split(key, len(specs))
    return {
      name: fn(k, shape, dtype)
      for k, (name, (shape, fn, _)) in zip(keys, specs.items(), strict=True)
    }

  init.__name__ = init.__qualname__ = f"init_{kind}"
  init.__doc__ = (
    f"Parameters of ``{kind}`` (a dict of arrays; see ``param_specs`` for shapes and "
    f"defaults). Options: {', '.join(option_keys)}."
  )
  return init


def _init(kind: str):
  return make_init(kind, OPTION_KEYS[kind], functools.partial(param_specs, kind))


init_mqa = _init("mqa")
init_gqa = _init("gqa")
init_kdgqa = _init("kdgqa")
init_head_dims = _init("head_dims")
init_mhe = _init("mhe")
init_dha = _init("dha")
init_sigma_diffqkv = _init("sigma_diffqkv")


# ---------------------------------------------------------------------------------------
# Registry entries.
# ---------------------------------------------------------------------------------------


CHECKS = {
  "mqa": "Equals an MHA whose N key/value heads are copies of one head. A decode step equals "
  "the last row of full attention.",
  "gqa": "K = N equals MHA and K = 1 equals `mqa`. Mean-pool conversion of an MHA whose heads "
  "are identical within each group is exact.",
  "kdgqa": "Equal key norms reproduce static `gqa` grouping. Each group gets at least one "
  "query head, and the counts sum to N. (KDGQA only; bidirectional only: the per-sequence key "
  "norms would leak later tokens in a causal model.)",
  "head_dims": "For inputs of rank >= T, a single head with H >= T can fit an arbitrary "
  "target logit pattern. With H < T the per-head logit matrix has rank <= H (checked "
  "numerically).",
  "mhe": "Zero (additive) or all-ones (multiplicative) embeddings make all heads identical, "
  "i.e. single-head attention repeated N times. The parameter count matches the abstract's "
  "formula.",
  "dha": "Identity fusion weights equal the original MHA. Identical K and V maps reduce to `gqa`.",
  "sigma_diffqkv": "Equal head counts and dims for Q, K and V reduce to MHA.",
}
TIERS = {"mqa": 1, "gqa": 1, "kdgqa": 2, "head_dims": 1, "mhe": 2, "dha": 2, "sigma_diffqkv": 2}
NON_CAUSAL = frozenset((registry.SELF, registry.CROSS))

for _kind in KINDS:
  registry.register(
    registry.Mechanism(
      id=_kind,
      family="b",
      paper=PAPERS[_kind],
      entry_point=f"attn_jax.attention.heads:{_kind}",
      implementations=registry.KERNEL_IMPLEMENTATIONS,
      patterns=NON_CAUSAL if _kind == "kdgqa" else registry.ALL_PATTERNS,
      decode=_kind in STATIC_KINDS,
      tier=TIERS[_kind],
      check=CHECKS[_kind],
      build=registry.build_nothing,
      module="attn_jax.nn.heads:HeadStructureAttention",
      interface="layer",
      init=f"attn_jax.attention.heads:init_{_kind}",
    )
  )
