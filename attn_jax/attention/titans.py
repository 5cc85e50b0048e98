"""Titans (catalog family (h): ``titans_lmm``, ``titans_mac``, ``titans_mag``): "Titans:
Learning to Memorize at Test Time". ``persistent_mem`` lives in ``attn_jax.attention.persistent``.

Dimension key: B batch, T length, D model dim, N heads (memory heads; K kv heads are repeated
to N), H key/query dim, Hv value dim, Hm hidden width of the memory MLP, C chunk size, P
persistent tokens, L segment length (MAC), w window (MAG).

**Neural long-term memory (``titans_lmm``).** Per head the memory is an MLP M with weights
W = (W_1 .. W_L), stored ``[i, o]`` so that (row vectors) M(x) = h_L with h_0 = x,
h_l = silu(h_(l−1) W_l) for l < L and h_L = h_(L−1) W_L: a plain MLP with SiLU, no biases, no
residual. L = 1 is the matrix memory M(x) = Wᵀx with W ∈ R^(H×Hv), the state layout of
``attn_jax.attention.delta`` (S ∈ R^(H×Hv), o = Sᵀq). Per token t::

    ℓ_t(W) = ‖M_W(k_t) − v_t‖²                              (sum over Hv, no 1/2)
    S_t = η_t S_(t−1) − θ_t ∇ℓ_t(W_g(t))                    (momentary + past surprise)
    W_t = (1 − α_t) W_(t−1) + S_t                            (forgetting)
    y_t = M_(W_t)(scale · q_t)                               (read after the update)

η, θ, α ∈ [0, 1] per (token, head) are inputs. W_g(t) is the point where token t's gradient
is taken: the weights at the start of t's chunk of C tokens (mini-batch gradient descent,
the paper's parallel training); C = 1 is token-by-token online GD, W_g(t) = W_(t−1). For L = 1
with η = 0, α = 0, C = 1: W_t = W − 2θ_t k_t (k_tᵀW − v_tᵀ), the delta rule with β_t = 2θ_t.

The chunk size is part of the model (it changes the function for C > 1): both
implementations compute the same function for the same C, and chunks are counted from the
call's token 0, so a call continues from ``initial_state`` only at a chunk boundary.
``"reference"`` is the token-by-token ``lax.scan`` (``jax.grad`` of ℓ_t inside the scan at the
carried chunk-start weights); ``"xla"`` (default) is the chunked form: per chunk, all C
gradients u_s = ∇ℓ_s(W_0) at once (``vmap``), then, with E_ts = Π_(s<r≤t) η_r,
A_tj = Π_(j<r≤t) (1 − α_r) (lower-triangular cumulative products) and F = A·E::

    S_t = (Π_(r≤t) η_r) S_0 − Σ_(s≤t) E_ts θ_s u_s
    W_t = (Π_(r≤t) (1 − α_r)) W_0 + (Σ_j A_tj Π_(r≤j) η_r) S_0 − Σ_(s≤t) F_ts θ_s u_s

(products from the chunk start; η = 0 and α = 1 are exact: no logarithms, no division).
The per-token weights W_t are materialised for the reads, O(C·|W|) live memory per chunk.
``mode="recurrent"`` runs the token scan (decoding) whatever the implementation. The state
(W, S) accumulates in float32 (float64 for float64 inputs); the carried state is
``(weights, momentum)``, two tuples of ``[B, N, i, o]``. ``segment_ids [B, T]``: at a
document start the memory restarts from its initial weights (``memory``) with S = 0, and the
document's tokens take their gradient at those weights until the next chunk boundary (chunk
boundaries stay at multiples of C: a packed document equals the document run alone when it
starts on a boundary, and never sees the tokens before it in any case).

**Memory as context (``titans_mac``).** Segments of L tokens. For segment s the memory
state after segments < s (the initial memory for s = 0) is read at the segment's memory
queries, h_t = M(q^M_t); h_t W_MO is a retrieved token in model space, projected by the
attention's own W_K, W_V. Each token attends over [persistent ‖ retrieved h of its segment ‖
its segment] with the mask: every persistent token; the retrieved tokens at its segment
positions up to and including its own (h_j depends on x_j, so j ≤ t keeps it causal); the
segment's tokens up to itself. Then the memory is updated with the segment (chunked update,
C = L: the segment is one mini-batch). Our choices where the paper goes further: the memory
learns from the segment's tokens (keys/values projected from x), not from the attention
output, and the output is the attention output alone (the paper's final gate
y_t ⊗ M*(y_t) is not built). ``mac_retrieve=False`` hides the retrieved tokens (the
"no retrieval" ablation): segment-local causal attention with persistent tokens.

**Memory as gate (``titans_mag``).** Per head, a sliding-window attention branch with the
persistent tokens prefixed (window w, ``persistent_memory_attention``) and the memory branch
(``titans_lmm`` over the whole sequence, read after the update) are combined by a learned
per-(token, head, channel) gate::

    g = σ(x W_g + b_g),   o = RMSNorm_a(o_attn) ⊙ g + RMSNorm_m(o_mem) ⊙ (1 − g),   y = o W_O

(RMSNorms per head with learned scales; our reading of "normalise, then a sigmoid
combination"). The memory sees the input tokens only (the paper also prefixes the persistent
tokens to the memory's input: not built). g ≡ 1 is sliding-window attention with persistent
tokens (then RMSNorm_a and W_O).

Memory inputs of the layers: q^M, k^M (L2-normalised per head), v^M projected from x;
(η, θ, α) = σ(x W_gates + b_gates) per (token, head). Causal self-attention only; positions
"none" or "learned" (no RoPE). Packed documents come as a ``SegmentMask`` (the stacks' form):
the memory restarts at each document, the attention stays inside it.
"""

import dataclasses
import functools
import typing
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from attn_jax.attention import _checks, registry
from attn_jax.attention import api as api_lib
from attn_jax.attention import heads as heads_lib
from attn_jax.attention import linear as linear_lib
from attn_jax.attention import masks as masks_lib
from attn_jax.attention import persistent as persistent_lib

PAPER = "Titans: Learning to Memorize at Test Time"
MODES = ("chunk", "recurrent")
IMPLEMENTATIONS = ("reference", "xla")


# ---------------------------------------------------------------------------------------
# The memory MLP.
# ---------------------------------------------------------------------------------------


def memory_forward(weights, x):
  """M(x): ``x [..., i]`` through per-head weights ``[..., i, o]`` (same leading dims)."""
  h = x
  for layer, w in enumerate(weights):
    h = jnp.einsum("...i,...io->...o", h, w)
    if layer < len(weights) - 1:
      h = jax.nn.silu(h)
  return h


def _loss(weights, k_BNH, v_BNV):
  """Σ_(b, n) ‖M(k) − v‖²: the heads' weights are separate, so its gradient is per head."""
  err = memory_forward(weights, k_BNH) - v_BNV
  return jnp.sum(err * err)


_grad = jax.grad(_loss)


def _bias_loss(weights, k_BNH, v_BNV, *, bias):
  """Σ ρ(M(k) − v) for an attentional bias ρ (Miras): ("huber", δ) is e² for |e| <= δ and
  2δ|e| − δ² beyond (C¹; δ → ∞ is the ℓ2 loss e²); ("lp", p) is |e|^p."""
  err = memory_forward(weights, k_BNH) - v_BNV
  a = jnp.abs(err)
  if bias[0] == "huber":
    delta = bias[1]
    return jnp.sum(jnp.where(a <= delta, err * err, 2.0 * delta * a - delta * delta))
  return jnp.sum(a ** bias[1])


BIASES = ("l2", "huber", "lp")


@functools.cache
def bias_grad(bias: tuple = ("l2",)):
  """∇ of the per-token loss for ``attentional_bias`` ("l2",), ("huber", δ > 0) or
  ("lp", p >= 1) (ValueError otherwise)."""
  if not isinstance(bias, tuple) or not bias or bias[0] not in BIASES:
    raise ValueError(f"attentional_bias must be ('l2',), ('huber', δ) or ('lp', p); got {bias!r}")
  if bias[0] == "l2":
    if len(bias) != 1:
      raise ValueError(f"attentional_bias ('l2',) takes no parameter; got {bias!r}")
    return _grad
  value = bias[1] if len(bias) == 2 else None
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"attentional_bias {bias[0]!r} needs one number; got {bias!r}")
  if (bias[0] == "huber" and not value > 0) or (bias[0] == "lp" and not value >= 1):
    raise ValueError(f"attentional_bias needs δ > 0 (huber) or p >= 1 (lp); got {bias!r}")
  return jax.grad(functools.partial(_bias_loss, bias=(bias[0], float(value))))


def init_memory(key, num_heads: int, key_dim: int, value_dim: int, *, num_layers=2, hidden=None):
  """Initial memory weights: a tuple of ``[N, i, o]`` (H → Hm → ... → Hv; Hm default 2·H),
  truncated normal with std 1/sqrt(i)."""
  num_layers = _checks.positive_int("num_layers", num_layers)
  hidden = 2 * key_dim if hidden is None else _checks.positive_int("hidden", hidden)
  sizes = [key_dim] + [hidden] * (num_layers - 1) + [value_dim]
  keys = jax.random.split(key, num_layers)
  return tuple(
    heads_lib._fan_in(i)(kl, (num_heads, i, o), jnp.float32)
    for kl, i, o in zip(keys, sizes[:-1], sizes[1:], strict=True)
  )


# ---------------------------------------------------------------------------------------
# titans_lmm: validation, the token scan, the chunked form.
# ---------------------------------------------------------------------------------------


class _Prepared(NamedTuple):
  q: Array  # [B, T, N, H] float32 or wider (scaled)
  k: Array  # [B, T, N, H]
  v: Array  # [B, T, N, Hv]
  eta: Array  # [B, T, N]
  theta: Array
  alpha: Array
  reset: Array  # [B, T] bool: a document starts here
  init: tuple  # initial memory weights, [B, N, i, o] each
  state: tuple  # (weights, momentum): tuples of [B, N, i, o]


def _check_memory(memory, N: int, H: int, Hv: int) -> tuple:
  if memory is None:
    return (jnp.zeros((N, H, Hv), jnp.float32),)
  if not isinstance(memory, (tuple, list)) or not memory:
    raise ValueError(
      f"memory must be None or a non-empty tuple of [N, i, o] arrays; got {type(memory)}"
    )
  shapes = [tuple(np.shape(w)) for w in memory]
  ok = all(len(s) == 3 and s[0] == N for s in shapes)
  ok = ok and shapes[0][1] == H and shapes[-1][2] == Hv
  ok = ok and all(a[2] == b[1] for a, b in zip(shapes[:-1], shapes[1:], strict=True))
  if not ok or not all(jnp.issubdtype(jnp.result_type(w), jnp.floating) for w in memory):
    raise ValueError(
      f"memory weights must be float arrays [N={N}, i, o] chaining H={H} -> ... -> Hv={Hv}; "
      f"got shapes {shapes}"
    )
  return tuple(jnp.asarray(w) for w in memory)


def _check_state(initial_state, init_b):
  want = [tuple(w.shape) for w in init_b]
  try:
    weights, momentum = initial_state
    got = [[tuple(np.shape(a)) for a in part] for part in (weights, momentum)]
  except (TypeError, ValueError):
    got = None
  if got is None or got[0] != want or got[1] != want:
    raise ValueError(
      f"initial_state must be (weights, momentum), each a tuple of arrays with shapes {want} "
      f"([B, N, i, o] per memory layer); got {got if got is not None else type(initial_state)}"
    )
  cast = lambda part: tuple(jnp.asarray(a, init_b[0].dtype) for a in part)  # noqa: E731
  return cast(weights), cast(momentum)


def _prepare(q, k, v, eta, theta, alpha, memory, scale, initial_state, segment_ids):
  scale = 1.0 if scale is None else scale
  if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale == 0:
    raise ValueError(f"scale must be a non-zero float or None; got {scale!r}")
  p = linear_lib._prepare(q, k, v, None, scale, "identity", False, None, segment_ids)
  B, T, N, H = p.q.shape
  Hv = p.v.shape[-1]
  gates = []
  for name, g in (("eta", eta), ("theta", theta), ("alpha", alpha)):
    if not hasattr(g, "shape") or tuple(g.shape) != (B, T, N):
      raise ValueError(f"{name} must be a float array [B, T, N] = {(B, T, N)}; got {np.shape(g)}")
    if not jnp.issubdtype(g.dtype, jnp.floating):
      raise ValueError(f"{name} must have a floating dtype; got {g.dtype}")
    gates.append(g.astype(p.q.dtype))
  init = tuple(w.astype(p.q.dtype) for w in _check_memory(memory, N, H, Hv))
  init_b = tuple(jnp.broadcast_to(w[None], (B,) + w.shape) for w in init)
  if initial_state is None:
    state = (init_b, tuple(jnp.zeros_like(w) for w in init_b))
  else:
    state = _check_state(initial_state, init_b)
  return _Prepared(p.q, p.k, p.v, *gates, p.reset, init_b, state)


def _scan(p: _Prepared, C: int, read: str, grad=_grad):
  """The token-by-token oracle: (reads [B, T, N, Hv], final (weights, momentum))."""
  T = p.q.shape[1]
  starts = jnp.arange(T) % C == 0

  def step(carry, xs):
    W, S, Wg = carry
    q_t, k_t, v_t, e_t, th_t, a_t, r_t, start = xs  # [B, N, ·], gates [B, N], r_t [B]
    r = r_t[:, None, None, None]
    W = tuple(jnp.where(r, w0, w) for w0, w in zip(p.init, W, strict=True))
    S = tuple(jnp.where(r, 0.0, s) for s in S)
    Wg = tuple(jnp.where(r | start, w, g) for w, g in zip(W, Wg, strict=True))
    u = grad(Wg, k_t, v_t)
    e, th, a = (x[..., None, None] for x in (e_t, th_t, a_t))
    S = tuple(e * s - th * g for s, g in zip(S, u, strict=True))
    W = tuple((1.0 - a) * w + s for w, s in zip(W, S, strict=True))
    return (W, S, Wg), memory_forward(W if read == "after" else Wg, q_t)

  xs = tuple(jnp.moveaxis(a, 1, 0) for a in (p.q, p.k, p.v, p.eta, p.theta, p.alpha, p.reset))
  (W, S, _), out = jax.lax.scan(step, (*p.state, p.state[0]), xs + (starts,))
  return jnp.moveaxis(out, 0, 1), (W, S)


def _chunk(state, xs, *, init, read: str, has_reset: bool, grad=_grad):
  """One chunk of the parallel form (module docstring); any chunk length."""
  W0, S0 = state
  q, k, v, eta, theta, alpha, r = xs  # [B, C, N, ·], gates [B, C, N], r [B, C]
  C = q.shape[1]
  c = jnp.cumsum(r.astype(jnp.int32), axis=1)  # document starts so far in the chunk
  first = (c == 0).astype(q.dtype)  # [B, C]: still in the chunk's first run
  tri = jnp.tril(jnp.ones((C, C), bool))
  incl = ((c[:, :, None] == c[:, None, :]) & tri)[:, None]  # [B, 1, t, s]: same run, s <= t
  if has_reset:  # gradient point per token: W_0, or the initial memory after a reset
    f = first[:, :, None, None, None] > 0
    Wg = tuple(jnp.where(f, w0[:, None], wi[:, None]) for w0, wi in zip(W0, init, strict=True))
    u = jax.vmap(grad, in_axes=(1, 1, 1), out_axes=1)(Wg, k, v)  # [B, C, N, i, o] each
  else:
    Wg = None
    u = jax.vmap(grad, in_axes=(None, 1, 1), out_axes=1)(W0, k, v)

  strict = jnp.tril(jnp.ones((C, C), bool), -1)
  e_BNC, th_BNC, a_BNC = (g.transpose(0, 2, 1) for g in (eta, theta, 1.0 - alpha))

  def pairs(g):  # Π_(s<r≤t) g_r on same-run pairs s <= t, else 0: [B, N, t, s]
    return jnp.cumprod(jnp.where(strict, g[..., :, None], 1.0), axis=-2) * incl

  def run_prod(g):  # Π_(r≤t, r in t's run) g_r: [B, N, t]
    return jnp.prod(jnp.where(incl, g[..., None, :], 1.0), axis=-1)

  E, A = pairs(e_BNC), pairs(a_BNC)
  ebar, abar = run_prod(e_BNC), run_prod(a_BNC)
  first_N = first[:, None, :]  # [B, 1, C]
  F_theta = jnp.einsum("BNtj,BNjs->BNts", A, E) * th_BNC[:, :, None, :]
  E_theta = E * th_BNC[:, :, None, :]
  s0_in_S = ebar * first_N
  s0_in_W = jnp.einsum("BNtj,BNj->BNt", A, s0_in_S)
  w0_in_W, init_in_W = abar * first_N, abar * (1.0 - first_N)

  def combine(c_w0, c_init, c_s0, pair):  # coefficients [B, N, t], pair [B, N, t, s]
    col = lambda x: x.transpose(0, 2, 1)[..., None, None]  # noqa: E731  [B, t, 1, 1, 1]
    return tuple(
      col(c_w0) * w0[:, None]
      + col(c_init) * wi[:, None]
      + col(c_s0) * s0[:, None]
      - jnp.einsum("BNts,BsNio->BtNio", pair, g)
      for w0, wi, s0, g in zip(W0, init, S0, u, strict=True)
    )  # [B, t, N, i, o] each

  last = slice(C - 1, C)
  zero = jnp.zeros_like(s0_in_S[..., last])
  S_end = combine(zero, zero, s0_in_S[..., last], E_theta[:, :, last])
  if read == "after":
    W_all = combine(w0_in_W, init_in_W, s0_in_W, F_theta)
    y = jax.vmap(memory_forward, in_axes=(1, 1), out_axes=1)(W_all, q)
    W_end = tuple(w[:, -1] for w in W_all)
  else:
    W_end = tuple(
      w[:, 0]
      for w in combine(
        w0_in_W[..., last], init_in_W[..., last], s0_in_W[..., last], F_theta[:, :, last]
      )
    )
    if has_reset:
      y = jax.vmap(memory_forward, in_axes=(1, 1), out_axes=1)(Wg, q)
    else:
      y = jax.vmap(memory_forward, in_axes=(None, 1), out_axes=1)(W0, q)
  return (W_end, tuple(s[:, 0] for s in S_end)), y


def _chunked(p: _Prepared, C: int, read: str, has_reset: bool, grad=_grad):
  B, T = p.q.shape[:2]
  nC = T // C
  xs = (p.q, p.k, p.v, p.eta, p.theta, p.alpha, p.reset)
  step = functools.partial(_chunk, init=p.init, read=read, has_reset=has_reset, grad=grad)
  state, outs = p.state, []
  if nC:
    blocks = tuple(jnp.moveaxis(a[:, : nC * C].reshape((B, nC, C) + a.shape[2:]), 1, 0) for a in xs)
    state, y = jax.lax.scan(step, state, blocks)
    outs.append(jnp.moveaxis(y, 0, 1).reshape((B, nC * C) + y.shape[3:]))
  if T % C:  # the last, shorter chunk (no padding: padded steps would move the state)
    state, y = step(state, tuple(a[:, nC * C :] for a in xs))
    outs.append(y)
  return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0], state


def _check_call_options(chunk_size, mode, implementation):
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    if implementation in api_lib.IMPLEMENTATIONS:
      raise NotImplementedError(
        f"titans_lmm implementation {implementation!r} is not built (no Pallas kernel for the "
        "memory update); use 'xla' (chunked) or 'reference' (token scan)"
      )
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; got {implementation!r}")
  _checks.positive_int("chunk_size", chunk_size)


def _l2(x):
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), -1, keepdims=True) + 1e-6)


def _run(p: _Prepared, C, read, mode, implementation, has_reset, grad=_grad):
  if mode == "recurrent" or implementation == "reference":
    return _scan(p, C, read, grad)
  return _chunked(p, C, read, has_reset, grad)


@typing.no_type_check
def titans_lmm(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B T K H"],
  v: Float[Array, "B T K Hv"],
  eta: Float[Array, "B T N"],
  theta: Float[Array, "B T N"],
  alpha: Float[Array, "B T N"],
  *,
  memory=None,
  scale: float | None = None,
  l2_normalize: bool = False,
  initial_state=None,
  return_final_state: bool = False,
  segment_ids: Int[Array, "B T"] | None = None,
  chunk_size: int = 64,
  mode: str = "chunk",
  implementation: str | None = None,
  attentional_bias: tuple = ("l2",),
):
  """Titans neural long-term memory (Titans: Learning to Memorize at Test Time); see the
  module docstring.

  Args:
    q, k, v: ``[B, T, N, H]``, ``[B, T, K, H]``, ``[B, T, K, Hv]`` (N % K == 0).
    eta, theta, alpha: ``[B, T, N]`` in [0, 1]: momentum decay η, step size θ, forgetting α.
    memory: the initial memory weights, a tuple of ``[N, i, o]`` (H → ... → Hv; one entry:
      the matrix memory); None is the zero matrix memory ``[N, H, Hv]``.
    scale: multiplies q before the read (default 1: queries live where keys do).
    l2_normalize: divide q and k by their L2 norms per head first (what the layers do).
    initial_state: ``(weights, momentum)``, tuples of ``[B, N, i, o]``: the state before
      token 0 (default: ``memory`` and zero momentum).
    return_final_state: also return the state after the last token (float32 or wider).
    segment_ids: ``[B, T]`` ints; the memory restarts where the id changes.
    chunk_size: C, the tokens per mini-batch gradient step (C = 1: online GD).
    mode: "chunk" or "recurrent" (the token scan, for decoding).
    implementation: "reference" (token scan) or "xla" (chunked; default).
    attentional_bias: the per-token loss (Miras): ("l2",) ‖M(k) − v‖² (Titans), ("huber", δ)
      (Yaad) or ("lp", p) (Moneta's ℓp); see ``bias_grad``.

  Returns:
    ``y [B, T, N, Hv]`` in q's dtype (and the final state).
  """
  _check_call_options(chunk_size, mode, implementation)
  grad = bias_grad(tuple(attentional_bias))
  if l2_normalize:
    q, k = _l2(q), _l2(k)
  p = _prepare(q, k, v, eta, theta, alpha, memory, scale, initial_state, segment_ids)
  out, state = _run(p, chunk_size, "after", mode, implementation, segment_ids is not None, grad)
  out = out.astype(q.dtype)
  return (out, state) if return_final_state else out


def miras_yaad(q, k, v, eta, theta, alpha, *, huber_delta: float = 1.0, **kwargs):
  """Yaad (It's All Connected: ... Miras): ``titans_lmm`` with the Huber attentional bias
  (quadratic up to ``huber_delta``, linear beyond: robust to outlier values) and ℓ2
  retention (the forgetting α; momentum η as Titans). δ → ∞ is the ℓ2 update."""
  return titans_lmm(q, k, v, eta, theta, alpha, attentional_bias=("huber", huber_delta), **kwargs)


def miras_moneta(q, k, v, eta, theta, alpha, *, lp_p: float = 3.0, lq_q: float = 2.0, **kwargs):
  """Moneta (Miras): ``titans_lmm`` with the ℓp attentional bias ‖M(k) − v‖_p^p on the
  (default 2-layer MLP) memory. Retention: only ℓ2 (q = 2, the forgetting α) is built; the
  paper's ℓq retention for q ≠ 2 raises NotImplementedError. p = 2 with η = 0 is
  ``titans_lmm`` without momentum."""
  if lq_q != 2:
    raise NotImplementedError(f"Moneta's ℓq retention is built for q = 2 only; got q={lq_q!r}")
  return titans_lmm(q, k, v, eta, theta, alpha, attentional_bias=("lp", lp_p), **kwargs)


# ---------------------------------------------------------------------------------------
# The layers: titans_lmm (memory only), titans_mac, titans_mag.
# ---------------------------------------------------------------------------------------

_ATTN = ("w_q", "w_k", "w_v", "w_o")
_MEMORY_IN = ("w_mq", "w_mk", "w_mv", "w_gates", "b_gates")
_EXTRA = {
  "titans_lmm": ("norm_mem",),
  "titans_mac": ("p_k", "p_v", "w_mo"),
  "titans_mag": ("p_k", "p_v", "w_g", "b_g", "norm_attn", "norm_mem"),
  "titans_mal": ("p_k", "p_v", "w_mo", "norm_mem"),
}


def _memory_layers(params) -> int:
  count = 0
  while f"memory_{count}" in params:
    count += 1
  return count


def _check_params(kind: str, params) -> int:
  if not isinstance(params, dict):
    raise ValueError(f"{kind} params must be a dict of arrays; got {type(params)}")
  L = _memory_layers(params)
  need = set(_MEMORY_IN + _EXTRA[kind]) | {f"memory_{i}" for i in range(L)}
  need |= {"w_o"} | (set(_ATTN) if kind != "titans_lmm" else set())
  if L < 1 or set(params) != need:
    raise ValueError(
      f"{kind} params must hold {sorted(need - {f'memory_{i}' for i in range(L)})} and "
      f"memory_0 .. memory_(L-1) (L >= 1); got {sorted(params)}"
    )
  return L


def _packing(kind: str, mask, B: int, T: int):
  """Segment ids from the stacks' ``SegmentMask`` (None: no packing)."""
  if mask is None:
    return None
  if not isinstance(mask, masks_lib.SegmentMask):
    raise NotImplementedError(
      f"{kind} takes no mask other than a self-attention SegmentMask (packed documents: the "
      f"memory restarts at each); got {mask!r}"
    )
  mask.check_shapes(B, T, T)  # the key ids are taken to be the query ids (self-attention)
  return mask.q_segment_ids


def _check_layer_call(kind, params, x_BTD, context_BSD, causal, rope, D):
  if context_BSD is not None or causal is not True:
    raise ValueError(f"{kind} is causal self-attention: pass causal=True and no context_BSD")
  if rope is not None:
    raise ValueError(f"{kind} takes no RoPE (positions 'none' or 'learned'); got rope={rope!r}")
  heads_lib._check_tokens("x_BTD", x_BTD, D, "[B, T, D]")


def _memory_inputs(params, x_BTD, L: int):
  """q^M, k^M, v^M ``[B, T, N, ·]``, (η, θ, α) ``[B, T, N]`` each, the initial memory."""
  dtype = x_BTD.dtype
  qm, km, vm = (
    jnp.einsum("BTD,DNH->BTNH", x_BTD, params[n].astype(dtype)) for n in ("w_mq", "w_mk", "w_mv")
  )
  logits = jnp.einsum(
    "BTD,DNG->BTNG", x_BTD.astype(jnp.promote_types(x_BTD.dtype, jnp.float32)), params["w_gates"]
  )
  gates = jax.nn.sigmoid(logits + params["b_gates"])
  memory = tuple(params[f"memory_{i}"] for i in range(L))
  return qm, km, vm, gates[..., 0], gates[..., 1], gates[..., 2], memory


def _rms(o_BTNV, scale_NV):
  of = o_BTNV.astype(jnp.promote_types(o_BTNV.dtype, jnp.float32))
  return of * jax.lax.rsqrt(jnp.mean(of * of, axis=-1, keepdims=True) + 1e-6) * scale_NV


def _memory_impl(implementation):
  return "reference" if implementation == "reference" else "xla"


@typing.no_type_check
def titans_memory_layer(
  params,
  x_BTD: Float[Array, "B T D"],
  *,
  context_BSD=None,
  causal: bool = True,
  implementation: str | None = None,
  mask=None,
  positions_BT=None,
  rope=None,
  titans_chunk: int = 64,
):
  """The memory alone as a token mixer (the NNX module of ``titans_lmm``):
  ``y = RMSNorm(titans_lmm(q^M, k^M, v^M, η, θ, α)) W_O`` (see the module docstring)."""
  L = _check_params("titans_lmm", params)
  D = params["w_mq"].shape[0]
  _check_layer_call("titans_lmm", params, x_BTD, context_BSD, causal, rope, D)
  _checks.positive_int("titans_chunk", titans_chunk)
  ids = _packing("titans_lmm", mask, *x_BTD.shape[:2])
  qm, km, vm, eta, theta, alpha, memory = _memory_inputs(params, x_BTD, L)
  o = titans_lmm(
    qm, km, vm, eta, theta, alpha, memory=memory, l2_normalize=True, segment_ids=ids,
    chunk_size=titans_chunk, implementation=_memory_impl(implementation),
  )  # fmt: skip
  o = _rms(o, params["norm_mem"]).astype(x_BTD.dtype)
  return heads_lib.output_projection(params, o)


def _attention_qkv(params, x_BTD):
  dtype = x_BTD.dtype
  return tuple(
    jnp.einsum("BTD,DNH->BTNH", x_BTD, params[n].astype(dtype)) for n in ("w_q", "w_k", "w_v")
  )


@typing.no_type_check
def titans_mag(
  params,
  x_BTD: Float[Array, "B T D"],
  *,
  context_BSD=None,
  causal: bool = True,
  implementation: str | None = None,
  mask=None,
  positions_BT=None,
  rope=None,
  titans_window: int = 64,
  titans_chunk: int = 64,
  return_aux: bool = False,
):
  """Titans memory as a gate (Titans: Learning to Memorize at Test Time); see the module
  docstring.

  Args:
    params: ``init_titans_mag`` pytree: attention ``w_q, w_k, w_v, w_o``, persistent
      ``p_k [P, K, H]``, ``p_v [P, K, Hv]``, memory inputs ``w_mq, w_mk [D, N, H]``,
      ``w_mv [D, N, Hv]``, ``w_gates [D, N, 3]``, ``b_gates [N, 3]`` (η, θ, α), initial memory
      ``memory_0 .. memory_(L-1)`` (``[N, i, o]``), gate ``w_g [D, N, Hv]``, ``b_g [N, Hv]``,
      norms ``norm_attn``, ``norm_mem [N, Hv]``.
    x_BTD: tokens; causal self-attention only.
    implementation: "reference" (oracle attention and the memory's token scan) or "xla".
    mask: None, or the stacks' ``SegmentMask`` for packed documents.
    titans_window: w of the attention branch (>= 1). titans_chunk: the memory's C.
    return_aux: also return ``{"gate", "attention", "memory"}`` (g and the branch outputs).
  """
  L = _check_params("titans_mag", params)
  dims = heads_lib.static_dims({n: params[n] for n in _ATTN}, "gqa")
  _check_layer_call("titans_mag", params, x_BTD, context_BSD, causal, rope, dims.D)
  _checks.positive_int("titans_window", titans_window)
  _checks.positive_int("titans_chunk", titans_chunk)
  B, T, _ = x_BTD.shape
  ids = _packing("titans_mag", mask, B, T)
  q, k, v = _attention_qkv(params, x_BTD)
  attn_mask = masks_lib.sliding_window(titans_window)
  if ids is not None:
    attn_mask = attn_mask & masks_lib.SegmentMask(ids, ids)
  o_attn = persistent_lib.persistent_memory_attention(
    q, k, v, params["p_k"], params["p_v"], mask=attn_mask, implementation=implementation
  )
  qm, km, vm, eta, theta, alpha, memory = _memory_inputs(params, x_BTD, L)
  o_mem = titans_lmm(
    qm, km, vm, eta, theta, alpha, memory=memory, l2_normalize=True, segment_ids=ids,
    chunk_size=titans_chunk, implementation=_memory_impl(implementation),
  )  # fmt: skip
  logits = (
    jnp.einsum(
      "BTD,DNV->BTNV", x_BTD.astype(jnp.promote_types(x_BTD.dtype, jnp.float32)), params["w_g"]
    )
    + params["b_g"]
  )
  g = jax.nn.sigmoid(logits)
  o = _rms(o_attn, params["norm_attn"]) * g + _rms(o_mem, params["norm_mem"]) * (1.0 - g)
  y = heads_lib.output_projection(params, o.astype(x_BTD.dtype))
  return heads_lib._finish(y, {"gate": g, "attention": o_attn, "memory": o_mem}, return_aux)


@dataclasses.dataclass(frozen=True)
class RetrievedContextMask(masks_lib._StaticMask):
  """MAC's mask over one segment's 2L keys [retrieved h_0..h_(L−1) ‖ tokens x_0..x_(L−1)]
  for its L queries (top-left aligned; the offset is ignored): query i sees h_m and x_m for
  m <= i (``retrieve=False``: x_m only)."""

  segment: int
  retrieve: bool = True

  def __post_init__(self):
    masks_lib._check_int("RetrievedContextMask segment", self.segment, minimum=1)

  def _visible(self, q_idx, kv_idx, q_offset, b):
    L = self.segment
    ok = jnp.where(kv_idx < L, kv_idx, kv_idx - L) <= q_idx
    return ok if self.retrieve else ok & (kv_idx >= L)

  def _any_all(self, q_lo, q_hi, kv_lo, kv_hi, q_offset, xp):
    L = self.segment
    # m over a kv block: lo..hi before L, lo−L..hi−L after, 0..L−1 across the boundary.
    straddle = (kv_lo < L) & (kv_hi >= L)
    m_min = xp.where(straddle, 0, xp.where(kv_hi < L, kv_lo, kv_lo - L))
    m_max = xp.where(straddle, L - 1, xp.where(kv_hi < L, kv_hi, kv_hi - L))
    any_, all_ = m_min <= q_hi, m_max <= q_lo
    if not self.retrieve:
      any_, all_ = any_ & (kv_hi >= L), all_ & (kv_lo >= L)
    return any_, all_


@typing.no_type_check
def titans_mac(
  params,
  x_BTD: Float[Array, "B T D"],
  *,
  context_BSD=None,
  causal: bool = True,
  implementation: str | None = None,
  mask=None,
  positions_BT=None,
  rope=None,
  titans_segment: int = 64,
  mac_retrieve: bool = True,
  return_aux: bool = False,
):
  """Titans memory as context (Titans: Learning to Memorize at Test Time); see the module
  docstring.

  Args:
    params: ``init_titans_mac`` pytree: attention ``w_q, w_k, w_v, w_o``, persistent
      ``p_k [P, K, H]``, ``p_v [P, K, Hv]``, memory inputs ``w_mq, w_mk [D, N, H]``,
      ``w_mv [D, N, Hv]``, ``w_gates [D, N, 3]``, ``b_gates [N, 3]``, initial memory
      ``memory_0 .. memory_(L-1)``, retrieved-token projection ``w_mo [N, Hv, D]``.
    x_BTD: tokens; causal self-attention only.
    implementation: "reference" or "xla" (attention and memory alike).
    mask: None, or the stacks' ``SegmentMask`` for packed documents.
    titans_segment: L, the segment length (also the memory's chunk).
    mac_retrieve: False hides the retrieved tokens (the no-retrieval ablation).
    return_aux: also return ``{"retrieved": h [B, T, N, Hv]}``.
  """
  Lm = _check_params("titans_mac", params)
  dims = heads_lib.static_dims({n: params[n] for n in _ATTN}, "gqa")
  _check_layer_call("titans_mac", params, x_BTD, context_BSD, causal, rope, dims.D)
  L = _checks.positive_int("titans_segment", titans_segment)
  if not isinstance(mac_retrieve, bool):
    raise ValueError(f"mac_retrieve must be a bool; got {mac_retrieve!r}")
  impl = _memory_impl(implementation)
  B, T, D = x_BTD.shape
  ids = _packing("titans_mac", mask, B, T)
  nS = -(-T // L)
  pad = nS * L - T  # padded tokens come last: no real query sees them (causal)
  x = jnp.pad(x_BTD, ((0, 0), (0, pad), (0, 0)))
  ids_p = None if ids is None else jnp.pad(ids, ((0, 0), (0, pad)))

  # Retrieval: each segment reads the memory left by the segments before it.
  qm, km, vm, eta, theta, alpha, memory = _memory_inputs(params, x, Lm)
  qm, km = _l2(qm), _l2(km)
  p = _prepare(qm, km, vm, eta, theta, alpha, memory, None, None, ids_p)
  h, _ = _run(p, L, "before", "chunk", impl, ids is not None)  # [B, Tp, N, Hv]
  h_D = jnp.einsum("BTNV,NVD->BTD", h.astype(x.dtype), params["w_mo"].astype(x.dtype))

  q, k, v = _attention_qkv(params, x)
  kh, vh = _attention_qkv(params, h_D)[1:]

  def segments(a):  # [B, Tp, ...] -> [B·nS, L, ...]
    return a.reshape((B * nS, L) + a.shape[2:])

  k_ctx = jnp.concatenate([segments(kh), segments(k)], axis=1)  # [B·nS, 2L, K, H]
  v_ctx = jnp.concatenate([segments(vh), segments(v)], axis=1)
  attn_mask = RetrievedContextMask(L, mac_retrieve)
  if ids_p is not None:
    seg = segments(ids_p)
    attn_mask = attn_mask & masks_lib.SegmentMask(seg, jnp.concatenate([seg, seg], axis=1))
  o = persistent_lib.persistent_memory_attention(
    segments(q), k_ctx, v_ctx, params["p_k"], params["p_v"], mask=attn_mask,
    implementation=implementation,
  )  # fmt: skip
  o = o.reshape((B, nS * L) + o.shape[2:])[:, :T]
  y = heads_lib.output_projection(params, o)
  return heads_lib._finish(y, {"retrieved": h[:, :T]}, return_aux)


# ---------------------------------------------------------------------------------------
# Parameters.
# ---------------------------------------------------------------------------------------

# Gate biases at init: η ≈ 0.73, θ ≈ 0.018, α ≈ 0.047. A chunk of C tokens takes its C
# gradients at one point, so with unit-norm keys in H dims one chunk's step on a matrix
# memory is about 2·θ/(1 − η)·C/H along each direction (the loss has no 1/2; momentum
# multiplies by 1/(1 − η)); above 2 the memory diverges. These give 0.53 at C = 64, H = 16.
# (The former (2, -2, -4), η ≈ 0.88, θ ≈ 0.12, gave about 8: the memory reached inf within
# the first 64 tokens of a random sequence and every layer with it returned NaN.)
GATE_BIAS = (1.0, -4.0, -3.0)


def _specs(
  kind: str,
  *,
  d_model: int,
  num_heads: int,
  num_kv_heads: int | None = None,
  head_dim: int | None = None,
  v_head_dim: int | None = None,
  titans_persistent: int = 4,
  titans_memory_layers: int = 2,
  titans_memory_hidden: int = -1,
) -> dict:
  specs = heads_lib.param_specs(
    "gqa",
    d_model=d_model,
    num_heads=num_heads,
    num_kv_heads=num_kv_heads,
    head_dim=head_dim,
    v_head_dim=v_head_dim,
  )
  (D, N, H), (_, K, Hv) = specs["w_q"][0], specs["w_v"][0]
  Lm = _checks.positive_int("titans_memory_layers", titans_memory_layers)
  Hm = heads_lib._opt("titans_memory_hidden", titans_memory_hidden, 2 * H)
  fan = heads_lib._fan_in
  const = jax.nn.initializers.constant
  if kind == "titans_lmm":
    specs = {"w_o": specs["w_o"]}
  else:
    P = _checks.positive_int("titans_persistent", titans_persistent)
    unit = heads_lib._normal_init(1.0)
    specs["p_k"] = ((P, K, H), unit, (None, "kv_heads", None))
    specs["p_v"] = ((P, K, Hv), unit, (None, "kv_heads", None))
  specs["w_mq"] = ((D, N, H), fan(D), ("embed", "heads", None))
  specs["w_mk"] = ((D, N, H), fan(D), ("embed", "heads", None))
  specs["w_mv"] = ((D, N, Hv), fan(D), ("embed", "heads", None))
  specs["w_gates"] = ((D, N, 3), const(0.0), ("embed", "heads", None))
  specs["b_gates"] = ((N, 3), lambda key, shape, dtype: jnp.broadcast_to(
    jnp.asarray(GATE_BIAS, dtype), shape
  ), ("heads", None))  # fmt: skip
  sizes = [H] + [Hm] * (Lm - 1) + [Hv]
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
    specs[f"memory_{i}"] = ((N, a, b), fan(a), ("heads", None, None))
  if kind in ("titans_mac", "titans_mal"):
    specs["w_mo"] = ((N, Hv, D), fan(N * Hv), ("heads", None, "embed"))
  if kind == "titans_mag":
    specs["w_g"] = ((D, N, Hv), fan(D), ("embed", "heads", None))
    specs["b_g"] = ((N, Hv), const(0.0), ("heads", None))
    specs["norm_attn"] = ((N, Hv), jax.nn.initializers.ones, ("heads", None))
  if kind in ("titans_mag", "titans_lmm", "titans_mal"):
    specs["norm_mem"] = ((N, Hv), jax.nn.initializers.ones, ("heads", None))
  return specs


def lmm_param_specs(*, titans_persistent=None, **kw) -> dict:
  """Memory-only layer: memory inputs, initial memory (``titans_memory_layers`` deep,
  hidden ``titans_memory_hidden``, default 2·H), RMSNorm scale, ``w_o``."""
  del titans_persistent
  return _specs("titans_lmm", **kw)


mac_param_specs = functools.partial(_specs, "titans_mac")
mag_param_specs = functools.partial(_specs, "titans_mag")
mal_param_specs = functools.partial(_specs, "titans_mal")
_SPEC_OPTIONS = ("v_head_dim", "titans_persistent", "titans_memory_layers", "titans_memory_hidden")
init_titans_lmm_layer = heads_lib.make_init(
  "titans_lmm", _SPEC_OPTIONS + ("titans_chunk",), lmm_param_specs, call_options=("titans_chunk",)
)
init_titans_mac = heads_lib.make_init(
  "titans_mac",
  _SPEC_OPTIONS + ("titans_segment",),
  mac_param_specs,
  call_options=("titans_segment",),
)
init_titans_mag = heads_lib.make_init(
  "titans_mag",
  _SPEC_OPTIONS + ("titans_window", "titans_chunk"),
  mag_param_specs,
  call_options=("titans_window", "titans_chunk"),
)


init_titans_mal = heads_lib.make_init(
  "titans_mal",
  _SPEC_OPTIONS + ("titans_window", "titans_chunk", "mal_memory"),
  mal_param_specs,
  call_options=("titans_window", "titans_chunk", "mal_memory"),
)


@typing.no_type_check
def titans_mal(
  params,
  x_BTD: Float[Array, "B T D"],
  *,
  context_BSD=None,
  causal: bool = True,
  implementation: str | None = None,
  mask=None,
  positions_BT=None,
  rope=None,
  titans_window: int = 64,
  titans_chunk: int = 64,
  mal_memory: bool = True,
  return_aux: bool = False,
):
  """Titans memory as a layer (tier 3): the memory processes the sequence first, its read
  h = RMSNorm(titans_lmm(q^M, k^M, v^M, η, θ, α)) W_MO (back in model space) feeds a
  sliding-window attention (window ``titans_window``, the persistent tokens prefixed) whose
  output is the layer's. ``mal_memory=False`` replaces the memory by the identity (h = x):
  then the layer is sliding-window attention with persistent tokens. Parameters as
  ``titans_mag`` without the gate, plus ``w_mo [N, Hv, D]``; ``return_aux`` adds
  ``{"memory": h}``."""
  L = _check_params("titans_mal", params)
  dims = heads_lib.static_dims({n: params[n] for n in _ATTN}, "gqa")
  _check_layer_call("titans_mal", params, x_BTD, context_BSD, causal, rope, dims.D)
  _checks.positive_int("titans_window", titans_window)
  _checks.positive_int("titans_chunk", titans_chunk)
  if not isinstance(mal_memory, bool):
    raise ValueError(f"mal_memory must be a bool; got {mal_memory!r}")
  B, T, _ = x_BTD.shape
  ids = _packing("titans_mal", mask, B, T)
  h = x_BTD
  if mal_memory:
    qm, km, vm, eta, theta, alpha, memory = _memory_inputs(params, x_BTD, L)
    o_mem = titans_lmm(
      qm, km, vm, eta, theta, alpha, memory=memory, l2_normalize=True, segment_ids=ids,
      chunk_size=titans_chunk, implementation=_memory_impl(implementation),
    )  # fmt: skip
    o_mem = _rms(o_mem, params["norm_mem"]).astype(x_BTD.dtype)
    h = heads_lib.output_projection({"w_o": params["w_mo"]}, o_mem)
  q, k, v = _attention_qkv(params, h)
  attn_mask = masks_lib.sliding_window(titans_window)
  if ids is not None:
    attn_mask = attn_mask & masks_lib.SegmentMask(ids, ids)
  o = persistent_lib.persistent_memory_attention(
    q, k, v, params["p_k"], params["p_v"], mask=attn_mask, implementation=implementation
  )
  y = heads_lib.output_projection(params, o)
  return heads_lib._finish(y, {"memory": h}, return_aux)


# ---------------------------------------------------------------------------------------
# Registry entries.
# ---------------------------------------------------------------------------------------

BUILD_CHUNK = 8


def _build_lmm(key, dims, causal):
  del causal
  ke, kt, ka, km = jax.random.split(key, 4)
  shape = (dims.B, dims.T, dims.N)
  # Step sizes in the memory's stable range (see GATE_BIAS): with θ up to 0.5 and η up to 1
  # the memory diverged to inf by T = 64.
  return {
    "eta": 0.8 * jax.nn.sigmoid(jax.random.normal(ke, shape)),
    "theta": 0.1 * jax.nn.sigmoid(jax.random.normal(kt, shape)),
    "alpha": 0.2 * jax.nn.sigmoid(jax.random.normal(ka, shape)),
    "memory": init_memory(km, dims.N, dims.H, dims.Hv, num_layers=2, hidden=8),
    "l2_normalize": True,
    "chunk_size": BUILD_CHUNK,
  }


def _build_mac(key, dims, causal):
  del key, dims, causal
  return {"titans_segment": 6}


def _build_mag(key, dims, causal):
  del key, dims, causal
  return {"titans_window": 5, "titans_chunk": BUILD_CHUNK}


registry.register(
  registry.Mechanism(
    id="titans_lmm",
    family="h",
    paper=PAPER + " (neural long-term memory)",
    entry_point="attn_jax.attention.titans:titans_lmm",
    implementations=IMPLEMENTATIONS,
    patterns=frozenset((registry.SELF_CAUSAL,)),
    decode=False,
    tier=2,
    check="Chunk size 1 equals token-by-token online GD. With no momentum and no forgetting, a "
    "linear (matrix) memory equals `delta_rule` with β_t = θ_t, once the gradient's factor 2 "
    "is absorbed into θ (β_t = 2θ_t for ℓ = ‖M(k) − v‖²).",
    build=_build_lmm,
    module="attn_jax.nn.titans:TitansMemoryAttention",
  )
)
for _id, _paper, _check, _build, _init in (
  (
    "titans_mac",
    "memory as context",
    "With retrieval zeroed, it reduces to segment-local attention with persistent tokens.",
    _build_mac,
    "init_titans_mac",
  ),
  (
    "titans_mag",
    "memory as gate",
    "A gate fixed to the attention branch equals sliding-window attention with persistent tokens.",
    _build_mag,
    "init_titans_mag",
  ),
):
  registry.register(
    registry.Mechanism(
      id=_id,
      family="h",
      paper=f"{PAPER} ({_paper})",
      entry_point=f"attn_jax.attention.titans:{_id}",
      implementations=IMPLEMENTATIONS,
      patterns=frozenset((registry.SELF_CAUSAL,)),
      decode=False,
      tier=2,
      check=_check,
      build=_build,
      module=f"attn_jax.nn.titans:{'TitansMAC' if _id == 'titans_mac' else 'TitansMAG'}",
      interface="layer",
      init=f"attn_jax.attention.titans:{_init}",
    )
  )


def _build_mal(key, dims, causal):
  del key, dims, causal
  return {"titans_window": 5, "titans_chunk": BUILD_CHUNK}


registry.register(
  registry.Mechanism(
    id="titans_mal",
    family="h",
    paper=f"{PAPER} (memory as layer)",
    entry_point="attn_jax.attention.titans:titans_mal",
    implementations=IMPLEMENTATIONS,
    patterns=frozenset((registry.SELF_CAUSAL,)),
    decode=False,
    tier=3,
    check="An identity memory (mal_memory=False) equals sliding-window attention (with the "
    "persistent tokens prefixed).",
    build=_build_mal,
    module="attn_jax.nn.titans:TitansMAL",
    interface="layer",
    init="attn_jax.attention.titans:init_titans_mal",
  )
)


def _build_yaad(key, dims, causal):
  return {**_build_lmm(key, dims, causal), "huber_delta": 0.5}


def _build_moneta(key, dims, causal):
  kw = _build_lmm(key, dims, causal)  # ℓ3 gradients grow as e²: small steps stay stable
  return {**kw, "theta": 0.1 * kw["theta"], "lp_p": 3.0}


for _id, _paper, _entry, _check, _build in (
  (
    "miras_yaad",
    "Yaad",
    "miras_yaad",
    "δ → ∞ equals the ℓ2 update (titans_lmm); chunk size 1 equals online GD on the Huber loss.",
    _build_yaad,
  ),
  (
    "miras_moneta",
    "Moneta",
    "miras_moneta",
    "p = 2 with ℓ2 retention matches titans_lmm with the same memory and no momentum.",
    _build_moneta,
  ),
):
  registry.register(
    registry.Mechanism(
      id=_id,
      family="h",
      paper="It's All Connected: A Journey Through Test-Time Memorization, Attentional Bias, "
      f"Retention, and Online Optimization ({_paper})",
      entry_point=f"attn_jax.attention.titans:{_entry}",
      implementations=IMPLEMENTATIONS,
      patterns=frozenset((registry.SELF_CAUSAL,)),
      decode=False,
      tier=3,
      check=_check,
      build=_build,
    )
  )
