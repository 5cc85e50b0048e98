"""Relative attention with the skew trick (catalog family (a), ``rel_skew``) as a pure JAX
function.

"Music Transformer".

Dimension key: B batch, T length, N heads, K kv heads, H head dim, Hv value head dim,
L relative distances (0 .. L − 1).

Causal self-attention with learned per-head relative embeddings e_r (one per distance r)::

    logits_ij = (q_i · k_j + q_i · e_(i−j)) / sqrt(H)       j <= i

The relative term S_rel[i, j] = q_i · e_(i−j) comes from Q Eᵀ by the skew: with the rows of
E ordered from distance T − 1 down to 0, left-pad one zero column to [T, T + 1], reshape to
[T + 1, T] and drop the first row; entry (i, j <= i) is then q_i · e_(i−j) (entries j > i
are garbage and masked). The skew needs O(T·H) memory beyond Q Eᵀ instead of the O(T²·H)
of gathering e_(i−j) per pair. Distances >= L reuse e_(L−1).

Two forms, equal in exact arithmetic:

* ``implementation="reference"``: the skewed relative logits as a dense [B, N, T, T] bias of
  the reference attention (the oracle; the skew itself is what the paper's trick is about).
* every other implementation: no T×T tensor at all. Distances >= L − 1 share e_(L−1), so a
  query's relative term over its *far* keys (j <= i − (L − 1)) is one constant
  c_i = q_i · e_(L−1): it leaves their softmax unchanged and only shifts their log-sum-exp.
  The far keys are one causal flash call (``dot_product_attention`` with the chosen
  implementation: the blocked xla path or a Pallas kernel) on ``q[L−1:]`` against
  ``k[:T−L+1]`` whose lse is shifted by c_i; the *near* band (distances 0 .. L − 2, W = L − 1
  keys per query) runs in blocks of C = 128 query rows, each against its window of C + W − 1
  keys with q Eᵀ ``[C, W]`` skewed into the window (the same trick, per block), one block
  at a time and recomputed in the backward, so beyond q/k/v and the outputs it holds
  O(N·C·(C + W)) instead of the O(N·T²) of a dense bias; the two parts are merged by their
  log-sum-exps; the far part is a causal flash call. Packed documents
  (``SegmentMask``) are supported in both parts; other extra masks need the reference.
"""

import typing

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from attn_jax.attention import _checks, registry
from attn_jax.attention import api as api_lib
from attn_jax.attention import heads as heads_lib
from attn_jax.attention import masks as masks_lib

PAPER = "Music Transformer"
IMPLEMENTATIONS = ("reference", "xla", "pallas_tpu", "pallas_gpu", "pallas_interpret")


def skew(qe_BNTT: Float[Array, "B N T T"]) -> Float[Array, "B N T T"]:
  """The skew: pad one zero column on the left, reshape [T, T+1] -> [T+1, T], drop row 0."""
  B, N, T, _ = qe_BNTT.shape
  padded = jnp.pad(qe_BNTT, ((0, 0), (0, 0), (0, 0), (1, 0)))
  return padded.reshape(B, N, T + 1, T)[:, :, 1:]


def relative_logits(
  q_BTNH: Float[Array, "B T N H"], rel_NLH: Float[Array, "N L H"]
) -> Float[Array, "B N T T"]:
  """S_rel[i, j] = q_i · e_(i−j) for j <= i (0 above the diagonal), by the skew."""
  T = q_BTNH.shape[1]
  L = rel_NLH.shape[1]
  dist = jnp.minimum(jnp.arange(T - 1, -1, -1), L - 1)  # column c holds distance T − 1 − c
  e_NTH = jnp.take(rel_NLH, dist, axis=1)
  qe = jnp.einsum("BTNH,NCH->BNTC", q_BTNH, e_NTH.astype(q_BTNH.dtype))
  return jnp.where(jnp.tril(jnp.ones((T, T), bool)), skew(qe), 0)


@typing.no_type_check
def rel_skew_attention(
  q_BTNH: Float[Array, "B T N H"],
  k_BTKH: Float[Array, "B T K H"],
  v_BTKV: Float[Array, "B T K Hv"],
  rel_NLH: Float[Array, "N L H"],
  *,
  mask: masks_lib.Mask | None = None,
  implementation: str | None = None,
):
  """Causal self-attention with Music Transformer relative logits (see the module
  docstring); ``mask`` adds to the causal mask (e.g. packed documents)."""
  dims = _checks.check_qkv(q_BTNH, k_BTKH, v_BTKV)
  if dims.S != dims.T:
    raise ValueError(f"rel_skew is causal self-attention: needs S == T; got T={dims.T}, S={dims.S}")
  if np.ndim(rel_NLH) != 3 or tuple(np.shape(rel_NLH))[0::2] != (dims.N, dims.H):
    raise ValueError(
      f"rel_NLH must have shape [N={dims.N}, L, H={dims.H}]; got {np.shape(rel_NLH)}"
    )
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; got {implementation!r}")
  if implementation == "reference":
    full = masks_lib.CausalMask() if mask is None else masks_lib.CausalMask() & mask
    bias = relative_logits(q_BTNH, rel_NLH) * dims.H**-0.5
    return api_lib.dot_product_attention(
      q_BTNH, k_BTKH, v_BTKV, mask=full, bias=bias, implementation="reference"
    )
  if mask is not None and not isinstance(mask, masks_lib.SegmentMask):
    raise ValueError(
      "the band + far form of rel_skew takes only a SegmentMask as an extra mask (packed "
      f"documents); got {type(mask).__name__}: use implementation='reference'"
    )
  return _band_and_far(q_BTNH, k_BTKH, v_BTKV, rel_NLH, mask, implementation)


NEAR_BLOCK = 128  # query rows per step of the near band


def _near_band(q_BTNH, k_BTKH, v_BTKV, rel_NWH, seg, scale, f32):
  """(out [B, T, N, Hv], lse [B, T, N]) of each query over its keys at distances 0 .. W − 1,
  logits q_i·(k_(i−w) + e_w)·scale. Query blocks of C rows run one at a time (``lax.map``
  over a rematerialised body). A block attends to its window of S = C + W − 1 keys with
  two matmuls (q·kᵀ and p·v over the window); its relative term q·Eᵀ ``[C, W]`` is skewed
  into window coordinates (the paper's trick, per block), so no key is gathered per (query,
  distance) pair. Live memory is O(N·C·S) logits per block; the backward stores no
  per-block residuals."""
  B, T, N, H = q_BTNH.shape
  K, Hv, W = k_BTKH.shape[2], v_BTKV.shape[-1], rel_NWH.shape[1]
  G = N // K
  C = min(NEAR_BLOCK, T)
  S = C + W - 1  # window of a block: key positions a − (W − 1) .. a + C − 1
  nb = -(-T // C)
  Tp = nb * C
  pad_q = ((0, 0), (0, Tp - T), (0, 0), (0, 0))
  pad_kv = ((0, 0), (W - 1, Tp - T), (0, 0), (0, 0))
  q_p, k_p, v_p = jnp.pad(q_BTNH, pad_q), jnp.pad(k_BTKH, pad_kv), jnp.pad(v_BTKV, pad_kv)
  if seg is not None:
    q_ids = jnp.pad(seg[0], ((0, 0), (0, Tp - T)))
    kv_ids = jnp.pad(seg[1], ((0, 0), (W - 1, Tp - T)))
  # Row u, window column s: distance u + W − 1 − s, in the band when 0 <= s − u < W.
  shift_CS = jnp.arange(S)[None, :] - jnp.arange(C)[:, None]
  band_CS = (shift_CS >= 0) & (shift_CS < W)

  def block(bi):
    a = bi * C
    q = jax.lax.dynamic_slice_in_dim(q_p, a, C, axis=1)
    k_win = jax.lax.dynamic_slice_in_dim(k_p, a, S, axis=1)
    v_win = jax.lax.dynamic_slice_in_dim(v_p, a, S, axis=1)
    s = jnp.einsum("BCKGH,BSKH->BKGCS", q.reshape(B, C, K, G, H), k_win, preferred_element_type=f32)
    # Skew: with r reversed along W (column j = W − 1 − distance) and padded to P = W + C
    # columns, the flat index u·P + j equals u·(P − 1) + (u + j), so reading the flat rows
    # with width P − 1 = S puts r[u, distance] at window column s = u + W − 1 − distance.
    r = jnp.einsum("BCNH,NWH->BNCW", q, rel_NWH, preferred_element_type=f32)[..., ::-1]
    r = jnp.pad(r, ((0, 0), (0, 0), (0, 0), (0, C))).reshape(B, N, C * (W + C))
    r = r[:, :, : C * S].reshape(B, K, G, C, S)
    s = (s + r) * scale
    ok = band_CS & (a - (W - 1) + jnp.arange(S) >= 0)[None, :]
    ok = jnp.broadcast_to(ok, (B, C, S))
    if seg is not None:
      qi = jax.lax.dynamic_slice_in_dim(q_ids, a, C, axis=1)
      ki = jax.lax.dynamic_slice_in_dim(kv_ids, a, S, axis=1)
      ok = ok & (qi[:, :, None] == ki[:, None, :])
      if seg[2] is not None:
        ok = ok & (qi[:, :, None] != seg[2])
    s = jnp.where(ok[:, None, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(s - m)
    denom = e.sum(-1)
    p = e / jnp.maximum(denom, 1e-30)[..., None]
    o = jnp.einsum("BKGCS,BSKV->BCKGV", p, v_win.astype(f32))
    lse = jnp.where(denom > 0, jnp.log(jnp.maximum(denom, 1e-30)) + m[..., 0], -jnp.inf)
    return o.reshape(B, C, N, Hv), lse.transpose(0, 3, 1, 2).reshape(B, C, N)

  o, lse = jax.lax.map(jax.checkpoint(block), jnp.arange(nb))  # [nb, B, C, ...]
  o = o.transpose(1, 0, 2, 3, 4).reshape(B, Tp, N, Hv)[:, :T]
  lse = lse.transpose(1, 0, 2, 3).reshape(B, Tp, N)[:, :T]
  return o, lse


def _band_and_far(q_BTNH, k_BTKH, v_BTKV, rel_NLH, mask, implementation):
  """The module docstring's O(T·L) form: near band by windows, far keys by one flash call."""
  T, H = q_BTNH.shape[1], q_BTNH.shape[3]
  L = rel_NLH.shape[1]
  W = min(L - 1, T)  # near distances 0 .. W - 1, each with its own embedding
  scale = H**-0.5
  f32 = jnp.promote_types(q_BTNH.dtype, jnp.float32)
  rel = rel_NLH.astype(q_BTNH.dtype)
  seg = None if mask is None else (mask.q_segment_ids, mask.kv_segment_ids, mask.padding_id)
  parts = []  # (out [B, T, N, Hv], lse [B, T, N]) of each part
  if W > 0:
    parts.append(_near_band(q_BTNH, k_BTKH, v_BTKV, rel[:, :W], seg, scale, f32))
  F = T - (L - 1)  # queries L - 1 .. T - 1 have far keys 0 .. i - (L - 1)
  if F > 0:
    far_mask = masks_lib.CausalMask()
    if seg is not None:
      far_mask = far_mask & masks_lib.SegmentMask(
        seg[0][:, L - 1 :], seg[1][:, :F], padding_id=seg[2]
      )
    o_far, lse_far = api_lib.dot_product_attention(
      q_BTNH[:, L - 1 :],
      k_BTKH[:, :F],
      v_BTKV[:, :F],
      mask=far_mask,
      scale=scale,
      implementation=implementation,
      return_lse=True,
    )
    c = jnp.einsum("BTNH,NH->BTN", q_BTNH[:, L - 1 :], rel[:, L - 1], preferred_element_type=f32)
    lse_far = lse_far.transpose(0, 2, 1).astype(f32) + c * scale  # [B, F, N]
    pad = ((0, 0), (L - 1, 0), (0, 0))
    o_far = jnp.pad(o_far.astype(f32), pad + ((0, 0),))
    lse_far = jnp.pad(lse_far, pad, constant_values=-jnp.inf)
    parts.append((o_far, lse_far))
  if len(parts) == 1:
    return parts[0][0].astype(q_BTNH.dtype)
  # A part with no visible key has lse -inf; a finite floor keeps logaddexp's gradient finite
  # (its output there is 0, so the weight it gets does not matter).
  floor = jnp.finfo(f32).min / 4
  (o1, l1), (o2, l2) = ((o, jnp.maximum(l_, floor)) for o, l_ in parts)
  lse = jnp.logaddexp(l1, l2)
  out = jnp.exp(l1 - lse)[..., None] * o1 + jnp.exp(l2 - lse)[..., None] * o2
  return out.astype(q_BTNH.dtype)


_BASE = ("w_q", "w_k", "w_v", "w_o")


@typing.no_type_check
def rel_skew(
  params,
  x_BTD: Float[Array, "B T D"],
  *,
  context_BSD=None,
  causal: bool,
  implementation: str | None = None,
  mask=None,
  positions_BT: Int[Array, "B T"] | None = None,
  rope=None,
):
  """The layer: the GQA projections of ``attn_jax.attention.heads`` and ``rel [N, L, H]``;
  causal self-attention only (``context_BSD`` None, ``causal`` True, no rope: the relative
  embeddings carry position)."""
  if context_BSD is not None or causal is not True:
    raise ValueError("rel_skew is causal self-attention: context_BSD=None and causal=True")
  if rope is not None:
    raise ValueError("rel_skew takes no rope: the relative embeddings carry position")
  if not isinstance(params, dict) or set(params) != set(_BASE + ("rel",)):
    got = sorted(params) if isinstance(params, dict) else type(params)
    raise ValueError(f"rel_skew params must hold {sorted(_BASE + ('rel',))}; got {got}")
  base = {k: params[k] for k in _BASE}
  dims = heads_lib.static_dims(base, "gqa")
  call = heads_lib._check_call(dims.D, x_BTD, None, True, mask, positions_BT, None)
  q, k, v = heads_lib._static_qkv(base, x_BTD, x_BTD, call)
  o = rel_skew_attention(q, k, v, params["rel"], mask=mask, implementation=implementation)
  return heads_lib.output_projection(base, o)


def param_specs(
  *,
  d_model: int,
  num_heads: int,
  num_kv_heads: int | None = None,
  head_dim: int | None = None,
  v_head_dim: int | None = None,
  rel_max: int | None = None,
) -> dict:
  """The GQA projections (K default N) and ``rel [N, L, H]`` with L = ``rel_max`` (default
  512) distances, N(0, 1/H) at init."""
  specs = heads_lib.param_specs(
    "head_dims",
    d_model=d_model,
    num_heads=num_heads,
    num_kv_heads=num_kv_heads,
    head_dim=head_dim,
    v_head_dim=v_head_dim,
  )
  (_, N, H) = specs["w_q"][0]
  L = heads_lib._opt("rel_max", rel_max, 512)
  specs["rel"] = ((N, L, H), heads_lib._normal_init(H**-0.5), ("heads", None, None))
  return specs


init_rel_skew = heads_lib.make_init("rel_skew", ("v_head_dim", "rel_max"), param_specs)

registry.register(
  registry.Mechanism(
    id="rel_skew",
    family="a",
    paper=PAPER,
    entry_point="attn_jax.attention.rel_skew:rel_skew",
    implementations=IMPLEMENTATIONS,
    patterns=frozenset((registry.SELF_CAUSAL,)),
    decode=False,
    tier=2,
    check="The skewed S_rel equals an explicit gather of q_i·e_(i−j). Extra memory of the "
    "skew is linear in T. The fast form (near band + one flash call over the far keys) "
    "equals the dense reference and holds no T×T tensor.",
    build=registry.build_nothing,
    module="attn_jax.nn.rel_skew:RelSkewAttention",
    interface="layer",
    init="attn_jax.attention.rel_skew:init_rel_skew",
  )
)
