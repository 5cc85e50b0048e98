"""Agent attention (agent_attn): the two-softmax form (reference and xla attention calls)
equals its generalised linear-attention rewrite, with biases, DWC and GQA, forward and
gradients; φ_q·φ_kᵀ is row-stochastic; no T×T intermediate exists in the traced programs
(cost linear in T), while plain attention's program has one; pooling, bias interpolation and
the depthwise conv against direct loops; the NNX layer (bidirectional only); bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import agent as ag
from attn_jax.attention import dot_product_attention
from attn_jax.nn.transformer import Transformer


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def setup(key, B=2, T=23, S=23, N=4, K=2, H=8, Hv=6, n=5, dtype=jnp.float64, dwc=True):
  ks = jax.random.split(key, 6)
  q = normal(ks[0], (B, T, N, H), dtype)
  k = normal(ks[1], (B, S, K, H), dtype)
  v = normal(ks[2], (B, S, K, Hv), dtype)
  kw = {
    "num_agents": n,
    "agent_bias1": normal(ks[3], (N, n, S), dtype),
    "agent_bias2": normal(ks[4], (N, T, n), dtype),
  }
  if dwc:
    kw["dwc_weight"] = normal(ks[5], (3, K, Hv), dtype)
  return q, k, v, kw


@pytest.mark.parametrize(
  "T,S,n,dwc,dtype,tol",
  [
    (23, 23, 5, True, jnp.float64, 1e-12),
    (23, 23, 30, True, jnp.float32, 2e-5),  # more agents than tokens: pooling windows overlap
    (9, 31, 4, False, jnp.float64, 1e-12),  # cross-attention, no DWC
  ],
)
def test_two_softmax_form_equals_linear_rewrite(rng, T, S, n, dwc, dtype, tol):
  q, k, v, kw = setup(rng, T=T, S=S, n=n, dtype=dtype, dwc=dwc)
  arrays = {name: a for name, a in kw.items() if name != "num_agents"}
  run = jax.jit(
    lambda q, k, v, arrays: (
      ag.agent_attention(q, k, v, num_agents=n, implementation="reference", **arrays),
      ag.agent_attention(q, k, v, num_agents=n, implementation="xla", **arrays),
      ag.agent_attention_linear(q, k, v, num_agents=n, **arrays),
    )
  )
  ref, xla, lin = run(q, k, v, arrays)
  assert ref.shape == (2, T, 4, 6) and ref.dtype == dtype
  close(xla, ref, tol)
  close(lin, ref, tol)
  # The linear reading: O − DWC(V) = (φ_q φ_kᵀ) V with a row-stochastic T×S matrix.
  phi_q, phi_k = ag.agent_features(
    q, k, v, num_agents=n, agent_bias1=kw["agent_bias1"], agent_bias2=kw["agent_bias2"]
  )
  M = jnp.einsum("BTNA,BSNA->BNTS", phi_q, phi_k)
  close(M.sum(-1), jnp.ones_like(M[..., 0]), tol)
  want = jnp.einsum("BNTS,BSNV->BTNV", M, jnp.repeat(v, 2, axis=2))
  if dwc:
    want = want + jnp.repeat(ag.depthwise_conv(v, kw["dwc_weight"]), 2, axis=2)
  close(want, ref, tol)


def test_gradients_of_both_forms_agree(rng):
  q, k, v, kw = setup(rng, T=17, S=17)
  w = normal(jax.random.fold_in(rng, 1), (2, 17, 4, 6), jnp.float64)

  n = kw.pop("num_agents")

  def loss(fn):
    return lambda q, k, v, kw: jnp.sum(jnp.sin(fn(q, k, v, num_agents=n, **kw)) * w)

  argnums = (0, 1, 2, 3)  # q, k, v and the biases and DWC weights
  two = jax.jit(jax.grad(loss(ag.agent_attention), argnums))(q, k, v, kw)
  lin = jax.jit(jax.grad(loss(ag.agent_attention_linear), argnums))(q, k, v, kw)
  for a, b in zip(jax.tree.leaves(two), jax.tree.leaves(lin), strict=True):
    assert np.all(np.isfinite(np.asarray(a))) and float(jnp.abs(a).max()) > 0
    close(a, b, 1e-10)


def _intermediate_shapes(jaxpr, out):
  """Every value's shape in a jaxpr, nested calls (jit, custom_vjp, scan, cond) included."""
  for eqn in jaxpr.eqns:
    out.update(tuple(getattr(x.aval, "shape", ())) for x in eqn.outvars)
    for param in eqn.params.values():
      for sub in param if isinstance(param, list | tuple) else [param]:
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          _intermediate_shapes(inner if hasattr(inner, "eqns") else inner.jaxpr, out)
  return out


def test_no_T_by_T_intermediate(rng):
  T = 300  # longer than the blocked path's tiles, so a T×T value cannot hide as a tile
  q, k, v, kw = setup(rng, T=T, S=T, dtype=jnp.float32)

  def has_square(fn):
    shapes = _intermediate_shapes(jax.make_jaxpr(fn)(q, k, v).jaxpr, set())
    return any(sum(d >= T for d in s) >= 2 for s in shapes)

  for impl in ("reference", "xla"):

    def fwd(q, k, v, impl=impl):
      return ag.agent_attention(q, k, v, implementation=impl, **kw)

    assert not has_square(fwd)
    assert not has_square(jax.grad(lambda q, k, v, f=fwd: f(q, k, v).sum(), (0, 1, 2)))
  assert not has_square(lambda q, k, v: ag.agent_attention_linear(q, k, v, **kw))
  # The check can fail: softmax attention over the same tokens has a T×T value.
  assert has_square(lambda q, k, v: dot_product_attention(q, k, v, implementation="reference"))


def test_pooling_bias_and_conv_against_loops(rng):
  for T, n in ((10, 3), (4, 6), (7, 7)):
    P = ag.pool_matrix(T, n)
    for a in range(n):
      lo, hi = int(np.floor(a * T / n)), int(np.ceil((a + 1) * T / n))
      want = np.zeros(T)
      want[lo:hi] = 1 / (hi - lo)
      np.testing.assert_allclose(P[a], want, rtol=1e-6)
  table = normal(rng, (2, 3, 4), jnp.float64)
  out = ag.interpolate_bias(table, 7)  # anchors at 0, 2, 4, 6
  close(out[..., ::2], table, 1e-12)
  close(out[..., 1], (table[..., 0] + table[..., 1]) / 2, 1e-12)
  v = normal(rng, (1, 6, 2, 3), jnp.float64)
  w = normal(jax.random.fold_in(rng, 1), (5, 2, 3), jnp.float64)
  vp = np.pad(np.asarray(v), ((0, 0), (2, 2), (0, 0), (0, 0)))
  want = sum(vp[:, r : r + 6] * np.asarray(w[r]) for r in range(5))
  close(ag.depthwise_conv(v, w), want, 1e-12)


def test_nnx_layer(rng):
  opts = {"agent_num": 4, "agent_dwc": 3, "agent_bias_points": 3}
  model = Transformer(
    num_layers=1,
    attention="agent_attn",
    d_model=16,
    num_heads=2,
    causal=False,
    positions="none",
    mlp="none",
    options=opts,
    rngs=nnx.Rngs(0),
  )
  attn = model.blocks[0].attn
  attn.agent_b1[...] = normal(rng, attn.agent_b1[...].shape, jnp.float32)
  attn.agent_dwc[...] = normal(jax.random.fold_in(rng, 1), attn.agent_dwc[...].shape, jnp.float32)
  x = normal(rng, (2, 11, 16), jnp.float32)
  y = nnx.jit(lambda m, xx: m(xx))(model, x)
  assert y.shape == (2, 11, 16) and np.all(np.isfinite(np.asarray(y)))
  h = model.blocks[0].attn_norm(x)
  call = nnx.jit(lambda m, h: m(h))
  fast = call(attn, h)
  attn.implementation = "reference"
  close(call(attn, h), fast, 1e-5)
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(model)
  g = grads.blocks[0].attn
  for name in ("agent_b1", "agent_b2", "agent_dwc", "w_q"):
    assert float(jnp.abs(getattr(g, name)[...]).max()) > 0, name
  with pytest.raises(ValueError, match="bidirectional-only"):
    Transformer(
      num_layers=1,
      attention="agent_attn",
      d_model=16,
      num_heads=2,
      positions="none",
      rngs=nnx.Rngs(0),
    )
  with pytest.raises(ValueError, match="agent_dwc 0 or odd"):
    Transformer(
      num_layers=1,
      attention="agent_attn",
      d_model=16,
      num_heads=2,
      causal=False,
      positions="none",
      options={"agent_dwc": 2},
      rngs=nnx.Rngs(0),
    )
  with pytest.raises(NotImplementedError, match="segment ids"):
    attn(h, segment_ids_BT=jnp.ones((2, 11), jnp.int32))


def test_bad_inputs(rng):
  q, k, v, kw = setup(rng, T=8, S=8, n=3)
  with pytest.raises(ValueError, match="non-causal only"):
    ag.agent_attention(q, k, v, causal=True, **kw)
  with pytest.raises(ValueError, match="num_agents must be"):
    ag.agent_attention(q, k, v, num_agents=0)
  with pytest.raises(ValueError, match="agent_bias1 must be"):
    ag.agent_attention(q, k, v, num_agents=3, agent_bias1=jnp.zeros((4, 3, 7)))
  with pytest.raises(ValueError, match="agent_bias2 must be"):
    ag.agent_attention(q, k, v, num_agents=3, agent_bias2=jnp.zeros((4, 3, 8)))
  with pytest.raises(ValueError, match="dwc_weight must be"):
    ag.agent_attention(q, k, v, num_agents=3, dwc_weight=jnp.zeros((2, 2, 6)))
  with pytest.raises(ValueError, match="needs S == T"):
    ag.agent_attention(q, k[:, :5], v[:, :5], num_agents=3, dwc_weight=jnp.zeros((3, 2, 6)))
  with pytest.raises(ValueError, match="implementation must be one of"):
    ag.agent_attention(q, k, v, implementation="pallas_gpu")
  with pytest.raises(ValueError, match="multiple of the number of kv heads"):
    ag.agent_attention(q[:, :, :3], k, v)
