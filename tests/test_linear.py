"""Scalar-decay linear attention (linear_attn, lightning, simple_gla): the chunked form equals
the token-scan oracle and the materialised quadratic form (feature maps, normalisation,
fixed and data-dependent decays from mild to g ≈ −10, chunk sizes 16/32/64, T = 63 and 500,
GQA), with gradients of q, k, v, the decay and the initial state; two halves with the
carried state equal one pass; token-by-token decoding equals the prefill; packed documents
equal separate runs; λ = 1 is linear_attn and a constant g is lightning; the NNX layers;
bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import linear as lin
from attn_jax.nn.transformer import Transformer


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def inputs(key, B=2, T=63, N=4, K=2, H=8, Hv=6, dtype=jnp.float64, g=None):
  kq, kk, kv, kg = jax.random.split(key, 4)
  q = normal(kq, (B, T, N, H), dtype)
  k = normal(kk, (B, T, K, H), dtype)
  v = normal(kv, (B, T, K, Hv), dtype)
  if g == "data":
    g = -jax.nn.softplus(normal(kg, (B, T, N), dtype))
  elif g == "strong":
    g = -10.0 * jax.random.uniform(kg, (B, T, N), dtype)
  elif g == "fixed":
    g = jnp.asarray(lin.lightning_log_decay(N), dtype)
  return q, k, v, g


@pytest.mark.parametrize(
  "feature,normalize,g,C,T",
  [
    ("identity", False, None, 16, 63),
    ("elu1", True, None, 32, 63),
    ("softmax", False, "fixed", 64, 63),
    ("relu", False, "data", 16, 500),
    ("identity", False, "strong", 32, 63),
  ],
)
def test_chunk_equals_scan_and_materialised(rng, feature, normalize, g, C, T):
  q, k, v, g = inputs(rng, T=T, g=g)
  kw = dict(feature_map=feature, normalize=normalize)
  scan = lin.linear_attention(q, k, v, g, implementation="reference", **kw)
  chunk = lin.linear_attention(q, k, v, g, chunk_size=C, **kw)
  close(chunk, scan, 1e-9)
  if T <= 100:
    close(lin.materialised(q, k, v, g, **kw), scan, 1e-9)
  assert np.all(np.isfinite(np.asarray(chunk)))


@pytest.mark.parametrize("g", ["data", "strong"])
def test_gradients_chunk_equal_scan(rng, g):
  q, k, v, g = inputs(rng, T=37, g=g)
  s0 = normal(jax.random.fold_in(rng, 9), (2, 4, 8, 6), jnp.float64)
  w = normal(jax.random.fold_in(rng, 8), (2, 37, 4, 6), jnp.float64)

  def loss(q, k, v, g, s0, impl):
    out, S = lin.linear_attention(
      q, k, v, g, initial_state=s0, return_final_state=True, chunk_size=16, implementation=impl
    )
    return jnp.sum(out * w) + jnp.sum(jnp.sin(S))

  grad = jax.jit(jax.grad(loss, (0, 1, 2, 3, 4)), static_argnums=5)
  for a, b in zip(grad(q, k, v, g, s0, "xla"), grad(q, k, v, g, s0, "reference"), strict=True):
    assert np.all(np.isfinite(np.asarray(a)))
    close(a, b, 1e-8)


def test_carried_state_decode_and_packing(rng):
  la = jax.jit(
    lin.linear_attention,
    static_argnames=("return_final_state", "chunk_size", "mode", "implementation"),
  )
  q, k, v, g = inputs(rng, T=40, g="data")
  full, S_full = la(q, k, v, g, return_final_state=True, chunk_size=16)
  a, S_a = la(q[:, :23], k[:, :23], v[:, :23], g[:, :23], return_final_state=True, chunk_size=16)
  b, S_b = la(
    q[:, 23:],
    k[:, 23:],
    v[:, 23:],
    g[:, 23:],
    initial_state=S_a,
    return_final_state=True,
    chunk_size=16,
  )
  close(jnp.concatenate([a, b], 1), full, 1e-9)
  close(S_b, S_full, 1e-9)
  # Decoding one token at a time from the prefill's state.
  _, S = la(q[:, :30], k[:, :30], v[:, :30], g[:, :30], return_final_state=True)
  for t in range(30, 40):
    o, S = la(
      q[:, t : t + 1],
      k[:, t : t + 1],
      v[:, t : t + 1],
      g[:, t : t + 1],
      initial_state=S,
      return_final_state=True,
      mode="recurrent",
    )
    close(o[:, 0], full[:, t], 1e-9)
  # A packed row equals each document run alone (the state restarts at 17 and 29).
  ids = jnp.asarray([[1] * 17 + [2] * 12 + [3] * 11] * 2)
  packed = la(q, k, v, g, segment_ids=ids, chunk_size=16)
  for lo, hi in ((0, 17), (17, 29), (29, 40)):
    alone = la(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], g[:, lo:hi])
    close(packed[:, lo:hi], alone, 1e-9)
  close(la(q, k, v, g, segment_ids=ids, implementation="reference"), packed, 1e-9)


@pytest.mark.parametrize("strong", [False, True])
def test_per_dimension_gates(rng, strong):
  q, k, v, _ = inputs(rng, T=45)
  kg = jax.random.fold_in(rng, 4)
  g = -(
    10.0 * jax.random.uniform(kg, (2, 45, 4, 8))
    if strong
    else jax.nn.softplus(normal(kg, (2, 45, 4, 8), jnp.float64))
  )
  scan, S1 = lin.linear_attention(q, k, v, g, implementation="reference", return_final_state=True)
  chunk, S2 = lin.linear_attention(q, k, v, g, chunk_size=16, return_final_state=True)
  close(chunk, scan, 1e-9)
  close(S2, S1, 1e-9)
  close(lin.materialised(q, k, v, g), scan, 1e-9)
  # Equal gates across the key dimensions reproduce the scalar gate.
  g1 = g[..., :1]
  close(
    lin.linear_attention(q, k, v, jnp.broadcast_to(g1, g.shape), chunk_size=16),
    lin.linear_attention(q, k, v, g1[..., 0], chunk_size=16),
    1e-9,
  )


def test_taylor_features_and_based_chunk(rng):
  x, y = (
    normal(rng, (2, 5, 3, 6), jnp.float64),
    normal(jax.random.fold_in(rng, 1), (2, 5, 3, 6), jnp.float64),
  )
  dot = jnp.sum(x * y, -1)
  close(
    jnp.sum(lin.feature_map(x, "taylor") * lin.feature_map(y, "taylor"), -1),
    1 + dot + dot**2 / 2,
    1e-12,
  )
  q, k, v, _ = inputs(rng, T=40)
  kw = dict(feature_map="taylor", normalize=True)
  close(
    lin.linear_attention(q, k, v, chunk_size=16, **kw),
    lin.linear_attention(q, k, v, implementation="reference", **kw),
    1e-9,
  )


def test_decay_limits(rng):
  q, k, v, _ = inputs(rng, T=30)
  ones = jnp.zeros((4,), jnp.float64)  # λ = 1
  close(lin.linear_attention(q, k, v, ones), lin.linear_attention(q, k, v), 1e-12)
  fixed = jnp.asarray(lin.lightning_log_decay(4), jnp.float64)
  const = jnp.broadcast_to(fixed, (2, 30, 4))
  close(lin.linear_attention(q, k, v, const), lin.linear_attention(q, k, v, fixed), 1e-12)


def short_conv_oracle(x, w, segment_ids=None, prefix=None):
  """y_t = silu(Σ_i w_i x_(t−i)) by a numpy loop over t and i, in float64."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  if prefix is not None:  # the W − 1 inputs before x
    x = np.concatenate([np.asarray(prefix, np.float64), x], axis=1)
  start = 0 if prefix is None else prefix.shape[1]
  y = np.zeros((x.shape[0], x.shape[1] - start, *x.shape[2:]))
  for b in range(x.shape[0]):
    for t in range(start, x.shape[1]):
      for i in range(w.shape[0]):
        s = t - i
        if s < 0 or (segment_ids is not None and segment_ids[b, s] != segment_ids[b, t]):
          continue
        y[b, t - start] += w[i] * x[b, s]
  return y / (1 + np.exp(-y))


def test_short_conv(rng):
  """The depthwise causal filter equals a loop, stops at document starts, and in pieces with
  the cache (including pieces shorter than W − 1) equals one pass; gradients match the
  loop's; bad input."""
  ks = jax.random.split(rng, 4)
  B, T, N, H, W = 2, 13, 3, 4, 4
  x = normal(ks[0], (B, T, N, H), jnp.float64)
  w = normal(ks[1], (W, N, H), jnp.float64)
  seg = np.array([[0] * 5 + [1] * 8, [3] * 2 + [4] * 10 + [5]])
  close(lin.short_conv(x, w), short_conv_oracle(x, w), 1e-12)
  close(lin.short_conv(x, w, segment_ids=jnp.asarray(seg)), short_conv_oracle(x, w, seg), 1e-12)
  close(lin.short_conv(x, w, activation=None)[:, :1], w[0] * x[:, :1], 1e-12)
  cache, pieces = jnp.zeros((B, W - 1, N, H), x.dtype), []
  for lo, hi in ((0, 5), (5, 6), (6, 8), (8, 13)):
    y, cache = lin.short_conv(x[:, lo:hi], w, cache=cache)
    pieces.append(y)
  close(jnp.concatenate(pieces, axis=1), short_conv_oracle(x, w), 1e-12)
  close(cache, x[:, -(W - 1) :], 0)
  prefix = normal(ks[2], (B, W - 1, N, H), jnp.float64)
  close(lin.short_conv(x, w, cache=prefix)[0], short_conv_oracle(x, w, prefix=prefix), 1e-12)

  def naive(x, w):  # the same sum written with a dense Toeplitz matrix
    idx = jnp.arange(T)[:, None] - jnp.arange(T)[None, :]
    taps = jnp.where((idx >= 0) & (idx < W), w[jnp.clip(idx, 0, W - 1)].transpose(2, 3, 0, 1), 0)
    return jax.nn.silu(jnp.einsum("NHts,BsNH->BtNH", taps, x))

  ct = normal(ks[3], (B, T, N, H), jnp.float64)
  grads = jax.grad(lambda x, w: jnp.sum(lin.short_conv(x, w) * ct), argnums=(0, 1))(x, w)
  want = jax.grad(lambda x, w: jnp.sum(naive(x, w) * ct), argnums=(0, 1))(x, w)
  for a, b in zip(grads, want, strict=True):
    close(a, b, 1e-10)
  with pytest.raises(ValueError, match="weight must be"):
    lin.short_conv(x, w[:, :2])
  with pytest.raises(ValueError, match="cache must be"):
    lin.short_conv(x, w, cache=jnp.zeros((B, W, N, H)))
  with pytest.raises(ValueError, match="not both"):
    lin.short_conv(x, w, cache=prefix, segment_ids=jnp.asarray(seg))
  with pytest.raises(ValueError, match="activation"):
    lin.short_conv(x, w, activation="relu")


def test_short_conv_layer_packs_documents(rng):
  """A delta-rule stack with ``short_conv``: two packed documents == each run alone (the
  filter does not reach across the boundary), and the first token of the second document
  sees no previous token."""
  model = Transformer(
    num_layers=1,
    attention="gated_delta",
    d_model=16,
    num_heads=2,
    positions="none",
    mlp="none",
    options={"linear_chunk": 4, "short_conv": 4},
    rngs=nnx.Rngs(0),
  )
  assert model.blocks[0].attn.conv_k[...].shape == (4, 2, 8)
  x = normal(rng, (1, 12, 16), jnp.float32)
  seg = jnp.asarray([[0] * 6 + [1] * 6])

  @nnx.jit
  def run(model, x):  # one program: the packed row and both documents as a batch of two
    return model(x, segment_ids_BT=seg), model(x.reshape(2, 6, 16))

  packed, alone = run(model, x)
  close(packed.reshape(2, 6, 16), alone, 1e-5)
  with pytest.raises(ValueError, match="short_conv must be"):
    Transformer(
      num_layers=1,
      attention="lightning",
      d_model=16,
      num_heads=2,
      positions="none",
      options={"short_conv": -1},
      rngs=nnx.Rngs(0),
    )


@pytest.mark.parametrize(
  "kind", ["linear_attn", "lightning", "simple_gla", "delta_rule", "gated_delta", "gla", "based"]
)
def test_nnx_layers_train(rng, kind):
  model = Transformer(
    num_layers=2,
    attention=kind,
    d_model=16,
    num_heads=2,
    positions="none",
    mlp="none",
    options={"linear_chunk": 4},
    rngs=nnx.Rngs(0),
  )
  x = normal(rng, (2, 10, 16), jnp.float32)
  forward = nnx.jit(lambda m, xx: m(xx))
  y = forward(model, x)
  assert y.shape == (2, 10, 16) and np.all(np.isfinite(np.asarray(y)))
  # Causal: the first 6 outputs ignore the last 4 inputs.
  x2 = x.at[:, 6:].set(normal(jax.random.fold_in(rng, 1), (2, 4, 16), jnp.float32))
  close(forward(model, x2)[:, :6], y[:, :6], 1e-6)
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(model)
  assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(nnx.state(grads)))


def test_bad_inputs(rng):
  q, k, v, _ = inputs(rng, T=8)
  with pytest.raises(ValueError, match="mode must be one of"):
    lin.linear_attention(q, k, v, mode="parallel")
  with pytest.raises(ValueError, match="implementation must be one of"):
    lin.linear_attention(q, k, v, implementation="flash")
  with pytest.raises(ValueError, match="log_decay must be"):
    lin.linear_attention(q, k, v, jnp.zeros((3,)))
  with pytest.raises(ValueError, match="initial_state must be"):
    lin.linear_attention(q, k, v, initial_state=jnp.zeros((2, 4, 8, 5)))
  with pytest.raises(ValueError, match="feature_map must be one of"):
    lin.linear_attention(q, k, v, feature_map="gelu")
  with pytest.raises(ValueError, match="is a causal recurrence"):
    Transformer(
      num_layers=1,
      attention="lightning",
      d_model=16,
      num_heads=2,
      causal=False,
      positions="none",
      rngs=nnx.Rngs(0),
    )
