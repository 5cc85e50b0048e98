"""Attention as a prefix scan (catalog family (g), ``aaren``): Attention as an RNN.

Dimension key: B batch, T length, D model dim, N heads, K kv heads (repeated to N), H q/k
head dim, Hv value head dim.

One query q per head, the same for every token, attends over every prefix: with scores
s_j = scale·q·k_j, the output at t is softmax attention over j <= t::

    o_t = Σ_(j<=t) e^(s_j) v_j / Σ_(j<=t) e^(s_j)

computed from triples (m, u, w) (running max, max-shifted weighted value sum, max-shifted
normaliser); token j is (s_j, v_j, 1) and the associative combine is::

    (m_A, u_A, w_A) ⊕ (m_B, u_B, w_B) = (m, u_A e^(m_A−m) + u_B e^(m_B−m),
                                          w_A e^(m_A−m) + w_B e^(m_B−m)),  m = max(m_A, m_B)

so o_t = u_t / w_t of the inclusive prefix combine. ``jax.lax.associative_scan`` runs it in
O(log T) depth for training (``mode="chunk"``); ``mode="recurrent"`` is the sequential
``lax.scan``, one O(1)-memory update per token, for decoding against a carried state
(``initial_state`` / ``return_final_state``: the triple after the last token; an empty state
is (−inf, 0, 0)). ``segment_ids [B, T]`` restart the scan where the id changes (a segmented
scan: a restart token discards everything before it). ``implementation="reference"`` is the
oracle: the explicit masked softmax over the [T, T] prefix map (the carried state enters as
one extra key of logit m + log w and value u/w).

The Aaren layer (``aaren``): the query is a learned parameter per head that does not depend
on the input (Attention as an RNN: "the query token q is learned"); keys and values are
projections of the tokens; the heads' outputs go through an output projection. Stacking
layers gives Aaren. Causal self-attention only.
"""

import typing

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from attn_jax.attention import heads as heads_lib
from attn_jax.attention import masks as masks_lib
from attn_jax.attention import registry

IMPLEMENTATIONS = ("reference", "xla")
MODES = ("chunk", "recurrent")
PAPER = "Attention as an RNN"


class ScanState(typing.NamedTuple):
  """The carried triple: m ``[B, N]``, u ``[B, N, Hv]``, w ``[B, N]`` (float32)."""

  m: Array
  u: Array
  w: Array


def empty_state(batch: int, num_heads: int, v_dim: int, dtype=jnp.float32) -> ScanState:
  return ScanState(
    jnp.full((batch, num_heads), -jnp.inf, dtype),
    jnp.zeros((batch, num_heads, v_dim), dtype),
    jnp.zeros((batch, num_heads), dtype),
  )


def _rescale(m_from, m_to):
  """e^(m_from − m_to), 0 where m_from = −inf (an empty side), never NaN."""
  return jnp.where(
    jnp.isneginf(m_from), 0.0, jnp.exp(m_from - jnp.where(jnp.isneginf(m_to), 0.0, m_to))
  )


def combine(a: ScanState, b: ScanState) -> ScanState:
  """The associative ⊕ of the module docstring (broadcasts over leading axes)."""
  m = jnp.maximum(a.m, b.m)
  ea, eb = _rescale(a.m, m), _rescale(b.m, m)
  return ScanState(m, a.u * ea[..., None] + b.u * eb[..., None], a.w * ea + b.w * eb)


def _prepare(q, k, v, scale, segment_ids, initial_state):
  if getattr(k, "ndim", None) != 4 or getattr(v, "ndim", None) != 4:
    raise ValueError(f"k, v must be [B, T, K, H], [B, T, K, Hv]; got {np.shape(k)}, {np.shape(v)}")
  B, T, K, H = k.shape
  if v.shape[:3] != (B, T, K):
    raise ValueError(f"v must be [B={B}, T={T}, K={K}, Hv]; got {v.shape}")
  q = jnp.asarray(q)
  if q.ndim == 2:
    q = jnp.broadcast_to(q, (B,) + q.shape)
  if q.ndim != 3 or q.shape[0] != B or q.shape[2] != H:
    raise ValueError(f"q must be one query per head, [N, H={H}] or [B={B}, N, H]; got {q.shape}")
  N = q.shape[1]
  if N % K:
    raise ValueError(f"kv heads K={K} must divide the query heads N={N}")
  f32 = jnp.promote_types(k.dtype, jnp.float32)
  kf, vf = k.astype(f32), v.astype(f32)
  if K != N:
    kf, vf = jnp.repeat(kf, N // K, axis=2), jnp.repeat(vf, N // K, axis=2)
  scale = H**-0.5 if scale is None else scale
  s = jnp.einsum("BNH,BTNH->BTN", q.astype(f32), kf) * scale  # [B, T, N]
  if segment_ids is None:
    reset = jnp.zeros((B, T), bool)
  else:
    seg = jnp.asarray(segment_ids)
    if seg.shape != (B, T) or not jnp.issubdtype(seg.dtype, jnp.integer):
      raise ValueError(f"segment_ids must be an int array [B, T] = {(B, T)}; got {seg.shape}")
    reset = jnp.concatenate([jnp.zeros((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  Hv = vf.shape[-1]
  if initial_state is None:
    state = empty_state(B, N, Hv, f32)
  else:
    state = ScanState(*(jnp.asarray(a).astype(f32) for a in initial_state))
    want = ((B, N), (B, N, Hv), (B, N))
    if tuple(a.shape for a in state) != want:
      raise ValueError(
        f"initial_state must be (m, u, w) with shapes {want}; got {[a.shape for a in state]}"
      )
  return s, vf, reset, state


def _select(flag_BT, when_true: ScanState, when_false: ScanState) -> ScanState:
  def pick(x, y):
    return jnp.where(flag_BT.reshape(flag_BT.shape + (1,) * (x.ndim - flag_BT.ndim)), x, y)

  return ScanState(*(pick(x, y) for x, y in zip(when_true, when_false, strict=True)))


def _parallel(s, v, reset, state):
  """Inclusive prefix combine by ``associative_scan`` (a segmented scan over resets)."""

  def op(a, b):  # a restart inside the right-hand span discards the left-hand side
    (ra, xa), (rb, xb) = a, b
    return ra | rb, _select(rb, xb, combine(xa, xb))

  _, prefix = jax.lax.associative_scan(op, (reset, ScanState(s, v, jnp.ones_like(s))), axis=1)
  before_any_reset = jnp.cumsum(reset, axis=1) == 0  # [B, T]: the carried state reaches t
  carried = combine(ScanState(*(a[:, None] for a in state)), prefix)
  out = _select(before_any_reset, carried, prefix)
  return out, ScanState(*(a[:, -1] for a in out))


def _sequential(s, v, reset, state):
  """One O(1)-memory update per token (``lax.scan``): the decoding form."""

  def step(carry, xs):
    s_t, v_t, r_t = xs  # [B, N], [B, N, Hv], [B]
    token = ScanState(s_t, v_t, jnp.ones_like(s_t))
    new = _select(r_t, token, combine(carry, token))
    return new, new

  xs = (jnp.moveaxis(s, 1, 0), jnp.moveaxis(v, 1, 0), jnp.moveaxis(reset, 1, 0))
  final, out = jax.lax.scan(step, state, xs)
  return ScanState(*(jnp.moveaxis(a, 0, 1) for a in out)), final


def _reference(s, v, reset, state):
  """The oracle: softmax over each prefix on the explicit [T, T] map, the carried state as one
  extra key (logit m + log w, value u / w) seen until the first restart."""
  T = s.shape[1]
  seg = jnp.cumsum(reset, axis=1)  # [B, T]
  sees = jnp.tril(jnp.ones((T, T), bool)) & (seg[:, :, None] == seg[:, None, :])  # [B, t, j]
  logits = jnp.where(sees[:, None], jnp.moveaxis(s, 1, 2)[:, :, None, :], -jnp.inf)  # [B,N,t,j]
  empty = state.w <= 0
  m0 = jnp.where(empty, -jnp.inf, state.m + jnp.log(jnp.where(empty, 1.0, state.w)))  # [B, N]
  v0 = state.u / jnp.where(empty, 1.0, state.w)[..., None]  # [B, N, Hv]
  first = jnp.where((seg == 0)[:, None, :, None], m0[:, :, None, None], -jnp.inf)  # [B,N,t,1]
  p = jax.nn.softmax(jnp.concatenate([first, logits], axis=-1), axis=-1)
  out = jnp.einsum("BNt,BNV->BtNV", p[..., 0], v0) + jnp.einsum("BNtj,BjNV->BtNV", p[..., 1:], v)
  return out


@typing.no_type_check
def prefix_attention(
  q,
  k: Float[Array, "B T K H"],
  v: Float[Array, "B T K Hv"],
  *,
  scale: float | None = None,
  initial_state: ScanState | None = None,
  return_final_state: bool = False,
  segment_ids: Int[Array, "B T"] | None = None,
  mode: str = "chunk",
  implementation: str | None = None,
):
  """Softmax attention of one fixed query per head over every prefix (Attention as an RNN);
  see the module docstring.

  Args:
    q: ``[N, H]`` (shared by the batch) or ``[B, N, H]``: one query per head, the same for
      every token.
    k, v: ``[B, T, K, H]``, ``[B, T, K, Hv]`` (N % K == 0).
    scale: multiplies q·k (default H^-1/2).
    initial_state: ``ScanState`` (m ``[B, N]``, u ``[B, N, Hv]``, w ``[B, N]``) before token 0.
    return_final_state: also return the state after the last token.
    segment_ids: ``[B, T]`` ints; the scan restarts where the id changes.
    mode: "chunk" (the parallel associative scan) or "recurrent" (sequential updates).
    implementation: "xla" (default) or "reference" (the masked-softmax oracle; it gives no
      final state).

  Returns:
    ``out [B, T, N, Hv]`` in v's dtype (and the final ``ScanState``, float32).
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; got {implementation!r}")
  if implementation == "reference" and return_final_state:
    raise ValueError("the reference oracle gives no final state; use implementation='xla'")
  s, vf, reset, state = _prepare(q, k, v, scale, segment_ids, initial_state)
  if implementation == "reference":
    return _reference(s, vf, reset, state).astype(v.dtype)
  triples, final = (_sequential if mode == "recurrent" else _parallel)(s, vf, reset, state)
  out = (triples.u / triples.w[..., None]).astype(v.dtype)
  return (out, final) if return_final_state else out


# ---------------------------------------------------------------------------------------
# The Aaren layer.
# ---------------------------------------------------------------------------------------

_NAMES = ("query", "w_k", "w_v", "w_o")


def param_specs(
  *,
  d_model: int,
  num_heads: int,
  num_kv_heads: int | None = None,
  head_dim: int | None = None,
  v_head_dim: int | None = None,
) -> dict:
  """The learned query ``[N, H]`` (unit normal), key/value projections (K = N by default) and
  the output projection."""
  specs = heads_lib.param_specs(
    "head_dims",
    d_model=d_model,
    num_heads=num_heads,
    num_kv_heads=num_kv_heads,
    head_dim=head_dim,
    v_head_dim=v_head_dim,
  )
  _, N, H = specs.pop("w_q")[0]
  return {"query": ((N, H), heads_lib._normal_init(1.0), ("heads", None)), **specs}


init_aaren = heads_lib.make_init("aaren", ("v_head_dim",), param_specs)


@typing.no_type_check
def aaren(
  params,
  x_BTD: Float[Array, "B T D"],
  *,
  context_BSD=None,
  causal: bool = True,
  implementation: str | None = None,
  mask=None,
  positions_BT=None,
  mode: str = "chunk",
):
  """The Aaren layer (Attention as an RNN): a learned query per head attends over every
  prefix of the projected keys and values; see the module docstring.

  Args:
    params: ``init_aaren`` pytree: ``query [N, H]``, ``w_k [D, K, H]``, ``w_v [D, K, Hv]``,
      ``w_o [N, Hv, D]``.
    x_BTD: tokens; causal self-attention only (``context_BSD`` None, ``causal`` True).
    implementation: "xla" (default, the associative scan) or "reference" (the oracle).
    mask: None or a ``SegmentMask`` of packed documents (the scan restarts at each).
    positions_BT: ignored (the layer is order-aware through its prefix structure).
    mode: "chunk" (parallel scan) or "recurrent" (sequential updates).
  """
  del positions_BT
  if not isinstance(params, dict) or set(params) != set(_NAMES):
    got = sorted(params) if isinstance(params, dict) else type(params)
    raise ValueError(f"aaren params must hold {sorted(_NAMES)}; got {got}")
  if context_BSD is not None or causal is not True:
    raise ValueError("aaren is causal self-attention: pass causal=True and no context_BSD")
  segment_ids = None
  if mask is not None:
    if not isinstance(mask, masks_lib.SegmentMask):
      raise NotImplementedError(f"aaren takes only a SegmentMask (packed documents); got {mask!r}")
    segment_ids = mask.q_segment_ids
  D = np.shape(params["w_k"])[0]
  if getattr(x_BTD, "ndim", None) != 3 or x_BTD.shape[-1] != D:
    raise ValueError(f"x_BTD must be [B, T, D={D}]; got {np.shape(x_BTD)}")
  dtype = x_BTD.dtype
  k = jnp.einsum("BTD,DKH->BTKH", x_BTD, params["w_k"].astype(dtype))
  v = jnp.einsum("BTD,DKV->BTKV", x_BTD, params["w_v"].astype(dtype))
  o = prefix_attention(
    params["query"], k, v, segment_ids=segment_ids, mode=mode, implementation=implementation
  )
  return heads_lib.output_projection(params, o.astype(dtype))


registry.register(
  registry.Mechanism(
    id="aaren",
    family="g",
    paper=PAPER,
    entry_point="attn_jax.attention.aaren:aaren",
    implementations=IMPLEMENTATIONS,
    patterns=frozenset((registry.SELF_CAUSAL,)),
    decode=False,
    tier=2,
    check="The scan output at each prefix equals softmax attention of the same query over that "
    "prefix (explicit masked softmax). Sequential updates equal the parallel associative scan; "
    "two halves with the carried (m, u, w) equal one pass.",
    build=registry.build_nothing,
    module="attn_jax.nn.aaren:AarenAttention",
    interface="layer",
    init="attn_jax.attention.aaren:init_aaren",
  )
)
