"""Cross-head interaction (talking_heads, knocking_heads, dcmha, mta, chai): the fast path
equals a float64 numpy oracle (values) and the float64 reference (gradients), each catalog
check, causality, the memory-lean chunked path, the NNX layer in a stack, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import SegmentMask, registry
from attn_jax.attention import cross_head as ch
from attn_jax.attention import heads as heads_lib
from attn_jax.nn.cross_head import CrossHeadAttention
from attn_jax.nn.transformer import Transformer

D, N = 16, 4
ROPE = {"base": 100.0, "rotary_dim": None}


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def cast(tree, dtype):
  return jax.tree.map(lambda a: a.astype(dtype), tree)


def init(kind, key, **options):
  return registry.init_layer(kind, key, d_model=D, num_heads=N, dtype=jnp.float64, **options)


def perturb(params, key, names, std=0.3):
  """Moves the mixing parameters away from their identity initialisation."""
  out = dict(params)
  for i, name in enumerate(names):
    out[name] = params[name] + std * normal(
      jax.random.fold_in(key, i), params[name].shape, jnp.float64
    )
  return out


# ---------------------------------------------------------------------------------------
# A float64 numpy oracle, written from the equations.
# ---------------------------------------------------------------------------------------


def np_qkv(p, x, src):
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  q = np.einsum("btd,dnh->btnh", x, p["w_q"])
  k = np.einsum("bsd,dkh->bskh", src, p["w_k"])
  v = np.einsum("bsd,dkv->bskv", src, p["w_v"])
  return p, q, k, v


def np_visible(T, S, causal, ids=None):
  ok = np.tril(np.ones((T, S), bool), S - T) if causal else np.ones((T, S), bool)
  ok = np.broadcast_to(ok, (2, T, S))
  if ids is not None:
    ids = np.asarray(ids)
    ok = ok & (ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] != 0)
  return ok[:, None]  # [B, 1, T, S]


def np_softmax(s, ok):
  s = np.where(ok, s, -np.inf)
  m = np.max(s, -1, keepdims=True)
  e = np.where(ok, np.exp(s - np.where(np.isfinite(m), m, 0)), 0)
  return e / np.maximum(e.sum(-1, keepdims=True), 1e-300)


def oracle(kind, params, x, context=None, *, causal, ids=None, **opts):
  x = np.asarray(x, np.float64)
  src = x if context is None else np.asarray(context, np.float64)
  p, q, k, v = np_qkv(params, x, src)
  T, S, H = x.shape[1], src.shape[1], q.shape[-1]
  G = N // k.shape[2]
  if kind == "knocking_heads":
    if "mix_heads_q" in p:
      q = np.einsum("btmh,nm->btnh", q, p["mix_heads_q"])
      k = np.einsum("bsmh,km->bskh", k, p["mix_heads_k"])
      v = np.einsum("bsmv,km->bskv", v, p["mix_heads_v"])
    else:
      q, k, v = q @ p["mix_feat_q"], k @ p["mix_feat_k"], v @ p["mix_feat_v"]
  k, v = np.repeat(k, G, 2), np.repeat(v, G, 2)
  ok = np_visible(T, S, causal, ids)
  s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
  if kind == "talking_heads":
    probs = np_softmax(np.einsum("bmts,nm->bnts", s, p["w_pre"]), ok)
    probs = np.einsum("bmts,nm->bnts", probs, p["w_post"])
  elif kind == "dcmha":

    def compose(a, pre):
      t = {n: p[f"{pre}_{n}"] for n in ch._DCMHA_TERMS}
      out = np.zeros_like(a)
      for i in range(T):
        for j in range(S):
          av = a[:, :, i, j]  # [B, N]
          qw1 = np.einsum("bd,dnr->bnr", x[:, i], t["qw1"])
          qw2 = np.einsum("bd,drn->brn", x[:, i], t["qw2"])
          kw1 = np.einsum("bd,dnr->bnr", src[:, j], t["kw1"])
          kw2 = np.einsum("bd,drn->brn", src[:, j], t["kw2"])
          o = av @ t["w_b"]
          o += np.einsum("br,brm->bm", np.einsum("bn,bnr->br", av, qw1), qw2)
          o += np.einsum("br,brm->bm", np.einsum("bn,bnr->br", av, kw1), kw2)
          o += np.tanh(x[:, i] @ t["qg"]) * av + np.tanh(src[:, j] @ t["kg"]) * av
          out[:, :, i, j] = o
      return out

    probs = compose(np_softmax(compose(s, "pre"), ok), "post")
  elif kind == "mta":
    theta, mix = p["kq_conv"], p["head_mix"]
    Q, W = theta.shape[1:]
    s0 = np.where(ok, s, 0.0)
    conv = np.zeros_like(s)
    for a in range(Q):
      for e in range(W):
        b = e - W // 2  # key offset
        shifted = np.zeros_like(s)
        for i in range(a, T):
          for j in range(S):
            if 0 <= j - b < S:
              shifted[:, :, i, j] = s0[:, :, i - a, j - b]
        conv += theta[None, :, a, e, None, None] * shifted
    U = mix.shape[-1]

    def mixed(a):
      B = a.shape[0]
      return np.einsum("bgwts,guw->bguts", a.reshape(B, N // U, U, T, S), mix).reshape(a.shape)

    if opts.get("mta_head_mix", "post") == "pre":
      probs = np_softmax(mixed(conv), ok)
    else:
      probs = mixed(np_softmax(conv, ok))
  elif kind == "chai":
    own = np_softmax(s, ok)
    reps = ch.check_clusters(opts.get("chai_clusters"), N)
    probs = own[:, list(reps)]  # member n reuses its representative's probabilities
  else:
    probs = np_softmax(s, ok)
  o = np.einsum("bnts,bsnv->btnv", probs, v)
  return np.einsum("btnv,nvd->btd", o, p["w_o"])


# (kind, params maker, call kwargs, cross, packed segments)
CASES = {
  "talking_heads": (
    "talking_heads",
    lambda k: perturb(init("talking_heads", k), k, ["w_pre", "w_post"]),
    dict(causal=True, query_chunk=4),
    False,
    True,
  ),
  "dcmha_cross_gqa": (
    "dcmha",
    lambda k: perturb(
      init("dcmha", k, num_kv_heads=2),
      k,
      [f"{s}_{t}" for s in ("pre", "post") for t in ch._DCMHA_TERMS],
      std=0.2,
    ),
    dict(causal=True, query_chunk=3),
    True,
    False,
  ),
  "mta": (
    "mta",
    lambda k: perturb(init("mta", k, mta_query_taps=3, mta_key_taps=4), k, ["kq_conv", "head_mix"]),
    dict(causal=True, query_chunk=4),
    False,
    True,
  ),
  "mta_pre_bidirectional": (
    "mta",
    lambda k: perturb(init("mta", k, mta_query_taps=2, mta_key_taps=3), k, ["kq_conv", "head_mix"]),
    dict(causal=False, query_chunk=5, mta_head_mix="pre"),
    False,
    False,
  ),
  "knocking_heads_gqa_rope": (
    "knocking_heads",
    lambda k: perturb(init("knocking_heads", k, num_kv_heads=2), k, list(ch._KNOCK["heads"])),
    dict(causal=True),
    False,
    False,
  ),
  "knocking_features_cross": (
    "knocking_heads",
    lambda k: perturb(
      init("knocking_heads", k, knocking_axis="features", v_head_dim=6),
      k,
      list(ch._KNOCK["features"]),
    ),
    dict(causal=False),
    True,
    False,
  ),
  "chai_gqa": (
    "chai",
    lambda k: init("chai", k, num_kv_heads=2),
    dict(causal=True, chai_clusters="0,0,0,3"),
    False,
    True,
  ),
}


@pytest.mark.parametrize("case", CASES)
def test_fast_path_equals_float64_oracle_with_gradients(rng, case):
  kind, make, kwargs, cross, segments = CASES[case]
  kp, kx, kc, kw = jax.random.split(rng, 4)
  params = make(kp)
  B, T = 2, 11
  S = 8 if cross else T
  x = normal(kx, (B, T, D), jnp.float64)
  context = normal(kc, (B, S, D), jnp.float64) if cross else None
  w_out = normal(kw, (B, T, D), jnp.float64)
  ids = jnp.array([[1] * 5 + [2] * 4 + [0] * 2, [1] * 11]) if segments else None
  call = dict(kwargs)
  if ids is not None:
    call["mask"] = SegmentMask(ids, ids)
  opts = {k: call[k] for k in ("chai_clusters", "mta_head_mix") if k in call}
  want_np = oracle(kind, params, x, context, causal=call["causal"], ids=ids, **opts)
  fn = getattr(ch, kind)

  def loss(p, x, c, impl):
    kw = dict(call) if impl == "xla" else {k: v for k, v in call.items() if k != "query_chunk"}
    y = fn(p, x, context_BSD=c, implementation=impl, **kw)
    return jnp.sum(y * w_out.astype(y.dtype)), y

  grad = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True), static_argnums=3)
  (_, want), want_g = grad(params, x, context, "reference")
  close(want, want_np, 1e-10)
  if segments:
    assert np.all(np.asarray(want)[0, -2:] == 0)  # padding rows see nothing: output 0
  c32 = None if context is None else context.astype(jnp.float32)
  (_, got), got_g = grad(cast(params, jnp.float32), x.astype(jnp.float32), c32, "xla")
  assert got.dtype == jnp.float32 and got.shape == (B, T, D)
  close(got, want_np, 3e-5)
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
    assert np.all(np.isfinite(np.asarray(g)))
    close(g, w, 1e-4)


def test_identity_parameters_equal_mha(rng):
  """The catalog checks 'identity mixing / delta kernels / singleton clusters equal MHA' for
  every kind, at the identity initialisation (GQA base with K = 2, RoPE, cross-attention)."""
  kx, kc = jax.random.split(rng)
  x, c = normal(kx, (2, 9, D), jnp.float64), normal(kc, (2, 12, D), jnp.float64)

  @jax.jit
  def differences(all_params):
    out = []
    for kind, params in all_params.items():
      base = {name: params[name] for name in ch._BASE}
      for context, causal in ((None, True), (c, True), (c, False)):
        kw = dict(context_BSD=context, causal=causal, rope=ROPE, implementation="reference")
        got, want = getattr(ch, kind)(params, x, **kw), heads_lib.head_dims(base, x, **kw)
        out.append(jnp.max(jnp.abs(got - want)))
    return jnp.stack(out)

  diffs = differences({kind: init(kind, rng, num_kv_heads=2) for kind in ch.KINDS})
  assert np.all(np.asarray(diffs) < 1e-12), diffs


def test_talking_heads_permutation_post_mixing_swaps_probability_maps(rng):
  """W_pre = I and a permutation W_post: head n reads head π(n)'s probabilities with its own
  values."""
  kp, kx = jax.random.split(rng)
  params = init("talking_heads", kp)
  perm = [2, 0, 3, 1]
  params["w_post"] = jnp.eye(N, dtype=jnp.float64)[jnp.array(perm)]
  x = normal(kx, (2, 10, D), jnp.float64)
  got = ch.talking_heads(params, x, causal=True, implementation="xla", query_chunk=3)
  base = {name: params[name] for name in ch._BASE}
  ok = np_visible(10, 10, True)
  p, q, k, v = np_qkv(base, np.asarray(x), np.asarray(x))
  probs = np_softmax(np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1]), ok)[:, perm]
  want = np.einsum("btnv,nvd->btd", np.einsum("bnts,bsnv->btnv", probs, v), p["w_o"])
  close(got, want, 1e-10)


def test_knocking_heads_fold_into_the_projections(rng):
  kx, kp = jax.random.split(rng)
  x = normal(kx, (2, 9, D), jnp.float64)
  for axis in ch.KNOCKING_AXES:
    params = init("knocking_heads", kp, num_kv_heads=2, knocking_axis=axis)
    params = perturb(params, kp, list(ch._KNOCK[axis]))
    kw = dict(causal=True, rope=ROPE, implementation="xla")
    folded = ch.knocking_fold(params)
    close(ch.knocking_heads(params, x, **kw), heads_lib.gqa(folded, x, **kw), 1e-12)


@pytest.mark.parametrize("kind", ch.MIXED_KINDS)
def test_causal_rows_ignore_later_tokens(rng, kind):
  """Row t is unchanged when tokens after t change, and its gradient is 0 there."""
  kp, kx, kz = jax.random.split(rng, 3)
  names = {"talking_heads": ["w_pre", "w_post"], "mta": ["kq_conv", "head_mix"]}.get(
    kind, [f"pre_{t}" for t in ch._DCMHA_TERMS]
  )
  params = perturb(init(kind, kp), kp, names)
  x = normal(kx, (2, 12, D), jnp.float64)
  t = 5
  x2 = x.at[:, t + 1 :].set(normal(kz, (2, 6, D), jnp.float64))

  def run(x):
    return getattr(ch, kind)(params, x, causal=True, implementation="xla", query_chunk=4)

  close(run(x2)[:, : t + 1], run(x)[:, : t + 1], 1e-12)
  g_x = np.asarray(jax.grad(lambda x: jnp.sum(run(x)[:, t]))(x))
  assert np.all(g_x[:, t + 1 :] == 0) and np.any(g_x[:, : t + 1] != 0)


def test_chunked_path_never_holds_the_full_score_tensor():
  """Forward + backward of talking_heads at T = S = 1024 with 64-row chunks: the compiled
  temporaries stay below one [B, N, T, S] float32 tensor (which the reference holds)."""
  B, T = 1, 1024
  params = registry.init_layer("talking_heads", jax.random.key(0), d_model=D, num_heads=N)
  x = jnp.zeros((B, T, D), jnp.float32)

  def temp_bytes(impl, **kw):
    def loss(p, x):
      return jnp.sum(ch.talking_heads(p, x, causal=True, implementation=impl, **kw))

    compiled = jax.jit(jax.grad(loss, (0, 1))).lower(params, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  full = B * N * T * T * 4
  chunked, reference = temp_bytes("xla", query_chunk=64), temp_bytes("reference")
  assert reference >= full > chunked, (chunked, reference, full)  # measured: 9.0 / 134.6 / 16.8 MB


def test_chai_cluster_heads_recovers_planted_clusters(rng):
  """Heads built as noisy copies of two base maps cluster back onto them."""
  base = jax.nn.softmax(normal(rng, (2, 2, 8, 8), jnp.float64) * 3, -1)
  noise = 0.02 * normal(jax.random.fold_in(rng, 1), (2, 5, 8, 8), jnp.float64)
  probs = base[:, jnp.array([0, 1, 0, 1, 0])] + noise
  reps = ch.chai_cluster_heads(probs, 2)
  assert reps[0] == reps[2] == reps[4] and reps[1] == reps[3] and reps[0] != reps[1]
  assert all(reps[r] == r for r in reps)
  assert ch.chai_cluster_heads(probs, 5) == (0, 1, 2, 3, 4)


def test_bfloat16_within_written_tolerance(rng):
  kp, kx = jax.random.split(rng)
  params = perturb(init("dcmha", kp), kp, ["pre_w_b", "post_qg"])
  x = normal(kx, (2, 9, D), jnp.float64)
  run = jax.jit(ch.dcmha, static_argnames=("causal", "implementation"))
  want = run(params, x, causal=True, implementation="reference")
  got = run(cast(params, jnp.bfloat16), x.astype(jnp.bfloat16), causal=True)
  assert got.dtype == jnp.bfloat16
  close(got, want, 6e-2)  # bf16 inputs and projections; the mixing runs in float32


def test_bad_input_messages(rng):
  x = normal(rng, (2, 5, D), jnp.float32)
  th = registry.init_layer("talking_heads", rng, d_model=D, num_heads=N)
  with pytest.raises(NotImplementedError, match="implementation must be one of"):
    ch.talking_heads(th, x, causal=True, implementation="pallas_tpu")
  with pytest.raises(ValueError, match=r"params\['w_pre'\] must have shape \(4, 4\)"):
    ch.talking_heads(dict(th, w_pre=th["w_pre"][:3]), x, causal=True)
  with pytest.raises(ValueError, match="must hold"):
    ch.dcmha(th, x, causal=True)
  with pytest.raises(ValueError, match="model dim D=16"):
    ch.talking_heads(th, x[..., :8], causal=True)
  mta = registry.init_layer("mta", rng, d_model=D, num_heads=N)
  with pytest.raises(ValueError, match="mta_head_mix must be one of"):
    ch.mta(mta, x, causal=True, mta_head_mix="middle")
  with pytest.raises(ValueError, match="head_mix"):
    ch.mta(dict(mta, head_mix=mta["head_mix"][:1]), x, causal=True)
  kn = registry.init_layer("knocking_heads", rng, d_model=D, num_heads=N)
  with pytest.raises(ValueError, match="exactly one of the sets"):
    feats = {name: jnp.eye(4) for name in ch._KNOCK["features"]}
    ch.knocking_heads({**kn, **feats}, x, causal=True)
  with pytest.raises(ValueError, match="knocking_axis must be one of"):
    registry.init_layer("knocking_heads", rng, d_model=D, num_heads=N, knocking_axis="rows")
  chai = registry.init_layer("chai", rng, d_model=D, num_heads=N)
  with pytest.raises(ValueError, match="must represent themselves"):
    ch.chai(chai, x, causal=True, chai_clusters="1,2,2,3")
  with pytest.raises(ValueError, match="comma-separated ints"):
    ch.chai(chai, x, causal=True, chai_clusters="a,b")
  with pytest.raises(ValueError, match="unknown mta options"):
    registry.init_layer("mta", rng, d_model=D, num_heads=N, dcmha_rank=2)
  with pytest.raises(ValueError, match="unknown attention options"):
    CrossHeadAttention(d_model=D, num_heads=N, options={"nope": 1}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="must represent themselves"):
    CrossHeadAttention(
      d_model=D, num_heads=N, kind="chai", options={"chai_clusters": "1,2,2,2"}, rngs=nnx.Rngs(0)
    )


def test_nnx_layers_in_a_transformer_forward_and_grad(rng):
  model = Transformer(
    num_layers=5,
    attention=list(ch.KINDS),
    d_model=D,
    num_heads=N,
    num_kv_heads=2,
    mlp="none",
    causal=True,
    positions="rope",
    options={**CrossHeadAttention.DEFAULT_OPTIONS, "chai_clusters": "0,0,2,2", "query_chunk": 4},
    rngs=nnx.Rngs(0),
  )
  for block, kind in zip(model.blocks, ch.KINDS, strict=True):
    assert isinstance(block.attn, CrossHeadAttention) and block.attn.kind == kind
  x = normal(rng, (2, 7, D), jnp.float32)
  ids = jnp.array([[1] * 4 + [2] * 3, [1] * 7])

  @nnx.jit
  def run(model, x):
    return nnx.value_and_grad(lambda m: jnp.sum(m(x, segment_ids_BT=ids) ** 2))(model)

  loss, grads = run(model, x)
  assert np.isfinite(float(loss))
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves) and any(np.any(g != 0) for g in leaves)


def test_dcmha_unrolled_compose_equals_einsum_compose(rng, monkeypatch):
  """Compose for N <= _UNROLL_HEADS (per-head sums) and beyond it (einsums): same values and
  gradients (eager, so neither path is served from the other's trace cache)."""
  kp, kx = jax.random.split(rng)
  terms = [f"{s}_{t}" for s in ("pre", "post") for t in ch._DCMHA_TERMS]
  params = perturb(init("dcmha", kp, num_kv_heads=2), kp, terms, std=0.2)
  x = normal(kx, (2, 7, D), jnp.float64)

  def run(unroll):
    monkeypatch.setattr(ch, "_UNROLL_HEADS", unroll)

    def loss(p, x):
      return jnp.sum(jnp.sin(ch.dcmha(p, x, causal=True, query_chunk=3)))

    return jax.value_and_grad(loss, (0, 1))(params, x)

  (unrolled, g_unrolled), (einsum, g_einsum) = run(N), run(0)
  close(unrolled, einsum, 1e-12)
  for a, b in zip(jax.tree.leaves(g_unrolled), jax.tree.leaves(g_einsum), strict=True):
    close(a, b, 1e-12)
