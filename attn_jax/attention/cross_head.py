"""Cross-head interaction (catalog family (c)), as pure JAX functions.

Mechanisms (registry ids) and papers:
  * ``talking_heads`` — "Talking-Heads Attention".
  * ``knocking_heads`` — "Knocking-Heads Attention".
  * ``dcmha`` — "Improving Transformers with Dynamically Composable Multi-Head Attention".
  * ``mta`` — "Multi-Token Attention".
  * ``chai`` — "CHAI: Clustered Head Attention for Efficient LLM Inference".

Dimension key: B batch, T query length, S key/value length, D model dim, N query heads,
K kv heads (G = N // K), H q/k head dim, Hv value head dim, C query rows per chunk, R rank of
DCMHA's dynamic terms, Q and W MTA's query and key taps, U heads per MTA mixing group,
L clusters of CHAI, M the most members of a CHAI cluster.

Every layer has the projections of ``attn_jax.attention.heads`` (``w_q [D, N, H]``,
``w_k [D, K, H]``, ``w_v [D, K, Hv]``, ``w_o [N, Hv, D]``, queries and keys rotated when
``rope`` is given) plus its own parameters, and the call signature of the registry's layer
interface. Two groups:

  * Head mixing of the *inputs* of attention (``knocking_heads``) and head *clustering*
    (``chai``) keep per-head softmax attention, so they run as one ``dot_product_attention``
    call (every implementation, Pallas included).
  * Mixing of the *logits or probabilities* across heads at each (query, key) pair
    (``talking_heads``, ``dcmha``) and convolution over the logit matrix (``mta``) need every
    head's score at the same (i, j) before the softmax, which the flash kernels' per-head
    online softmax cannot provide. They have two implementations: ``"reference"``
    materialises ``[B, N, T, S]`` logits at once; ``"xla"`` (the default) runs over query
    chunks of ``query_chunk`` rows with the chunk body rematerialised in the backward pass,
    so memory is ``O(B·N·C·S)`` instead of ``O(B·N·T·S)`` while the FLOPs are those of dense
    attention (no block skipping). GQA inputs (K < N) are repeated to N kv heads there,
    since each head's probabilities meet its own values anyway.

The public functions validate by hand (a ``ValueError`` naming the argument, what it got and
what it needs) and are left to that check (``typing.no_type_check``).
"""

import functools
import math
import typing

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from attn_jax.attention import api as api_lib
from attn_jax.attention import heads as heads_lib
from attn_jax.attention import registry

PAPERS = {
  "talking_heads": "Talking-Heads Attention",
  "knocking_heads": "Knocking-Heads Attention",
  "dcmha": "Improving Transformers with Dynamically Composable Multi-Head Attention",
  "mta": "Multi-Token Attention",
  "chai": "CHAI: Clustered Head Attention for Efficient LLM Inference",
}
KINDS = tuple(PAPERS)
MIXED_KINDS = ("talking_heads", "dcmha", "mta")  # need every head's logit at one (i, j)
MIXED_IMPLEMENTATIONS = ("reference", "xla")
KNOCKING_AXES = ("heads", "features")
MTA_MIX_AT = ("post", "pre")
DEFAULT_QUERY_CHUNK = 256
# Options each init takes besides the common arguments (None or -1: the default size).
OPTION_KEYS = {
  "talking_heads": ("v_head_dim",),
  "knocking_heads": ("v_head_dim", "knocking_axis"),
  "dcmha": ("v_head_dim", "dcmha_rank"),
  "mta": ("v_head_dim", "mta_query_taps", "mta_key_taps", "mta_head_group"),
  "chai": ("v_head_dim",),
}
_BASE = ("w_q", "w_k", "w_v", "w_o")
_DCMHA_TERMS = ("w_b", "qw1", "qw2", "kw1", "kw2", "qg", "kg")
_KNOCK = {
  "heads": ("mix_heads_q", "mix_heads_k", "mix_heads_v"),
  "features": ("mix_feat_q", "mix_feat_k", "mix_feat_v"),
}

_LAYER_ARGS = """
  Args:
    params: the layer's parameter pytree (``init_<id>``).
    x_BTD: query-side tokens ``[B, T, D]``.
    context_BSD: key/value-side tokens ``[B, S, D]`` (None: self-attention, S = T).
    causal: causal (bottom-right aligned when S != T) or bidirectional.
    implementation: see the module docstring.
    mask: an extra ``masks.Mask`` combined with the causal mask.
    positions_BT: query positions for RoPE (default ``arange(T)``; ``S − T + arange(T)`` in
      cross-attention, whose keys sit at ``arange(S)``).
    rope: None, or ``dict(base=..., rotary_dim=...)`` to rotate q and k.
    return_aux: also return a dict of auxiliary outputs (empty for this family).

  Returns:
    ``y [B, T, D]`` (and the aux dict when ``return_aux``).
"""


# ---------------------------------------------------------------------------------------
# Parameters: validation, specs, inits.
# ---------------------------------------------------------------------------------------


class Dims(typing.NamedTuple):
  D: int
  N: int
  K: int
  H: int
  Hv: int


def _shape(params, name):
  return tuple(np.shape(params[name]))


def dims_of(params, kind: str) -> Dims:
  """The sizes of ``params`` of ``kind``, every array checked against them."""
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
  if not isinstance(params, dict):
    raise ValueError(f"params must be a dict of arrays (see init_{kind}); got {type(params)}")
  if kind == "knocking_heads":
    extra = [names for names in _KNOCK.values() if set(names) <= set(params)]
    if len(extra) != 1:
      raise ValueError(
        f"knocking_heads params must hold exactly one of the sets {list(_KNOCK.values())}; "
        f"got keys {sorted(params)}"
      )
    extra = extra[0]
  else:
    extra = {
      "talking_heads": ("w_pre", "w_post"),
      "dcmha": tuple(f"{s}_{t}" for s in ("pre", "post") for t in _DCMHA_TERMS),
      "mta": ("kq_conv", "head_mix"),
      "chai": (),
    }[kind]
  want = set(_BASE) | set(extra)
  if set(params) != want:
    raise ValueError(f"params of {kind!r} must hold {sorted(want)}; got keys {sorted(params)}")
  for name in params:
    if name in _BASE and np.ndim(params[name]) != 3:
      raise ValueError(f"params[{name!r}] must have rank 3; got shape {_shape(params, name)}")
  D, N, H = _shape(params, "w_q")
  _, K, _ = _shape(params, "w_k")
  Hv = _shape(params, "w_v")[2]
  if K < 1 or N % K:
    raise ValueError(f"kv heads K={K} (w_k) must divide query heads N={N} (w_q)")
  shapes = {"w_k": (D, K, H), "w_v": (D, K, Hv), "w_o": (N, Hv, D)}
  if kind == "talking_heads":
    shapes |= {"w_pre": (N, N), "w_post": (N, N)}
  elif kind == "knocking_heads":
    if extra == _KNOCK["heads"]:
      shapes |= dict(zip(extra, [(N, N), (K, K), (K, K)], strict=True))
    else:
      shapes |= dict(zip(extra, [(H, H), (H, H), (Hv, Hv)], strict=True))
  elif kind == "dcmha":
    R = np.shape(params["pre_qw1"])[-1] if np.ndim(params["pre_qw1"]) == 3 else -1
    for s in ("pre", "post"):
      shapes |= {
        f"{s}_w_b": (N, N),
        f"{s}_qw1": (D, N, R),
        f"{s}_qw2": (D, R, N),
        f"{s}_kw1": (D, N, R),
        f"{s}_kw2": (D, R, N),
        f"{s}_qg": (D, N),
        f"{s}_kg": (D, N),
      }
  elif kind == "mta":
    conv = _shape(params, "kq_conv")
    mix = _shape(params, "head_mix")
    if len(conv) != 3 or conv[0] != N or min(conv) < 1:
      raise ValueError(f"params['kq_conv'] must have shape [N={N}, Q, W]; got {conv}")
    U = mix[-1] if len(mix) == 3 else -1
    if len(mix) != 3 or U < 1 or N % U or mix != (N // U, U, U):
      raise ValueError(f"params['head_mix'] must have shape [N / U, U, U], U | N={N}; got {mix}")
  for name, shape in shapes.items():
    if _shape(params, name) != shape:
      raise ValueError(f"params[{name!r}] must have shape {shape}; got {_shape(params, name)}")
  return Dims(D, N, K, H, Hv)


def _eye_init(key, shape, dtype):
  del key
  eye = jnp.eye(shape[-1], dtype=dtype)
  return jnp.broadcast_to(eye, shape)


def _zeros(key, shape, dtype):
  del key
  return jnp.zeros(shape, dtype)


def _delta_conv(key, shape, dtype):
  """MTA's identity convolution: tap (query offset 0, key offset 0) is 1 for every head."""
  del key
  N, _, W = shape
  return jnp.zeros(shape, dtype).at[:, 0, W // 2].set(1)


def param_specs(
  kind: str,
  *,
  d_model: int,
  num_heads: int,
  num_kv_heads: int | None = None,
  head_dim: int | None = None,
  v_head_dim: int | None = None,
  knocking_axis: str = "heads",
  dcmha_rank: int | None = None,
  mta_query_taps: int | None = None,
  mta_key_taps: int | None = None,
  mta_head_group: int | None = None,
) -> dict[str, tuple[tuple[int, ...], typing.Callable, tuple]]:
  """``{name: (shape, init(key, shape, dtype), logical_axes)}`` of a layer of ``kind``.

  Defaults (None or -1): K = N (``num_kv_heads``), H = D // N, Hv = H, DCMHA rank R = 2,
  MTA taps Q = 6 (queries) by W = 11 (keys, centred) and mixing groups of U = 2 heads (1 for
  odd N). Every mixing parameter starts at the identity, so each layer starts as the MHA
  (GQA) of its projections: ``w_pre = w_post = I``; knocking mixes ``I``; DCMHA ``w_b = I``,
  ``qw2 = kw2 = 0`` (``qw1``, ``kw1`` small random, so gradients reach ``qw2``/``kw2``), gates
  ``qg = kg = 0``; MTA a delta convolution and identity head mixing.
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
  specs = heads_lib.param_specs(
    "head_dims",
    d_model=d_model,
    num_heads=num_heads,
    num_kv_heads=num_kv_heads,
    head_dim=head_dim,
    v_head_dim=v_head_dim,
  )
  D, N, H = specs["w_q"][0]
  K, Hv = specs["w_k"][0][1], specs["w_v"][0][2]
  mix_axes = ("heads", None)
  if kind == "talking_heads":
    specs["w_pre"] = ((N, N), _eye_init, mix_axes)
    specs["w_post"] = ((N, N), _eye_init, mix_axes)
  elif kind == "knocking_heads":
    if knocking_axis not in KNOCKING_AXES:
      raise ValueError(f"knocking_axis must be one of {KNOCKING_AXES}; got {knocking_axis!r}")
    sizes = [N, K, K] if knocking_axis == "heads" else [H, H, Hv]
    for name, n in zip(_KNOCK[knocking_axis], sizes, strict=True):
      specs[name] = ((n, n), _eye_init, (None, None))
  elif kind == "dcmha":
    R = heads_lib._opt("dcmha_rank", dcmha_rank, 2)
    small = heads_lib._normal_init(D**-0.5)
    for s in ("pre", "post"):
      specs[f"{s}_w_b"] = ((N, N), _eye_init, mix_axes)
      specs[f"{s}_qw1"] = ((D, N, R), small, ("embed", "heads", None))
      specs[f"{s}_qw2"] = ((D, R, N), _zeros, ("embed", None, "heads"))
      specs[f"{s}_kw1"] = ((D, N, R), small, ("embed", "heads", None))
      specs[f"{s}_kw2"] = ((D, R, N), _zeros, ("embed", None, "heads"))
      specs[f"{s}_qg"] = ((D, N), _zeros, ("embed", "heads"))
      specs[f"{s}_kg"] = ((D, N), _zeros, ("embed", "heads"))
  elif kind == "mta":
    Q = heads_lib._opt("mta_query_taps", mta_query_taps, 6)
    W = heads_lib._opt("mta_key_taps", mta_key_taps, 11)
    U = heads_lib._opt("mta_head_group", mta_head_group, 2 if N % 2 == 0 else 1)
    if N % U:
      raise ValueError(f"mta_head_group={U} must divide num_heads={N}")
    specs["kq_conv"] = ((N, Q, W), _delta_conv, ("heads", None, None))
    specs["head_mix"] = ((N // U, U, U), _eye_init, (None, None, None))
  return specs


def _init(kind: str):
  return heads_lib.make_init(kind, OPTION_KEYS[kind], functools.partial(param_specs, kind))


init_talking_heads = _init("talking_heads")
init_knocking_heads = _init("knocking_heads")
init_dcmha = _init("dcmha")
init_mta = _init("mta")
init_chai = _init("chai")


# ---------------------------------------------------------------------------------------
# Attention with cross-head score functions, over query chunks.
# ---------------------------------------------------------------------------------------


def _masked_softmax(logits, visible):
  """Softmax over the last axis of the visible entries; fully masked rows give 0 (no NaN in
  values or gradients)."""
  logits = jnp.where(visible, logits, -jnp.inf)
  row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  e = jnp.where(visible, jnp.exp(logits - row_max), 0.0)
  denom = e.sum(-1, keepdims=True)
  return e / jnp.where(denom == 0, 1.0, denom)


def _check_implementation(kind: str, implementation):
  if implementation is None:
    return "xla"
  if implementation not in MIXED_IMPLEMENTATIONS:
    raise NotImplementedError(
      f"{kind} mixes every head's score at each (query, key) before the softmax, which the "
      f"flash kernels' per-head online softmax cannot do; implementation must be one of "
      f"{MIXED_IMPLEMENTATIONS} (the query-chunked 'xla' path is the memory-lean one); got "
      f"{implementation!r}"
    )
  return implementation


def mixed_attention(
  q_BTNH: Float[Array, "B T N H"],
  k_BSNH: Float[Array, "B S N H"],
  v_BSNV: Float[Array, "B S N Hv"],
  *,
  mask,
  pre: typing.Callable,
  post: typing.Callable,
  query_features=(),
  halo: int = 0,
  query_chunk: int | None = None,
) -> Float[Array, "B T N Hv"]:
  """Softmax attention whose logits and probabilities are transformed across heads.

  For each chunk of C query rows (all T rows when ``query_chunk`` is None)::

      s = q·kᵀ / sqrt(H)                       [B, N, C + halo, S] (rows start − halo ...)
      s' = pre(s, visible, features)            [B, N, C, S]
      p = softmax over the visible keys of s'   (fully masked rows: 0)
      o_n = post(p, features)_n · v_n

  ``visible`` is the mask at the chunk's rows, broadcastable to ``[B, 1, C + halo, S]``;
  rows before 0 or past T are invisible. ``query_features`` is a tuple of ``[B, T, ...]``
  arrays handed to ``pre``/``post`` sliced to the chunk's C rows (no halo). With a
  ``query_chunk`` the chunks run under ``lax.map`` with the body rematerialised in the
  backward pass (``jax.checkpoint``), so no ``[B, N, T, S]`` tensor is ever held.
  """
  B, T, N, H = q_BTNH.shape
  S = k_BSNH.shape[1]
  C = T if query_chunk is None else max(1, min(int(query_chunk), T))
  num_chunks = -(-T // C)
  Tp = num_chunks * C
  dtype = jnp.promote_types(q_BTNH.dtype, jnp.float32)
  q_BTNH, k_BSNH, v_BSNV = (a.astype(dtype) for a in (q_BTNH, k_BSNH, v_BSNV))
  q_pad = jnp.pad(q_BTNH, ((0, 0), (halo, Tp - T), (0, 0), (0, 0)))
  feats = tuple(jnp.pad(f, [(0, 0), (0, Tp - T)] + [(0, 0)] * (f.ndim - 2)) for f in query_features)
  scale = 1.0 / math.sqrt(H)
  kv_idx = jnp.arange(S)[None, :]

  def chunk(start):
    rows = start - halo + jnp.arange(C + halo)
    q_c = jax.lax.dynamic_slice_in_dim(q_pad, start, C + halo, axis=1)
    f_c = tuple(jax.lax.dynamic_slice_in_dim(f, start, C, axis=1) for f in feats)
    valid = ((rows >= 0) & (rows < T))[:, None]
    if mask is not None:
      valid = valid & mask.visible(rows[:, None], kv_idx, q_offset=S - T)
    visible = valid[:, None] if valid.ndim == 3 else valid[None, None]  # [B|1, 1, C+halo, S]
    logits = jnp.einsum("BCNH,BSNH->BNCS", q_c, k_BSNH) * scale
    logits = pre(logits, visible, f_c)
    probs = post(_masked_softmax(logits, visible[:, :, halo:]), f_c)
    return jnp.einsum("BNCS,BSNV->BCNV", probs, v_BSNV)

  if query_chunk is None:
    out = chunk(0)
  else:
    starts = jnp.arange(num_chunks) * C
    out = jax.lax.map(jax.checkpoint(chunk), starts)  # [nC, B, C, N, Hv]
    out = jnp.moveaxis(out, 0, 1).reshape(B, Tp, N, -1)
  return out[:, :T]


def _head_mix(w_NN):
  """s'_n = Σ_m W[n, m] s_m at every (query, key)."""
  return lambda a, *_: jnp.einsum("BMCS,NM->BNCS", a, w_NN.astype(a.dtype))


def _setup(kind, params, x_BTD, context_BSD, causal, mask, positions_BT, rope):
  dims = dims_of(params, kind)
  call = heads_lib._check_call(dims.D, x_BTD, context_BSD, causal, mask, positions_BT, rope)
  base = {name: params[name] for name in _BASE}
  q_BTNH, k_BSKH, v_BSKV = heads_lib._static_qkv(base, x_BTD, call.src_BSD, call)
  return dims, call, q_BTNH, k_BSKH, v_BSKV


def _repeat_kv(k_BSKH, v_BSKV, N):
  G = N // k_BSKH.shape[2]
  return jnp.repeat(k_BSKH, G, axis=2), jnp.repeat(v_BSKV, G, axis=2)


def _chunk_arg(query_chunk, implementation):
  if implementation == "reference":
    return None
  return heads_lib._opt("query_chunk", query_chunk, DEFAULT_QUERY_CHUNK)


# ---------------------------------------------------------------------------------------
# talking_heads.
# ---------------------------------------------------------------------------------------


@typing.no_type_check
def talking_heads(
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
  query_chunk: int | None = None,
):
  impl = _check_implementation("talking_heads", implementation)
  dims, call, q, k, v = _setup(
    "talking_heads", params, x_BTD, context_BSD, causal, mask, positions_BT, rope
  )
  k, v = _repeat_kv(k, v, dims.N)
  o_BTNV = mixed_attention(
    q,
    k,
    v,
    mask=call.mask,
    pre=_head_mix(params["w_pre"]),
    post=_head_mix(params["w_post"]),
    query_chunk=_chunk_arg(query_chunk, impl),
  ).astype(x_BTD.dtype)
  return heads_lib._finish(heads_lib.output_projection(params, o_BTNV), {}, return_aux)


talking_heads.__doc__ = (
  """Talking-heads attention (Talking-Heads Attention).

  Learned N×N mixing across heads of the logits before the softmax and of the probabilities
  after it, at every (query i, key j)::

      s_n = q_i,n · k_j,n / sqrt(H)
      s'_n = Σ_m W_pre[n, m] s_m,    p = softmax_j(s'),    p'_n = Σ_m W_post[n, m] p_m
      o_i,n = Σ_j p'_n[i, j] v_j,n

  (the paper's separate logit/weight head counts are both N here). The mask applies after
  the pre-softmax mixing (so no head reads a masked position's logit); masked probabilities
  are 0 in every head and stay 0 after the post mixing. ``query_chunk`` (default 256) sets
  the rows per chunk of the "xla" path.
"""
  + _LAYER_ARGS
)


# ---------------------------------------------------------------------------------------
# dcmha.
# ---------------------------------------------------------------------------------------


# Up to this many heads, Compose is written as per-head sums of [B, C, S] planes, which XLA
# fuses into a few elementwise loops; an einsum contracting N = 4 heads is a tiny matmul per
# (b, i, j) and measured about 2x slower on CPU. Beyond it the N² unrolled terms would bloat
# the graph, and the einsums are used.
_UNROLL_HEADS = 8


def _compose_unrolled(a_BNCS, w_b_NM, qw1_BCNR, qw2_BCRM, kw1_BSNR, kw2_BSRM, qg_BNC, kg_BNS):
  """``_compose``'s sum for small N, term by term over heads and rank (the same math)."""
  N, R = a_BNCS.shape[1], qw1_BCNR.shape[-1]
  a = [a_BNCS[:, n] for n in range(N)]  # N x [B, C, S]
  hq = [sum(a[n] * qw1_BCNR[:, :, n, r, None] for n in range(N)) for r in range(R)]
  hk = [sum(a[n] * kw1_BSNR[:, None, :, n, r] for n in range(N)) for r in range(R)]
  out = []
  for m in range(N):
    o = sum(a[n] * w_b_NM[n, m] for n in range(N))
    o = o + sum(hq[r] * qw2_BCRM[:, :, r, m, None] for r in range(R))
    o = o + sum(hk[r] * kw2_BSRM[:, None, :, r, m] for r in range(R))
    out.append(o + a[m] * (qg_BNC[:, m, :, None] + kg_BNS[:, m, None, :]))
  return jnp.stack(out, axis=1)


def _compose(params, prefix: str, xk_BSD):
  """DCMHA's Compose on the N-vector a = a[:, :, i, j], for the query chunk's x_i and x_j::

  a'_m = Σ_n a_n W_b[n, m]
       + Σ_r (Σ_n a_n qw1(x_i)[n, r]) qw2(x_i)[r, m]      (query-wise, rank R)
       + Σ_r (Σ_n a_n kw1(x_j)[n, r]) kw2(x_j)[r, m]      (key-wise, rank R)
       + tanh(x_i W_qg)_m a_m + tanh(x_j W_kg)_m a_m      (query- and key-wise gates)
  """
  p = {t: params[f"{prefix}_{t}"] for t in _DCMHA_TERMS}
  dtype = jnp.promote_types(xk_BSD.dtype, jnp.float32)
  xk = xk_BSD.astype(dtype)
  kw1_BSNR = jnp.einsum("BSD,DNR->BSNR", xk, p["kw1"].astype(dtype))
  kw2_BSRN = jnp.einsum("BSD,DRN->BSRN", xk, p["kw2"].astype(dtype))
  kg_BNS = jnp.tanh(jnp.einsum("BSD,DN->BNS", xk, p["kg"].astype(dtype)))

  def compose(a_BNCS, *args):
    (xq_BCD,) = args[-1]
    xq = xq_BCD.astype(dtype)
    qw1 = jnp.einsum("BCD,DNR->BCNR", xq, p["qw1"].astype(dtype))
    qw2 = jnp.einsum("BCD,DRN->BCRN", xq, p["qw2"].astype(dtype))
    qg_BNC = jnp.tanh(jnp.einsum("BCD,DN->BNC", xq, p["qg"].astype(dtype)))
    if a_BNCS.shape[1] <= _UNROLL_HEADS:
      return _compose_unrolled(
        a_BNCS, p["w_b"].astype(dtype), qw1, qw2, kw1_BSNR, kw2_BSRN, qg_BNC, kg_BNS
      )
    out = jnp.einsum("BNCS,NM->BMCS", a_BNCS, p["w_b"].astype(dtype))
    out += jnp.einsum("BCRS,BCRM->BMCS", jnp.einsum("BNCS,BCNR->BCRS", a_BNCS, qw1), qw2)
    h_BRCS = jnp.einsum("BNCS,BSNR->BRCS", a_BNCS, kw1_BSNR)
    out += jnp.einsum("BRCS,BSRM->BMCS", h_BRCS, kw2_BSRN)
    return out + a_BNCS * (qg_BNC[..., None] + kg_BNS[:, :, None, :])

  return compose


@typing.no_type_check
def dcmha(
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
  query_chunk: int | None = None,
):
  impl = _check_implementation("dcmha", implementation)
  dims, call, q, k, v = _setup(
    "dcmha", params, x_BTD, context_BSD, causal, mask, positions_BT, rope
  )
  k, v = _repeat_kv(k, v, dims.N)
  o_BTNV = mixed_attention(
    q,
    k,
    v,
    mask=call.mask,
    pre=_compose(params, "pre", call.src_BSD),
    post=_compose(params, "post", call.src_BSD),
    query_features=(x_BTD,),
    query_chunk=_chunk_arg(query_chunk, impl),
  ).astype(x_BTD.dtype)
  return heads_lib._finish(heads_lib.output_projection(params, o_BTNV), {}, return_aux)


dcmha.__doc__ = (
  """Dynamically composable multi-head attention (Improving Transformers with Dynamically
  Composable Multi-Head Attention).

  ``Compose`` (see ``_compose``) acts on the N-vector of scores at each (query i, key j),
  once on the logits before the softmax (``pre_*`` parameters) and once on the
  probabilities after it (``post_*``)::

      a'_m = Σ_n a_n W_b[n, m] + (a·qw1(x_i))·qw2(x_i)_m + (a·kw1(x_j))·kw2(x_j)_m
             + tanh(x_i W_qg)_m a_m + tanh(x_j W_kg)_m a_m

  with a static W_b, rank-R query-wise and key-wise terms whose factors are linear in the
  layer inputs (``qw1(x) = x·W_qw1 ∈ R^(N×R)``, ``qw2(x) = x·W_qw2 ∈ R^(R×N)``; our reading:
  the paper derives them from the inputs through a small network, a linear map here), and
  query- and key-wise gates. x_i is the query-side token, x_j the key-side token (the
  context in cross-attention). Every term acts at a single (i, j), so causality holds. With
  every dynamic term 0 and W_b = I it is MHA (the initialisation).
"""
  + _LAYER_ARGS
)


# ---------------------------------------------------------------------------------------
# mta.
# ---------------------------------------------------------------------------------------


def _kq_conv(kernel_NQW, a_BNRS, Q: int):
  """Depthwise 2-D convolution over (query rows, keys)::

  out[n, i, j] = Σ_(a<Q) Σ_b θ[n, a, W//2 + b] · s[n, i − a, j − b],  b ∈ [−W//2, W − W//2)

  ``a_BNRS`` holds Q − 1 halo rows before the C output rows; keys are zero-padded.
  """
  N, _, W = kernel_NQW.shape
  rhs = jnp.flip(kernel_NQW, axis=(1, 2))[:, None].astype(a_BNRS.dtype)  # [N, 1, Q, W]
  return jax.lax.conv_general_dilated(
    a_BNRS,
    rhs,
    window_strides=(1, 1),
    padding=((0, 0), (W - 1 - W // 2, W // 2)),
    dimension_numbers=("NCHW", "OIHW", "NCHW"),
    feature_group_count=N,
    precision=jax.lax.Precision.HIGHEST,
  )


def _group_mix(mix_GUU):
  """Heads in groups of U mixed by a U×U matrix per group: a'_(g,u) = Σ_w M[g, u, w] a_(g,w)."""

  def mix(a_BNCS, *_):
    B, N, C, S = a_BNCS.shape
    G, U, _ = mix_GUU.shape
    a = a_BNCS.reshape(B, G, U, C, S)
    return jnp.einsum("BGWCS,GUW->BGUCS", a, mix_GUU.astype(a.dtype)).reshape(B, N, C, S)

  return mix


@typing.no_type_check
def mta(
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
  mta_head_mix: str = "post",
  query_chunk: int | None = None,
):
  impl = _check_implementation("mta", implementation)
  if mta_head_mix not in MTA_MIX_AT:
    raise ValueError(f"mta_head_mix must be one of {MTA_MIX_AT}; got {mta_head_mix!r}")
  dims, call, q, k, v = _setup("mta", params, x_BTD, context_BSD, causal, mask, positions_BT, rope)
  k, v = _repeat_kv(k, v, dims.N)
  conv, Q = params["kq_conv"], params["kq_conv"].shape[1]
  mix = _group_mix(params["head_mix"])

  def pre(a_BNRS, visible, feats):
    a = _kq_conv(conv, jnp.where(visible, a_BNRS, 0.0), Q)
    return mix(a) if mta_head_mix == "pre" else a

  def post(p_BNCS, feats):
    return mix(p_BNCS) if mta_head_mix == "post" else p_BNCS

  o_BTNV = mixed_attention(
    q,
    k,
    v,
    mask=call.mask,
    pre=pre,
    post=post,
    halo=Q - 1,
    query_chunk=_chunk_arg(query_chunk, impl),
  ).astype(x_BTD.dtype)
  return heads_lib._finish(heads_lib.output_projection(params, o_BTNV), {}, return_aux)


mta.__doc__ = (
  """Multi-token attention (Multi-Token Attention): key–query and head convolutions.

  Key–query convolution, per head n, over the logit matrix (Q query taps looking back,
  W key taps centred on the key)::

      ŝ = s with invisible (masked, e.g. future) entries set to 0
      s'[n, i, j] = Σ_(a<Q) Σ_(b=−⌊W/2⌋)^(W−⌊W/2⌋−1) θ_n[a, b] ŝ[n, i − a, j − b]
      p = softmax_j(s' with invisible entries −∞)

  An entry (i − a, j − b) contributes only if it is visible; under the causal mask that is
  j − b ≤ i − a ≤ i, so row i never reads a later token. Head-mixing convolution: heads in
  groups of U mixed by learned U×U matrices (``head_mix``), after the softmax
  (``mta_head_mix="post"``, default) or on the convolved logits ("pre"). A delta kernel
  (θ_n[0, 0] = 1) with identity mixing is MHA (the initialisation). Not built: the paper's
  group normalisation with depth-dependent scaling of the head outputs (a normalisation
  after attention, orthogonal to the score function). ``query_chunk`` rows per chunk of
  the "xla" path, each with Q − 1 halo rows.
"""
  + _LAYER_ARGS
)


# ---------------------------------------------------------------------------------------
# knocking_heads.
# ---------------------------------------------------------------------------------------


@typing.no_type_check
def knocking_heads(
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
  dims = dims_of(params, "knocking_heads")
  call = heads_lib._check_call(dims.D, x_BTD, context_BSD, causal, mask, positions_BT, rope)
  dtype = x_BTD.dtype
  w = {name: params[name].astype(dtype) for name in params}
  q = jnp.einsum("BTD,DNH->BTNH", x_BTD, w["w_q"])
  k = jnp.einsum("BSD,DKH->BSKH", call.src_BSD, w["w_k"])
  v = jnp.einsum("BSD,DKV->BSKV", call.src_BSD, w["w_v"])
  if "mix_heads_q" in params:  # reading (i): mixing over the head axis
    q = jnp.einsum("BTMH,NM->BTNH", q, w["mix_heads_q"])
    k = jnp.einsum("BSMH,KM->BSKH", k, w["mix_heads_k"])
    v = jnp.einsum("BSMV,KM->BSKV", v, w["mix_heads_v"])
  else:  # reading (ii): one feature map shared by all heads
    q = jnp.einsum("BTNH,HG->BTNG", q, w["mix_feat_q"])
    k = jnp.einsum("BSKH,HG->BSKG", k, w["mix_feat_k"])
    v = jnp.einsum("BSKV,VW->BSKW", v, w["mix_feat_v"])
  q = heads_lib._rotate(q, call.q_pos_BT, call.rope)
  k = heads_lib._rotate(k, call.kv_pos_BS, call.rope)
  o_BTNV = api_lib.dot_product_attention(q, k, v, mask=call.mask, implementation=implementation)
  return heads_lib._finish(heads_lib.output_projection(params, o_BTNV), {}, return_aux)


knocking_heads.__doc__ = (
  """Knocking-heads attention (Knocking-Heads Attention).

  One shared, identity-initialised projection on the per-head q/k/v features before the
  attention (and before RoPE). The abstract does not fix the axis; both readings are built
  and chosen by which parameters the pytree holds (``knocking_axis`` of the init):

  * ``"heads"`` (``mix_heads_q [N, N]``, ``mix_heads_k [K, K]``, ``mix_heads_v [K, K]``):
    q'_n = Σ_m M_q[n, m] q_m, and likewise for the K key and value heads;
  * ``"features"`` (``mix_feat_q [H, H]``, ``mix_feat_k [H, H]``, ``mix_feat_v [Hv, Hv]``):
    q'_n = q_n A_q for every head n, and likewise for k and v.

  Then GQA/MHA softmax attention, one ``dot_product_attention`` call (flash kernels
  included). Both are linear in the projections, so ``knocking_fold`` folds them into plain
  ``w_q``/``w_k``/``w_v`` after training (identical outputs, no extra cost at inference).
"""
  + _LAYER_ARGS
)


def knocking_fold(params) -> dict[str, Array]:
  """``gqa``/``head_dims`` params with the knocking mixes folded into the projections."""
  dims_of(params, "knocking_heads")
  out = {name: params[name] for name in _BASE}
  if "mix_heads_q" in params:
    out["w_q"] = jnp.einsum("DMH,NM->DNH", params["w_q"], params["mix_heads_q"])
    out["w_k"] = jnp.einsum("DMH,KM->DKH", params["w_k"], params["mix_heads_k"])
    out["w_v"] = jnp.einsum("DMV,KM->DKV", params["w_v"], params["mix_heads_v"])
  else:
    out["w_q"] = jnp.einsum("DNH,HG->DNG", params["w_q"], params["mix_feat_q"])
    out["w_k"] = jnp.einsum("DKH,HG->DKG", params["w_k"], params["mix_feat_k"])
    out["w_v"] = jnp.einsum("DKV,VW->DKW", params["w_v"], params["mix_feat_v"])
  return out


# ---------------------------------------------------------------------------------------
# chai.
# ---------------------------------------------------------------------------------------


def check_clusters(clusters, N: int) -> tuple[int, ...]:
  """``clusters[n]`` is the representative head of head n; representatives represent
  themselves. None, ``""`` or ``-1`` mean singleton clusters; a comma string is accepted
  (the config form, e.g. ``"0,0,2,2"``)."""
  if clusters is None or clusters == "" or clusters == -1:
    return tuple(range(N))
  if isinstance(clusters, str):
    try:
      clusters = [int(c) for c in clusters.split(",")]
    except ValueError:
      raise ValueError(f"chai_clusters must be comma-separated ints; got {clusters!r}") from None
  clusters = tuple(int(c) for c in np.asarray(clusters).reshape(-1))
  if len(clusters) != N or not all(0 <= c < N for c in clusters):
    raise ValueError(
      f"chai_clusters must give a representative in [0, {N}) for each of the N={N} heads; "
      f"got {clusters}"
    )
  bad = [c for c in set(clusters) if clusters[c] != c]
  if bad:
    raise ValueError(f"chai_clusters: representatives {sorted(bad)} must represent themselves")
  return clusters


def chai_plan(clusters: tuple[int, ...]):
  """(representatives [L], members [L, M] padded with -1) of a cluster assignment."""
  reps = sorted(set(clusters))
  members = [[n for n, c in enumerate(clusters) if c == r] for r in reps]
  M = max(len(m) for m in members)
  return np.asarray(reps), np.asarray([m + [-1] * (M - len(m)) for m in members])


@typing.no_type_check
def chai(
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
  chai_clusters=None,
):
  dims, call, q, k, v = _setup("chai", params, x_BTD, context_BSD, causal, mask, positions_BT, rope)
  clusters = check_clusters(chai_clusters, dims.N)
  reps, members = chai_plan(clusters)
  L, M = members.shape
  G = dims.N // dims.K
  q_BTLH = q[:, :, reps]
  k_BSLH = k[:, :, reps // G]
  # Values of each cluster's members side by side (absent members: zeros).
  v_BSLMV = jnp.where(
    (members >= 0)[None, None, :, :, None], v[:, :, np.maximum(members, 0) // G], 0
  )
  B, S = v.shape[:2]
  o = api_lib.dot_product_attention(
    q_BTLH,
    k_BSLH,
    v_BSLMV.reshape(B, S, L, M * dims.Hv),
    mask=call.mask,
    implementation=implementation,
  )
  o_BTLMV = o.reshape(*o.shape[:2], L, M, dims.Hv)
  # Scatter members back to their head slots: head n is member slot (cluster, index).
  slot = np.zeros(dims.N, np.int64)
  for c, row in enumerate(members):
    for m, n in enumerate(row):
      if n >= 0:
        slot[n] = c * M + m
  o_BTNV = o_BTLMV.reshape(*o.shape[:2], L * M, dims.Hv)[:, :, slot]
  return heads_lib._finish(heads_lib.output_projection(params, o_BTNV), {}, return_aux)


chai.__doc__ = (
  """Clustered head attention (CHAI: Clustered Head Attention for Efficient LLM Inference).

  Heads are grouped into clusters whose attention maps correlate; only each cluster's
  representative r(n) computes probabilities, and every member reuses them with its own
  values::

      o_t,n = Σ_s softmax_s(q_t,r(n) · k_s,r(n) / sqrt(H)) v_s,n

  Computed as one ``dot_product_attention`` call with L = #clusters heads: the
  representatives' queries and keys against their members' values concatenated along the
  value dim (``[B, S, L, M·Hv]``, absent members zero), so the probabilities are computed L
  times instead of N and only the representatives' keys are needed (the key cache shrinks
  by N / L). ``chai_clusters`` (a tuple or comma string, entry n the representative of
  head n; default singletons = MHA) is static: chosen offline per layer, e.g. by
  ``chai_cluster_heads`` on the probabilities of a few prompts.
"""
  + _LAYER_ARGS
)


def chai_cluster_heads(probs_BNTS, num_clusters: int, *, iterations: int = 20) -> tuple:
  """Offline clustering of heads by the correlation of their attention maps (k-medoids).

  Each head's probabilities are flattened over (batch, query, key) and centred; the distance
  is 1 − Pearson correlation. Medoids start from the most central head and then the
  farthest heads, and alternate assignment / medoid update. Returns the representative of
  each head (representatives are medoids, i.e. actual heads, and represent themselves).
  """
  p = np.asarray(probs_BNTS, np.float64)
  if p.ndim != 4:
    raise ValueError(f"probs_BNTS must have shape [B, N, T, S]; got {p.shape}")
  N = p.shape[1]
  num_clusters = heads_lib._int("num_clusters", num_clusters, 1)
  if num_clusters > N:
    raise ValueError(f"num_clusters must be <= N={N}; got {num_clusters}")
  feats = np.moveaxis(p, 1, 0).reshape(N, -1)
  feats = feats - feats.mean(1, keepdims=True)
  norms = np.linalg.norm(feats, axis=1, keepdims=True)
  feats = feats / np.where(norms == 0, 1, norms)
  dist = 1 - feats @ feats.T
  medoids = [int(np.argmin(dist.sum(1)))]
  while len(medoids) < num_clusters:
    medoids.append(int(np.argmax(dist[:, medoids].min(1))))
  for _ in range(iterations):
    assign = np.argmin(dist[:, medoids], axis=1)
    new = []
    for c in range(num_clusters):
      members = np.flatnonzero(assign == c)
      new.append(int(members[np.argmin(dist[np.ix_(members, members)].sum(1))]))
    if new == medoids:
      break
    medoids = new
  assign = np.argmin(dist[:, medoids], axis=1)
  reps = [medoids[a] for a in assign]
  for m in medoids:
    reps[m] = m
  return tuple(reps)


# ---------------------------------------------------------------------------------------
# Registry entries.
# ---------------------------------------------------------------------------------------


CHECKS = {
  "talking_heads": "Identity W_pre and W_post equal MHA. A permutation matrix as W_post only "
  "changes which probability map each value head reads.",
  "knocking_heads": "At identity init, both readings (head-axis and feature-axis mixing) "
  "equal the base MHA/GQA exactly. Either reading folded into the projections gives "
  "identical outputs.",
  "dcmha": "With all dynamic terms zero and W_b = I, it equals MHA.",
  "mta": "Delta kernels with identity head mixing equal MHA. In the causal variant, row i "
  "does not change when tokens after i change. (Group normalisation not built.)",
  "chai": "Singleton clusters equal MHA. The concatenated-value call equals reusing the "
  "representative's probabilities member by member.",
}
TIERS = {"talking_heads": 1, "knocking_heads": 2, "dcmha": 2, "mta": 2, "chai": 2}

for _kind in KINDS:
  registry.register(
    registry.Mechanism(
      id=_kind,
      family="c",
      paper=PAPERS[_kind],
      entry_point=f"attn_jax.attention.cross_head:{_kind}",
      implementations=MIXED_IMPLEMENTATIONS
      if _kind in MIXED_KINDS
      else registry.KERNEL_IMPLEMENTATIONS,
      patterns=registry.ALL_PATTERNS,
      decode=False,
      tier=TIERS[_kind],
      check=CHECKS[_kind],
      build=registry.build_nothing,
      module="attn_jax.nn.cross_head:CrossHeadAttention",
      interface="layer",
      init=f"attn_jax.attention.cross_head:init_{_kind}",
    )
  )
