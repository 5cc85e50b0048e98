"""Titans (titans_lmm, titans_mac, titans_mag): the chunked memory update equals the token
scan (chunk sizes, MLP memories, GQA, packing) and an independent numpy mini-batch GD oracle
(C = 1: online GD), with gradients; a linear memory without momentum or forgetting is the
delta rule with β = 2θ; two halves with the carried state equal one pass; documents restart
the memory; MAC without retrieval is segment-local attention with persistent tokens and
its retrieval reads the memory of earlier segments; MAG with the gate fixed to a branch is
that branch; causality through gradients; bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal

from attn_jax.attention import SegmentMask, attention_reference, registry
from attn_jax.attention import delta as delta_lib
from attn_jax.attention import titans as tt


def close(a, b, tol):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
  np.testing.assert_allclose(a, b, atol=tol, rtol=tol)


_STATIC = ("chunk_size", "implementation", "mode", "return_final_state", "l2_normalize")
# One compiled program per configuration (op-by-op dispatch is slow on this CPU).
lmm = jax.jit(tt.titans_lmm, static_argnames=_STATIC)
mac = jax.jit(
  tt.titans_mac, static_argnames=("titans_segment", "mac_retrieve", "return_aux", "implementation")
)
mag = jax.jit(tt.titans_mag, static_argnames=("titans_window", "titans_chunk", "implementation"))


def inputs(key, B=2, T=13, N=4, K=2, H=6, Hv=5, dtype=jnp.float64, layers=2):
  ks = jax.random.split(key, 7)
  q = normal(ks[0], (B, T, N, H), dtype)
  k = tt._l2(normal(ks[1], (B, T, K, H), dtype))  # ‖k‖ = 1: the memory stays bounded
  v = normal(ks[2], (B, T, K, Hv), dtype)
  eta = jax.nn.sigmoid(normal(ks[3], (B, T, N), dtype))
  theta = 0.4 * jax.nn.sigmoid(normal(ks[4], (B, T, N), dtype))
  alpha = 0.3 * jax.nn.sigmoid(normal(ks[5], (B, T, N), dtype))
  memory = None
  if layers:
    memory = tuple(w.astype(dtype) for w in tt.init_memory(ks[6], N, H, Hv, num_layers=layers))
  return (q, k, v, eta, theta, alpha), memory


# ------------------------------------------------------------------------------------------
# An independent oracle: mini-batch GD on an L-layer SiLU MLP in numpy, backprop by hand.
# ------------------------------------------------------------------------------------------


def _np_forward(W, x):
  hs, zs = [x], []
  for i, w in enumerate(W):
    z = hs[-1] @ w
    zs.append(z)
    hs.append(z / (1 + np.exp(-z)) if i < len(W) - 1 else z)
  return hs, zs


def _np_grads(W, k, v):
  hs, zs = _np_forward(W, k)
  g = 2 * (hs[-1] - v)
  grads = [None] * len(W)
  for i in reversed(range(len(W))):
    grads[i] = np.outer(hs[i], g)
    if i:
      s = 1 / (1 + np.exp(-zs[i - 1]))
      g = (W[i] @ g) * s * (1 + zs[i - 1] * (1 - s))
  return grads


def numpy_titans(q, k, v, eta, theta, alpha, memory, C):
  q, k, v, eta, theta, alpha = (np.asarray(a, np.float64) for a in (q, k, v, eta, theta, alpha))
  B, T, N, _ = q.shape
  out = np.zeros((B, T, N, v.shape[-1]))
  for b in range(B):
    for n in range(N):
      W = [np.asarray(w[n], np.float64) for w in memory]
      S = [np.zeros_like(w) for w in W]
      for t in range(T):
        if t % C == 0:
          Wg = [w.copy() for w in W]
        u = _np_grads(Wg, k[b, t, n], v[b, t, n])
        S = [eta[b, t, n] * s - theta[b, t, n] * g for s, g in zip(S, u, strict=True)]
        W = [(1 - alpha[b, t, n]) * w + s for w, s in zip(W, S, strict=True)]
        out[b, t, n] = _np_forward(W, q[b, t, n])[0][-1]
  return out


@pytest.mark.parametrize("layers", [3])
def test_online_and_minibatch_gd_equal_numpy_oracle(rng, layers):
  """C = 1 is token-by-token online GD and C = 4 mini-batch GD, in both implementations;
  gates with exact η = 0 and α = 1 entries included."""
  (q, k, v, eta, theta, alpha), memory = inputs(rng, T=8, N=2, K=2, layers=layers)
  drop = jax.random.uniform(jax.random.fold_in(rng, 3), eta.shape)
  eta, alpha = jnp.where(drop < 0.2, 0.0, eta), jnp.where(drop > 0.9, 1.0, alpha)
  for C in (1, 4):
    want = numpy_titans(q, k, v, eta, theta, alpha, memory, C)
    for impl in ("reference", "xla"):
      got = lmm(q, k, v, eta, theta, alpha, memory=memory, chunk_size=C, implementation=impl)
      close(got, want, 1e-9)


@pytest.mark.parametrize("C,layers,packed", [(4, 1, False), (5, 2, True), (16, 2, False)])
def test_chunk_form_equals_token_scan(rng, C, layers, packed):
  """Outputs and final state (GQA, a short last chunk, resets inside chunks)."""
  (q, k, v, eta, theta, alpha), memory = inputs(rng, layers=layers)
  ids = jnp.asarray([[1] * 6 + [2] * 7, [1] * 2 + [2] * 5 + [3] * 6]) if packed else None
  kw = dict(memory=memory, segment_ids=ids, chunk_size=C, return_final_state=True)
  a, Sa = lmm(q, k, v, eta, theta, alpha, implementation="reference", **kw)
  b, Sb = lmm(q, k, v, eta, theta, alpha, **kw)
  close(b, a, 1e-10)
  for x, y in zip(jax.tree.leaves(Sb), jax.tree.leaves(Sa), strict=True):
    close(x, y, 1e-10)


def test_float32_chunk_form_equals_token_scan(rng):
  args, memory = inputs(rng, T=21, dtype=jnp.float32)
  a = lmm(*args, memory=memory, chunk_size=8, l2_normalize=True, mode="recurrent")
  b = lmm(*args, memory=memory, chunk_size=8, l2_normalize=True)
  assert b.dtype == jnp.float32
  close(b, a, 1e-5)


def test_linear_memory_without_momentum_or_forgetting_is_delta_rule(rng):
  """η = 0, α = 0, L = 1: W_t = W − 2θ k (kᵀW − vᵀ), the delta rule with β = 2θ (o = Sᵀq,
  scale 1), from a non-zero initial state; both delta forms against C = 1 both ways."""
  (q, k, v, _, theta, _), _ = inputs(rng, T=19, layers=0)
  q, k = tt._l2(q), tt._l2(k)
  zero = jnp.zeros_like(theta)
  S0 = normal(jax.random.fold_in(rng, 1), (2, 4, 6, 5), jnp.float64)
  init = ((S0,), (jnp.zeros_like(S0),))
  for impl in ("reference", "xla"):
    want = delta_lib.delta_rule_attention(
      q, k, v, 2 * theta, scale=1.0, initial_state=S0, chunk_size=8, implementation=impl
    )
    got = lmm(q, k, v, zero, theta, zero, initial_state=init, chunk_size=1, implementation=impl)
    close(got, want, 1e-10)
  # Mini-batches (C > 1) are a different rule: the test above could see it.
  minibatch = lmm(q, k, v, zero, theta, zero, initial_state=init, chunk_size=4)
  assert not np.allclose(minibatch, want, atol=1e-3)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_two_halves_with_carried_state_equal_one_pass(rng, impl):
  (q, k, v, eta, theta, alpha), memory = inputs(rng, T=16)
  args = (q, k, v, eta, theta, alpha)
  kw = dict(memory=memory, chunk_size=4, implementation=impl, return_final_state=True)
  full, S_full = lmm(*args, **kw)
  first, S1 = lmm(*(a[:, :8] for a in args), **kw)
  second, S2 = lmm(*(a[:, 8:] for a in args), initial_state=S1, **kw)
  close(jnp.concatenate([first, second], 1), full, 1e-10)
  for x, y in zip(jax.tree.leaves(S2), jax.tree.leaves(S_full), strict=True):
    close(x, y, 1e-10)


def test_recurrent_decoding_equals_prefill(rng):
  """Online GD (C = 1) decoded one token at a time against the carried state."""
  (q, k, v, eta, theta, alpha), memory = inputs(rng, T=7)
  args = (q, k, v, eta, theta, alpha)
  full = lmm(*args, memory=memory, chunk_size=1)
  state, steps = None, []
  for t in range(7):
    y, state = lmm(
      *(a[:, t : t + 1] for a in args),
      memory=memory,
      initial_state=state,
      chunk_size=1,
      mode="recurrent",
      return_final_state=True,
    )
    steps.append(y)
  close(jnp.concatenate(steps, 1), full, 1e-10)


def test_segment_ids_restart_the_memory(rng):
  """A document starting on a chunk boundary equals the document alone; one starting inside
  a chunk never sees the tokens before it."""
  (q, k, v, eta, theta, alpha), memory = inputs(rng, T=16)
  args = (q, k, v, eta, theta, alpha)
  ids = jnp.asarray([[1] * 8 + [2] * 8, [1] * 6 + [2] * 10])
  packed = lmm(*args, memory=memory, chunk_size=4, segment_ids=ids)
  alone = lmm(*(a[:1, 8:] for a in args), memory=memory, chunk_size=4)
  close(packed[:1, 8:], alone, 1e-10)
  noise = [normal(jax.random.fold_in(rng, i), a.shape, a.dtype) for i, a in enumerate(args[:3])]
  early = jnp.arange(16)[None, :, None, None] < 6
  changed = [jnp.where(early, n, a) for n, a in zip(noise, args[:3], strict=True)]
  moved = lmm(*changed, *args[3:], memory=memory, chunk_size=4, segment_ids=ids)
  close(moved[1, 6:], packed[1, 6:], 1e-10)
  assert not np.allclose(moved[1, :6], packed[1, :6])


def test_gradients_equal_between_implementations(rng):
  """Gradients wrt q, k, v, η, θ, α, the initial memory and the initial momentum, under jit,
  at C = 1 (online GD) and C = 3."""
  (q, k, v, eta, theta, alpha), memory = inputs(rng, T=9)
  mom = tuple(
    normal(jax.random.fold_in(rng, i), (2,) + w.shape, w.dtype) * 0.1 for i, w in enumerate(memory)
  )
  w_out = normal(jax.random.fold_in(rng, 7), (2, 9, 4, 5), jnp.float64)

  def loss(args, memory, mom, impl, C):
    weights = tuple(jnp.broadcast_to(w, (2,) + w.shape) for w in memory)
    out, (W, S) = tt.titans_lmm(
      *args, memory=memory, initial_state=(weights, mom), chunk_size=C, implementation=impl,
      l2_normalize=True, return_final_state=True,
    )  # fmt: skip
    return jnp.sum(out * w_out) + sum(jnp.sum(jnp.sin(x)) for x in (*W, *S))

  @jax.jit
  def grads(args, memory, mom):
    return [
      jax.grad(loss, argnums=(0, 1, 2))(args, memory, mom, impl, C)
      for C in (1, 3)
      for impl in ("reference", "xla")
    ]

  ref1, xla1, ref3, xla3 = grads((q, k, v, eta, theta, alpha), memory, mom)
  for ref, xla in ((ref1, xla1), (ref3, xla3)):
    for a, b in zip(jax.tree.leaves(xla), jax.tree.leaves(ref), strict=True):
      assert np.all(np.isfinite(np.asarray(a)))
      close(a, b, 1e-9)
  assert float(jnp.abs(ref1[0][3]).max()) > 0  # η reaches the output


def test_bad_inputs_raise(rng):
  (q, k, v, eta, theta, alpha), memory = inputs(rng, T=5)
  args = (q, k, v, eta, theta, alpha)
  with pytest.raises(ValueError, match="eta must be a float array"):
    tt.titans_lmm(q, k, v, eta[:, :3], theta, alpha)
  with pytest.raises(ValueError, match="alpha must have a floating dtype"):
    tt.titans_lmm(q, k, v, eta, theta, (alpha > 0.1).astype(jnp.int32))
  with pytest.raises(ValueError, match="memory weights must be"):
    tt.titans_lmm(*args, memory=(memory[0], memory[0]))
  with pytest.raises(ValueError, match="memory must be None or a non-empty tuple"):
    tt.titans_lmm(*args, memory=memory[0])
  with pytest.raises(ValueError, match="initial_state must be"):
    tt.titans_lmm(*args, memory=memory, initial_state=(memory, memory))
  with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
    tt.titans_lmm(*args, chunk_size=0)
  with pytest.raises(ValueError, match="mode must be one of"):
    tt.titans_lmm(*args, mode="parallel")
  with pytest.raises(ValueError, match="implementation must be one of"):
    tt.titans_lmm(*args, implementation="fast")
  with pytest.raises(NotImplementedError, match="Pallas kernel"):
    tt.titans_lmm(*args, implementation="pallas_tpu")
  with pytest.raises(ValueError, match="k must be"):
    tt.titans_lmm(q, k[:, :4], v, eta, theta, alpha)
  with pytest.raises(ValueError, match="scale must be"):
    tt.titans_lmm(*args, scale=0.0)


# ------------------------------------------------------------------------------------------
# The layers.
# ------------------------------------------------------------------------------------------

D, NH, P = 12, 2, 3


def layer(kind, key, **options):
  init = {"titans_mac": tt.init_titans_mac, "titans_mag": tt.init_titans_mag}.get(
    kind, tt.init_titans_mal
  )
  return init(
    key, d_model=D, num_heads=NH, head_dim=4, dtype=jnp.float64, titans_persistent=P,
    titans_memory_hidden=6, **options,
  )  # fmt: skip


def dense_attention(params, x_q, k, v, visible_TS):
  """Softmax attention over [p_k ‖ keys] with a dense [T, P + S] visibility, then W_O."""
  B = x_q.shape[0]
  q = jnp.einsum("BTD,DNH->BTNH", x_q, params["w_q"])
  kp = jnp.broadcast_to(params["p_k"][None], (B,) + params["p_k"].shape)
  vp = jnp.broadcast_to(params["p_v"][None], (B,) + params["p_v"].shape)
  bias = jnp.where(jnp.asarray(visible_TS), 0.0, -jnp.inf)[None, None]
  return attention_reference(q, jnp.concatenate([kp, k], 1), jnp.concatenate([vp, v], 1), bias=bias)


def project(params, x, name):
  return jnp.einsum("BTD,DKH->BTKH", x, params[name])


def segment_visible(T, L):
  i, m = np.arange(T)[:, None], np.arange(T)[None, :]
  return (i // L == m // L) & (m <= i)


MAC_T, MAC_L = 13, 5  # a short last segment


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_mac_attention_over_persistent_retrieved_and_segment_tokens(rng, impl):
  """Without retrieval: segment-local causal attention with persistent tokens. With it: dense
  attention over [persistent ‖ retrieved ‖ tokens] with the documented mask (token i sees
  h_m and x_m of its segment for m <= i)."""
  T, L = MAC_T, MAC_L
  params = layer("titans_mac", rng)
  x = normal(jax.random.fold_in(rng, 1), (2, T, D), jnp.float64)
  got = mac(params, x, titans_segment=L, mac_retrieve=False, implementation=impl)
  seg = segment_visible(T, L)
  everyone = np.ones((T, P), bool)
  k, v = project(params, x, "w_k"), project(params, x, "w_v")
  o = dense_attention(params, x, k, v, np.concatenate([everyone, seg], 1))
  close(got, jnp.einsum("BTNV,NVD->BTD", o, params["w_o"]), 1e-10)

  full, aux = mac(params, x, titans_segment=L, return_aux=True, implementation=impl)
  assert not np.allclose(full, got, atol=1e-4)  # retrieval changes the output
  h_D = jnp.einsum("BTNV,NVD->BTD", aux["retrieved"], params["w_mo"])
  k = jnp.concatenate([project(params, h_D, "w_k"), k], 1)
  v = jnp.concatenate([project(params, h_D, "w_v"), v], 1)
  o = dense_attention(params, x, k, v, np.concatenate([everyone, seg, seg], 1))
  close(full, jnp.einsum("BTNV,NVD->BTD", o, params["w_o"]), 1e-10)


def test_mac_retrieval_reads_the_memory_left_by_earlier_segments(rng):
  """Segment s reads the memory after titans_lmm (C = L) over the s·L tokens before it."""
  T, L = MAC_T, MAC_L
  params = layer("titans_mac", rng)
  x = normal(jax.random.fold_in(rng, 1), (2, T, D), jnp.float64)
  _, aux = mac(params, x, titans_segment=L, return_aux=True, implementation="xla")
  qm, km, vm = (jnp.einsum("BTD,DNH->BTNH", x, params[n]) for n in ("w_mq", "w_mk", "w_mv"))
  gates = jax.nn.sigmoid(jnp.einsum("BTD,DNG->BTNG", x, params["w_gates"]) + params["b_gates"])
  memory = (params["memory_0"], params["memory_1"])
  before = (qm, km, vm, *(gates[..., i] for i in range(3)))
  weights = tuple(jnp.broadcast_to(w, (2,) + w.shape) for w in memory)
  for s in range(-(-T // L)):
    if s:
      _, (weights, _) = lmm(
        *(a[:, : s * L] for a in before), memory=memory, l2_normalize=True, chunk_size=L,
        return_final_state=True,
      )  # fmt: skip
    want = tt.memory_forward(tuple(w[:, None] for w in weights), tt._l2(qm[:, s * L : s * L + L]))
    close(aux["retrieved"][:, s * L : s * L + L], want, 1e-10)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_mag_gate_fixed_to_a_branch_is_that_branch(rng, impl):
  """g ≡ 1: sliding-window attention with persistent tokens (RMSNorm_a, W_O); g ≡ 0: the
  memory branch, titans_lmm on the memory projections (RMSNorm_m, W_O)."""
  T, w, C = 13, 4, 4
  params = layer("titans_mag", rng)
  x = normal(jax.random.fold_in(rng, 1), (2, T, D), jnp.float64)

  def rms(o, scale):
    return o / jnp.sqrt(jnp.mean(o * o, -1, keepdims=True) + 1e-6) * scale

  def run(bias):
    p = dict(params, w_g=jnp.zeros_like(params["w_g"]), b_g=jnp.full_like(params["b_g"], bias))
    return mag(p, x, titans_window=w, titans_chunk=C, implementation=impl)

  i, m = np.arange(T)[:, None], np.arange(T)[None, :]
  visible = np.concatenate([np.ones((T, P), bool), (m <= i) & (m > i - w)], 1)
  o = dense_attention(params, x, project(params, x, "w_k"), project(params, x, "w_v"), visible)
  want = jnp.einsum("BTNV,NVD->BTD", rms(o, params["norm_attn"]), params["w_o"])
  close(run(100.0), want, 1e-10)

  qm, km, vm = (jnp.einsum("BTD,DNH->BTNH", x, params[n]) for n in ("w_mq", "w_mk", "w_mv"))
  gates = jax.nn.sigmoid(jnp.einsum("BTD,DNG->BTNG", x, params["w_gates"]) + params["b_gates"])
  o_mem = lmm(
    qm, km, vm, *(gates[..., i] for i in range(3)), memory=(params["memory_0"], params["memory_1"]),
    l2_normalize=True, chunk_size=C, implementation="reference",
  )  # fmt: skip
  want = jnp.einsum("BTNV,NVD->BTD", rms(o_mem, params["norm_mem"]), params["w_o"])
  close(run(-100.0), want, 1e-10)


@pytest.mark.parametrize("kind", ["titans_mac", "titans_mag"])
def test_layers_are_causal_and_keep_packed_documents_apart(rng, kind):
  T = 16
  params = layer(kind, rng)
  opts = {"titans_segment": 4} if kind == "titans_mac" else {"titans_window": 3, "titans_chunk": 4}
  fn = {"titans_mac": mac, "titans_mag": mag}[kind]
  x = normal(jax.random.fold_in(rng, 1), (1, T, D), jnp.float64)
  readout = normal(jax.random.fold_in(rng, 2), (D,), jnp.float64)
  if kind == "titans_mac":  # (test_nn checks every layer; here several segments)
    t = 9
    g = jax.jit(jax.grad(lambda x: (fn(params, x, **opts)[0, t] * readout).sum()))(x)[0]
    assert float(jnp.abs(g[t + 1 :]).max()) == 0.0
    assert float(jnp.abs(g[:4]).max()) > 0.0  # an earlier segment reaches t via the memory
  ids = jnp.asarray([[1] * 8 + [2] * 8])
  packed = fn(params, x, mask=SegmentMask(ids, ids), **opts)
  close(packed[:, 8:], fn(params, x[:, 8:], **opts), 1e-10)
  close(packed[:, :8], fn(params, x[:, :8], **opts), 1e-10)


def test_layer_bad_inputs_raise(rng):
  params = layer("titans_mag", rng)
  x = normal(rng, (1, 5, D), jnp.float64)
  with pytest.raises(ValueError, match="titans_mag params must hold"):
    tt.titans_mag({k: v for k, v in params.items() if k != "w_g"}, x)
  with pytest.raises(ValueError, match="causal self-attention"):
    tt.titans_mag(params, x, causal=False)
  with pytest.raises(ValueError, match="causal self-attention"):
    tt.titans_mac(layer("titans_mac", rng), x, context_BSD=x)
  with pytest.raises(ValueError, match="takes no RoPE"):
    tt.titans_mag(params, x, rope={"base": 10000.0})
  with pytest.raises(NotImplementedError, match="no mask other than"):
    from attn_jax.attention import CausalMask

    tt.titans_mag(params, x, mask=CausalMask())
  with pytest.raises(ValueError, match="titans_window must be an int >= 1"):
    tt.titans_mag(params, x, titans_window=0)
  with pytest.raises(ValueError, match="titans_segment must be an int >= 1"):
    tt.titans_mac(layer("titans_mac", rng), x, titans_segment=0)
  with pytest.raises(ValueError, match="model dim"):
    tt.titans_mag(params, x[..., :5])
  with pytest.raises(ValueError, match="unknown titans_mac options"):
    tt.init_titans_mac(rng, d_model=D, num_heads=NH, titans_window=3)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_mal_identity_memory_is_sliding_window_attention(rng, impl):
  """titans_mal (tier 3) with the identity memory = sliding-window attention with persistent
  tokens; with the memory, the same attention reads the memory's output h."""
  T, w, C = 13, 4, 4
  params = layer("titans_mal", rng)
  x = normal(jax.random.fold_in(rng, 1), (2, T, D), jnp.float64)
  mal = jax.jit(
    tt.titans_mal,
    static_argnames=("titans_window", "titans_chunk", "implementation", "mal_memory"),
  )
  i, m = np.arange(T)[:, None], np.arange(T)[None, :]
  visible = np.concatenate([np.ones((T, P), bool), (m <= i) & (m > i - w)], 1)

  def swa(h):
    o = dense_attention(params, h, project(params, h, "w_k"), project(params, h, "w_v"), visible)
    return jnp.einsum("BTNV,NVD->BTD", o, params["w_o"])

  run = dict(titans_window=w, titans_chunk=C, implementation=impl)
  close(mal(params, x, mal_memory=False, **run), swa(x), 1e-10)
  y, aux = tt.titans_mal(params, x, return_aux=True, **run)
  h = aux["memory"]
  assert float(jnp.abs(h - x).max()) > 1e-3  # the memory changes the attention's input
  close(y, swa(h), 1e-10)


# ------------------------------------------------------------------------------------------
# Miras variants (tier 3): Yaad (Huber bias), Moneta (ℓp bias, ℓ2 retention).
# ------------------------------------------------------------------------------------------


def miras_inputs(key, T=11):
  ks = jax.random.split(key, 7)
  q, k = normal(ks[0], (2, T, 2, 4), jnp.float64), normal(ks[1], (2, T, 2, 4), jnp.float64)
  v = 3.0 * normal(ks[2], (2, T, 2, 5), jnp.float64)  # errors beyond δ for the Huber test
  gates = [
    jax.nn.sigmoid(normal(kk, (2, T, 2), jnp.float64)) * s
    for kk, s in zip(ks[3:6], (1.0, 0.5, 0.2), strict=True)
  ]
  memory = tt.init_memory(ks[6], 2, 4, 5, num_layers=2, hidden=6)
  memory = tuple(w.astype(jnp.float64) for w in memory)
  return (q, k, v, *gates), memory


def test_yaad_huber_bias_limits_and_online_gd(rng):
  args, memory = miras_inputs(rng)
  kw = dict(memory=memory, l2_normalize=True, chunk_size=4)

  @jax.jit  # one program for the six runs
  def run(args):
    yaad = functools.partial(tt.miras_yaad, *args)
    return (
      tt.titans_lmm(*args, **kw),
      yaad(huber_delta=1e9, **kw),
      yaad(huber_delta=0.05, **kw),
      yaad(huber_delta=0.05, **{**kw, "chunk_size": 1}),
      yaad(huber_delta=0.05, implementation="reference", **{**kw, "chunk_size": 1}),
      yaad(huber_delta=0.05, implementation="reference", **kw),
    )

  l2, big, small, chunk1, scan, small_ref = run(args)
  close(big, l2, 1e-10)  # δ → ∞: the ℓ2 update
  assert float(jnp.abs(small - l2).max()) > 1e-3
  close(chunk1, scan, 1e-10)  # chunk 1 = online GD on the Huber loss
  close(small, small_ref, 1e-10)


def test_moneta_lp_bias(rng):
  args, memory = miras_inputs(rng)
  q, k, v, eta, theta, alpha = args
  kw = dict(memory=memory, l2_normalize=True, chunk_size=4)
  no_momentum = (q, k, v, 0.0 * eta, theta, alpha)
  close(tt.miras_moneta(*no_momentum, lp_p=2.0, **kw), tt.titans_lmm(*no_momentum, **kw), 1e-10)
  p3 = tt.miras_moneta(*args, lp_p=3.0, **kw)
  close(p3, tt.miras_moneta(*args, lp_p=3.0, implementation="reference", **kw), 1e-10)
  g = jax.jit(jax.grad(lambda v: jnp.sum(tt.miras_moneta(q, k, v, eta, theta, alpha, **kw))))(v)
  assert np.all(np.isfinite(np.asarray(g)))
  with pytest.raises(NotImplementedError, match="q = 2 only"):
    tt.miras_moneta(*args, lq_q=3.0, **kw)
  with pytest.raises(ValueError, match="attentional_bias needs"):
    tt.titans_lmm(*args, attentional_bias=("lp", 0.5), **kw)
  with pytest.raises(ValueError, match="attentional_bias must be"):
    tt.titans_lmm(*args, attentional_bias=("l1",), **kw)


@pytest.mark.parametrize("kind", ["titans_mag", "titans_mac", "titans_mal"])
def test_default_init_stays_finite_on_long_sequences(kind):
  """The initial gates keep the test-time memory stable: at T = 512 (8 chunks of 64) the
  layer's output is finite and the memory read bounded (the former gate biases diverged to
  inf within 64 tokens)."""
  p = registry.init_layer(kind, jax.random.key(6), d_model=64, num_heads=4)
  x = jax.random.normal(jax.random.key(0), (1, 512, 64), jnp.float32)
  y, aux = getattr(tt, kind)(p, x, causal=True, return_aux=True)  # chunks / segments of 64
  assert bool(jnp.all(jnp.isfinite(y)))
  assert all(float(jnp.max(jnp.abs(a))) < 10.0 for a in jax.tree.leaves(aux))
