"""Head structure and KV sharing (mqa, gqa, kdgqa, head_dims, mhe, dha, sigma_diffqkv): the fast
path equals the float64 oracle (values and gradients), causality, each catalog check, decoding
with a cache, the MHA conversions, the NNX layer in a stack, and bad input."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import SegmentMask, registry
from attn_jax.attention import heads as heads_lib
from attn_jax.models.decoder_lm import DecoderLM
from attn_jax.nn.heads import HeadStructureAttention
from attn_jax.nn.transformer import Transformer

D, N = 24, 4
ROPE = {"base": 100.0, "rotary_dim": None}


def init(kind, key, dtype=jnp.float64, **options):
  return registry.init_layer(kind, key, d_model=D, num_heads=N, dtype=dtype, **options)


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def cast(tree, dtype):
  return jax.tree.map(lambda a: a.astype(dtype), tree)


_STATIC = ("causal", "implementation", "mhe_variant", "return_aux")
_JITTED = {
  kind: jax.jit(fn, static_argnames=[a for a in _STATIC if a in inspect.signature(fn).parameters])
  for kind, fn in ((kind, getattr(heads_lib, kind)) for kind in heads_lib.KINDS)
}


def layer(kind, params, x, context=None, **kwargs):
  """The layer under jit, compiled once per kind, static options and shapes (suite time)."""
  return _JITTED[kind](params, x, context_BSD=context, **kwargs)


def mha_equations(q_BTNH, k_BSNH, v_BSNV, w_o, *, causal, visible=None):
  """Per-head softmax attention written out in float64 numpy, then the output projection."""
  q, k, v = (np.asarray(a, np.float64) for a in (q_BTNH, k_BSNH, v_BSNV))
  T, S = q.shape[1], k.shape[1]
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  ok = np.tril(np.ones((T, S), bool), S - T) if causal else np.ones((T, S), bool)
  ok = ok if visible is None else ok & visible[:, None]
  logits = np.where(ok, logits, -np.inf)
  m = np.max(logits, -1, keepdims=True)
  p = np.where(ok, np.exp(logits - np.where(np.isfinite(m), m, 0)), 0)
  p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
  return np.einsum("bnts,bsnv,nvd->btd", p, v, np.asarray(w_o, np.float64))


def project_mha(params, x, src):
  """q/k/v of MHA-shaped params (as many kv heads as heads) written out."""
  q = np.einsum("btd,dnh->btnh", x, params["w_q"])
  k = np.einsum("bsd,dnh->bsnh", src, params["w_k"])
  v = np.einsum("bsd,dnh->bsnh", src, params["w_v"])
  return q, k, v


# ---------------------------------------------------------------------------------------
# Fast path vs oracle, causality.
# ---------------------------------------------------------------------------------------


def _dha_fusion_params(key):
  kp, ko = jax.random.split(key)
  mha = init("head_dims", kp)
  fused = heads_lib.dha_from_mha(mha, num_key_heads=2, num_value_heads=1)
  fused["omega_k"] = fused["omega_k"] + 0.3 * normal(ko, fused["omega_k"].shape, jnp.float64)
  return fused


# (name, params maker, call kwargs, cross): awkward sizes, masks, rope, both DHA forms.
CASES = {
  "kdgqa": ("kdgqa", lambda k: init("kdgqa", k, num_kv_heads=2), dict(causal=False), False),
  "head_dims_gqa_rope": (  # two kv groups, H != Hv, cross-attention S != T, RoPE
    "head_dims",
    lambda k: init("head_dims", k, num_kv_heads=2, head_dim=6, v_head_dim=3),
    dict(causal=True, rope=ROPE),
    True,
  ),
  "mhe_add_segments": ("mhe", lambda k: init("mhe", k), dict(causal=True), False),
  "mhe_mul_rope": (
    "mhe",
    lambda k: init("mhe", k, mhe_variant="multiplicative"),
    dict(causal=False, rope=ROPE, mhe_variant="multiplicative"),
    True,
  ),
  "dha_fusion": ("dha", _dha_fusion_params, dict(causal=True), False),
  "sigma_aug": (
    "sigma_diffqkv",
    lambda k: init("sigma_diffqkv", k, sigma_key_heads=1, sigma_q_aug_dim=10, v_head_dim=7),
    dict(causal=True, rope={"base": 50.0, "rotary_dim": 2}),
    False,
  ),
}


@pytest.mark.parametrize("case", CASES)
def test_xla_float32_equals_float64_oracle_with_gradients(rng, case):
  kind, make, kwargs, cross = CASES[case]
  kp, kx, kc, kw = jax.random.split(rng, 4)
  params = make(kp)
  B, T, S = 2, 11, 7 if cross else 11
  x = normal(kx, (B, T, D), jnp.float64)
  context = normal(kc, (B, S, D), jnp.float64) if cross else None
  w_out = normal(kw, (B, T, D), jnp.float64)
  if case.endswith("segments"):  # with padding (id 0): rows that see nothing give zeros
    ids = jnp.array([[1] * 5 + [2] * 4 + [0] * 2, [1] * 11])
    kwargs = dict(kwargs, mask=SegmentMask(ids, ids))
  fn = getattr(heads_lib, kind)

  def loss(p, x, c, impl):
    y = fn(p, x, context_BSD=c, implementation=impl, **kwargs)
    return jnp.sum(y * w_out.astype(y.dtype)), y

  grad = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True), static_argnums=3)
  (_, want), want_g = grad(params, x, context, "reference")
  p32, x32 = cast(params, jnp.float32), x.astype(jnp.float32)
  c32 = None if context is None else context.astype(jnp.float32)
  (_, got), got_g = grad(p32, x32, c32, "xla")
  assert got.dtype == jnp.float32 and got.shape == (B, T, D)
  close(got, want, 2e-5)
  if case.endswith("segments"):
    assert np.all(np.asarray(want)[0, -2:] == 0)  # padding rows: zero attention output
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
    close(g, w, 5e-5)


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][2]["causal"] and not CASES[c][3]])
def test_causal_through_gradients(rng, case):
  kind, make, kwargs, _ = CASES[case]
  kp, kx = jax.random.split(rng)
  params, x = make(kp), normal(kx, (2, 11, D), jnp.float64)
  fn = getattr(heads_lib, kind)
  t = 4
  g = jax.jit(
    jax.grad(lambda x: jnp.sum(fn(params, x, implementation="reference", **kwargs)[:, t]))
  )
  g_x = np.asarray(g(x))
  assert np.all(g_x[:, t + 1 :] == 0) and np.any(g_x[:, : t + 1] != 0)


DECODE_CASES = {
  "mqa": {},
  "head_dims": dict(num_kv_heads=2, head_dim=6, v_head_dim=4),  # a GQA: also run as "gqa"
  "dha": dict(dha_value_heads=2),
  "sigma_diffqkv": dict(sigma_q_aug_dim=6),
}


@pytest.mark.parametrize("kind", DECODE_CASES)
def test_decode_step_equals_last_row_of_full(rng, kind):
  """Prefill 8 tokens, decode 2 at once, then 1: equal to the causal layer over all 11."""
  kp, kx = jax.random.split(rng)
  params = init(kind, kp, **DECODE_CASES[kind])
  x = normal(kx, (2, 11, D), jnp.float64)

  @jax.jit
  def full_and_decoded(params, x):
    full = getattr(heads_lib, kind)(params, x, causal=True, rope=ROPE, implementation="reference")
    if kind in ("mqa", "head_dims"):  # the same layer as gqa (K = 1, K = 2)
      gqa = heads_lib.gqa(params, x, causal=True, rope=ROPE, implementation="reference")
      full = jnp.where(jnp.all(gqa == full), full, jnp.nan)
    cache = heads_lib.static_kv_cache(params, x[:, :8], rope=ROPE)
    y_2, cache = heads_lib.static_decode(params, x[:, 8:10], cache, rope=ROPE)
    y_1, cache = heads_lib.static_decode(params, x[:, 10:], cache, rope=ROPE)
    return full, y_2, y_1, cache

  full, y_2, y_1, cache = full_and_decoded(params, x)
  close(y_2, full[:, 8:10], 1e-12)
  close(y_1, full[:, 10:], 1e-12)
  assert cache[0].shape[1] == 11 and cache[0].shape[2] == params["w_k"].shape[1]


# ---------------------------------------------------------------------------------------
# mqa / gqa.
# ---------------------------------------------------------------------------------------


def test_gqa_special_cases(rng):
  """K = N equals per-head MHA; K = 1 equals mqa; mqa equals MHA with copied kv heads."""
  kp, kx = jax.random.split(rng)
  x = normal(kx, (2, 9, D), jnp.float64)
  mha = init("gqa", kp, num_kv_heads=N)
  want = mha_equations(*project_mha(mha, x, x), mha["w_o"], causal=True)
  close(layer("gqa", mha, x, causal=True, implementation="xla"), want, 1e-12)
  one = init("gqa", kp, num_kv_heads=1)
  got_mqa = layer("mqa", one, x, causal=True, implementation="xla")
  close(layer("gqa", one, x, causal=True, implementation="xla"), got_mqa, 1e-14)
  copies = dict(one, w_k=jnp.tile(one["w_k"], (1, N, 1)), w_v=jnp.tile(one["w_v"], (1, N, 1)))
  close(got_mqa, mha_equations(*project_mha(copies, x, x), one["w_o"], causal=True), 1e-12)


def test_gqa_from_mha_is_exact_for_identical_heads_in_each_group(rng):
  kp, kx = jax.random.split(rng)
  x = normal(kx, (2, 9, D), jnp.float64)
  grouped = init("gqa", kp, num_kv_heads=2)
  # An MHA whose heads are identical within each group of G = 2.
  mha = dict(grouped, w_k=jnp.repeat(grouped["w_k"], 2, 1), w_v=jnp.repeat(grouped["w_v"], 2, 1))
  want = layer("gqa", mha, x, causal=True, implementation="xla")
  converted = heads_lib.gqa_from_mha(mha, num_kv_heads=2)
  assert converted["w_k"].shape == (D, 2, D // N)
  close(converted["w_k"], grouped["w_k"], 1e-15)
  close(layer("gqa", converted, x, causal=True, implementation="xla"), want, 1e-12)
  # Distinct heads: the conversion is an approximation (the outputs differ).
  mha = init("gqa", kp, num_kv_heads=N)
  approx = layer("gqa", heads_lib.gqa_from_mha(mha, 2), x, causal=True, implementation="xla")
  assert np.max(np.abs(approx - layer("gqa", mha, x, causal=True))) > 1e-3


def test_gqa_from_mha_on_a_small_trained_model():
  """Train a 1-layer, 4-head MHA LM for 30 steps on a periodic-copy task, convert it to GQA
  with 2 kv groups by mean-pooling, and check that the converted model runs and keeps part
  of what it learned: its loss is finite and below 0.7x the untrained loss, and after 3
  uptraining steps (10% of the training) it is below half the loss of the same GQA model
  trained from scratch for 3 steps (measured: ~0.56x and ~0.2x)."""
  V, T, P = 8, 16, 4
  tokens = jax.random.randint(jax.random.key(0), (32, P), 0, V)
  tokens = jnp.tile(tokens, (1, T // P))  # x_{t+4} = x_t: attention must look back 4

  def make(num_kv_heads):
    return DecoderLM(
      vocab_size=V, d_model=32, num_layers=1, num_heads=4, num_kv_heads=num_kv_heads,
      attention="gqa", positions="learned", max_len=T, mlp="none", rngs=nnx.Rngs(0),
      implementation="reference",
    )  # fmt: skip

  def loss_fn(model, tokens):
    logits = model(tokens[:, :-1])[:, P - 1 :]
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, P:]).mean()

  def make_run(graphdef, steps):
    def body(_, state):
      model, opt = nnx.merge(graphdef, state)
      opt.update(model, nnx.grad(loss_fn)(model, tokens))
      return nnx.state((model, opt))

    def run(state):
      end = jax.lax.fori_loop(0, steps, body, state)
      return [loss_fn(nnx.merge(graphdef, s)[0], tokens) for s in (state, end)], end

    return jax.jit(run)

  runs = {}  # one compile per (kv heads, steps): the scratch model reuses the converted's

  def train(model, steps):
    """(loss before, loss after) ``steps`` Adam steps, as one jitted fori_loop."""
    graphdef, state = nnx.split((model, nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)))
    key = (model.stack.blocks[0].attn.w_k.shape, steps)
    losses, state = runs.setdefault(key, make_run(graphdef, steps))(state)
    nnx.update(model, nnx.state(nnx.merge(graphdef, state)[0]))
    return losses

  mha = make(4)
  untrained, trained = train(mha, 30)
  assert trained < 0.1 * untrained  # the MHA learned the task
  pure = nnx.to_pure_dict(nnx.state(mha, nnx.Param))
  pure["stack"]["blocks"][0]["attn"] = heads_lib.gqa_from_mha(pure["stack"]["blocks"][0]["attn"], 2)
  converted = make(2)
  state = nnx.state(converted, nnx.Param)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(converted, state)
  converted_0, converted_3 = train(converted, 3)
  _, scratch_3 = train(make(2), 3)
  assert np.isfinite(float(converted_0)) and converted_0 < 0.7 * untrained
  assert converted_3 < 0.5 * scratch_3, (converted_3, scratch_3)


# ---------------------------------------------------------------------------------------
# kdgqa.
# ---------------------------------------------------------------------------------------


def test_kdgqa_counts_are_at_least_one_and_sum_to_n(rng):
  @jax.jit(static_argnums=1)
  def counts_and_assignment(norms, n):
    counts = heads_lib.kdgqa_group_counts(norms, n)
    return counts, heads_lib.kdgqa_assignment(counts, n)

  for N_, K in ((8, 4), (7, 1)):
    norms = jnp.exp(3 * jax.random.normal(jax.random.fold_in(rng, N_ * K), (64, K)))
    norms = norms.at[0].set(jnp.ones(K)).at[1, 0].set(1e6)  # equal; one dominant
    counts, assign = (np.asarray(a) for a in counts_and_assignment(norms, N_))
    assert counts.min() >= 1 and np.all(counts.sum(-1) == N_)
    assert np.all(counts[0] == N_ // K)
    assert np.all(np.diff(assign, axis=-1) >= 0)
    for g in range(K):
      assert np.all((assign == g).sum(-1) == counts[:, g])
    # Larger norms never get fewer heads (up to one from rounding).
    order = np.argsort(np.asarray(norms), axis=-1)
    sorted_counts = np.take_along_axis(counts, order, -1)
    assert np.all(np.diff(sorted_counts, axis=-1) >= -1)


def test_kdgqa_equal_key_norms_reproduce_gqa_grouping(rng):
  kp, kx = jax.random.split(rng)
  x = normal(kx, (2, 9, D), jnp.float64)
  params = init("kdgqa", kp, num_kv_heads=2)
  # Key head 1 = −(key head 0): equal norms at every token, different logits.
  params["w_k"] = jnp.stack([params["w_k"][:, 0], -params["w_k"][:, 0]], axis=1)
  want = layer("gqa", params, x, causal=False, implementation="xla")
  close(layer("kdgqa", params, x, causal=False, implementation="xla"), want, 1e-12)
  # Unequal norms move heads: a large key head 1 takes 3 of the 4 query heads.
  params["w_k"] = params["w_k"].at[:, 1].multiply(10.0)
  moved = layer("kdgqa", params, x, causal=False, implementation="xla")
  assert np.max(np.abs(moved - layer("gqa", params, x, causal=False))) > 1e-3


# ---------------------------------------------------------------------------------------
# head_dims.
# ---------------------------------------------------------------------------------------


def _logits(params, x):
  q, k, _ = heads_lib.per_head_qkv("head_dims", params, x)
  return np.einsum("btnh,bsnh->bnts", q, k)


def test_head_dims_logit_rank_is_at_most_h(rng):
  kp, kx = jax.random.split(rng)
  x = normal(kx, (1, 12, D), jnp.float64)  # rank 12 inputs
  low = _logits(init("head_dims", kp, head_dim=3), x)[0]
  assert all(np.linalg.matrix_rank(low[n], tol=1e-9) <= 3 for n in range(N))
  full = _logits(init("head_dims", kp, head_dim=12), x)[0]
  assert all(np.linalg.matrix_rank(full[n], tol=1e-9) == 12 for n in range(N))


def test_head_dims_single_full_rank_head_fits_any_logit_pattern(rng):
  """X M Xᵀ = L for any target L when X [T, D] has rank T: M = X⁺ L X⁺ᵀ; factor M = W_Q W_Kᵀ
  with H = T (rank M ≤ T) and check the layer's logits and output."""
  kx, kl, kp = jax.random.split(rng, 3)
  T, H = 6, 6
  x = np.asarray(normal(kx, (1, T, D), jnp.float64))
  target = 3 * np.asarray(normal(kl, (T, T), jnp.float64))
  x_pinv = np.linalg.pinv(x[0])
  u, s, vt = np.linalg.svd(x_pinv @ target @ x_pinv.T)
  params = registry.init_layer(
    "head_dims", kp, d_model=D, num_heads=1, head_dim=H, dtype=jnp.float64
  )
  params["w_q"] = jnp.asarray((u[:, :H] * s[:H])[:, None, :])
  params["w_k"] = jnp.asarray(vt[:H].T[:, None, :])
  close(_logits(params, x)[0, 0], target, 1e-10)
  got = layer("head_dims", params, jnp.asarray(x), causal=False, implementation="xla")
  v = np.einsum("td,dh->th", x[0], params["w_v"][:, 0])
  p = jax.nn.softmax(target / np.sqrt(H), axis=-1)
  close(got[0], p @ v @ params["w_o"][0], 1e-12)
  # With H < T the same target cannot be fitted: the best rank-H logits miss it.
  sv = np.linalg.svd(target, compute_uv=False)
  assert sv[H - 2] > 1e-3  # i.e. a rank-(H - 2) head would leave a residual


# ---------------------------------------------------------------------------------------
# mhe.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", heads_lib.MHE_VARIANTS)
def test_mhe_folded_form_equals_written_out_heads(rng, variant):
  kp, kx = jax.random.split(rng)
  params = init("mhe", kp, mhe_variant=variant)
  x = normal(kx, (2, 9, D), jnp.float64)
  q, k, v = heads_lib.per_head_qkv("mhe", params, x, mhe_variant=variant)
  want = mha_equations(q, k, v, params["w_o"], causal=True)
  got = layer("mhe", params, x, causal=True, mhe_variant=variant, implementation="xla")
  close(got, want, 1e-12)


@pytest.mark.parametrize("variant, neutral", [("additive", 0.0), ("multiplicative", 1.0)])
def test_mhe_neutral_embeddings_repeat_single_head_attention(rng, variant, neutral):
  kp, kx = jax.random.split(rng)
  params = init("mhe", kp, mhe_variant=variant)
  for name in ("e_q", "e_k", "e_v"):
    params[name] = jnp.full_like(params[name], neutral)
  x = normal(kx, (2, 9, D), jnp.float64)
  q, k, v = (np.asarray(x @ params[w]) for w in ("w_q", "w_k", "w_v"))
  single = mha_equations(q[:, :, None], k[:, :, None], v[:, :, None], np.eye(D // N)[None],
                         causal=True)  # fmt: skip
  want = single @ np.asarray(params["w_o"]).sum(0)  # N identical heads through W_O
  got = layer("mhe", params, x, causal=True, mhe_variant=variant, implementation="xla")
  close(got, want, 1e-12)
  _, _, heads = jax.jit(lambda p, x: heads_lib.per_head_qkv("mhe", p, x, mhe_variant=variant))(
    params, x
  )
  assert np.all(heads == heads[:, :, :1])


def test_mhe_parameter_count_formula():
  """Shared single-head Q/K/V (3·D·H) + output (N·H·D) + embeddings 3·N·H (the abstract)."""
  for D_, N_ in ((24, 4), (768, 12), (64, 8)):
    H = D_ // N_
    params = jax.eval_shape(lambda: heads_lib.init_mhe(jax.random.key(0), d_model=D_, num_heads=N_))
    count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    single_head = 3 * D_ * H + N_ * H * D_
    assert count - single_head == 3 * N_ * H
    mha = jax.eval_shape(
      lambda: heads_lib.init_head_dims(jax.random.key(0), d_model=D_, num_heads=N_)
    )
    assert count < sum(int(np.prod(a.shape)) for a in jax.tree.leaves(mha))


# ---------------------------------------------------------------------------------------
# dha.
# ---------------------------------------------------------------------------------------


def test_dha_identity_fusion_equals_mha_and_fused_rows_collapse(rng):
  kp, kx = jax.random.split(rng)
  x = normal(kx, (2, 9, D), jnp.float64)
  mha = init("head_dims", kp)
  want = mha_equations(*project_mha(mha, x, x), mha["w_o"], causal=True)
  fusion = heads_lib.dha_from_mha(mha, num_key_heads=1, num_value_heads=2)
  got, aux = jax.jit(
    lambda p, x: heads_lib.dha(p, x, causal=True, implementation="xla", return_aux=True)
  )(fusion, x)
  close(got, want, 1e-12)
  assert float(aux["dha_fusion"]) > 0  # identity rows differ within each group
  # Rows equal within every group (uniform 1/M: mean-pooling): collapsing is exact.
  for name in ("omega_k", "omega_v"):
    fusion[name] = jnp.full_like(fusion[name], 1.0 / fusion[name].shape[1])
  fused, aux = jax.jit(
    lambda p, x: heads_lib.dha(p, x, causal=True, implementation="xla", return_aux=True)
  )(fusion, x)
  assert float(aux["dha_fusion"]) == 0
  deployed = heads_lib.dha_collapse(fusion)
  assert deployed["w_k"].shape[1] == 1 and deployed["w_v"].shape[1] == 2
  close(layer("dha", deployed, x, causal=True, implementation="xla"), fused, 1e-12)
  close(deployed["w_v"], heads_lib.gqa_from_mha(mha, 2)["w_v"], 1e-15)


def test_dha_identical_key_and_value_maps_equal_gqa(rng):
  kp, kx = jax.random.split(rng)
  x = normal(kx, (2, 9, D), jnp.float64)
  params = init("dha", kp, num_kv_heads=2, dha_value_heads=2)
  want = layer("gqa", params, x, causal=True, implementation="xla")
  close(layer("dha", params, x, causal=True, implementation="xla"), want, 1e-14)
  # Different maps: each query head reads key head n // 4 and value head n // 2.
  params = init("dha", kp, num_kv_heads=1, dha_value_heads=2)
  q, k, v = heads_lib.per_head_qkv("dha", params, x)
  close(k, jnp.repeat(k[:, :, :1], N, 2), 0)
  want = mha_equations(q, k, v, params["w_o"], causal=True)
  close(layer("dha", params, x, causal=True, implementation="xla"), want, 1e-12)


# ---------------------------------------------------------------------------------------
# sigma_diffqkv.
# ---------------------------------------------------------------------------------------


def test_sigma_equal_heads_and_dims_reduce_to_mha(rng):
  kp, kx = jax.random.split(rng)
  x = normal(kx, (2, 9, D), jnp.float64)
  params = init("sigma_diffqkv", kp, num_kv_heads=N, sigma_key_heads=N, sigma_key_head_dim=D // N)
  assert {k: v.shape for k, v in params.items()} == {
    k: v.shape for k, v in init("head_dims", kp).items()
  }
  want = mha_equations(*project_mha(params, x, x), params["w_o"], causal=True)
  close(layer("sigma_diffqkv", params, x, causal=True, implementation="xla"), want, 1e-12)


def test_sigma_augmented_queries_fold_into_w_q(rng):
  kp, kx = jax.random.split(rng)
  x = normal(kx, (2, 9, D), jnp.float64)
  params = init("sigma_diffqkv", kp, sigma_key_heads=1, sigma_q_aug_dim=16)
  assert params["w_k"].shape == (D, 1, 2) and params["w_v"].shape == (D, N, 6)
  got = layer("sigma_diffqkv", params, x, causal=True, implementation="xla")
  folded = {k: v for k, v in params.items() if k != "w_qa"}
  folded["w_q"] = jnp.einsum("dna,nah->dnh", params["w_q"], params["w_qa"])
  close(layer("sigma_diffqkv", folded, x, causal=True, implementation="xla"), got, 1e-12)


# ---------------------------------------------------------------------------------------
# bfloat16, bad input, the NNX layer.
# ---------------------------------------------------------------------------------------


def test_bfloat16_within_written_tolerance(rng):
  kp, kx = jax.random.split(rng)
  x = normal(kx, (2, 11, D), jnp.float64)
  params = init("sigma_diffqkv", kp, sigma_q_aug_dim=8)
  want = layer("sigma_diffqkv", params, x, causal=True, implementation="reference")
  got = layer("sigma_diffqkv", cast(params, jnp.bfloat16), x.astype(jnp.bfloat16), causal=True)
  assert got.dtype == jnp.bfloat16
  close(got, want, 6e-2)  # bf16: 8 mantissa bits, a handful of roundings per element


def test_bad_input_messages(rng):
  x = normal(rng, (2, 5, D), jnp.float32)
  gqa = init("gqa", rng, dtype=jnp.float32)
  with pytest.raises(ValueError, match="mqa params must have one kv head; got Kk=2"):
    heads_lib.mqa(gqa, x, causal=True)
  with pytest.raises(ValueError, match=r"x_BTD must have model dim D=24 \(params\)"):
    heads_lib.gqa(gqa, x[..., :8], causal=True)
  with pytest.raises(ValueError, match="kdgqa needs causal=False"):
    heads_lib.kdgqa(gqa, x, causal=True)
  with pytest.raises(ValueError, match=r"params\['w_o'\] must have shape \(4, 6, 24\)"):
    heads_lib.head_dims(dict(gqa, w_o=gqa["w_o"][:, :3]), x, causal=True)
  with pytest.raises(ValueError, match="mhe_variant must be one of"):
    heads_lib.mhe(init("mhe", rng, dtype=jnp.float32), x, causal=True, mhe_variant="concat")
  with pytest.raises(ValueError, match="DHA fusion weights"):
    heads_lib.dha(dict(gqa, omega_k=jnp.ones((3, 2))), x, causal=True)
  with pytest.raises(ValueError, match="params of 'sigma_diffqkv' must hold"):
    heads_lib.sigma_diffqkv(dict(gqa, omega_k=1), x, causal=True)
  with pytest.raises(ValueError, match="causal must be a bool"):
    heads_lib.gqa(gqa, x, causal=None)
  with pytest.raises(ValueError, match="unknown gqa options"):
    heads_lib.init_gqa(rng, d_model=D, num_heads=N, mhe_variant="additive")
  with pytest.raises(ValueError, match="key heads must divide num_heads=4; got 3"):
    heads_lib.init_gqa(rng, d_model=D, num_heads=N, num_kv_heads=3)
  with pytest.raises(ValueError, match="num_kv_heads must divide num_heads=4; got 3"):
    heads_lib.gqa_from_mha(init("head_dims", rng), 3)
  with pytest.raises(ValueError, match="params must be an MHA"):
    heads_lib.dha_from_mha(gqa, 1, 1)
  with pytest.raises(ValueError, match=r"cache must be \(k \[B, S, 2, 6\]"):
    heads_lib.static_decode(gqa, x[:, :1], (jnp.zeros((2, 3, 1, 6)),) * 2)
  with pytest.raises(ValueError, match="bidirectional only"):
    HeadStructureAttention(d_model=D, num_heads=N, kind="kdgqa", causal=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="does not take qk_norm=True"):
    HeadStructureAttention(d_model=D, num_heads=N, kind="gqa", qk_norm=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown attention options"):
    HeadStructureAttention(d_model=D, num_heads=N, options={"nope": 1}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="does not support the 'self_causal' pattern"):
    registry.run_layer("kdgqa", gqa, x, causal=True)


# Two stacks in the default run; the other two (same code path, other kinds) under -m slow.
STACKS = [
  ("mqa", "gqa"),
  ("dha", "sigma_diffqkv"),
  pytest.param(("head_dims", "mhe"), marks=pytest.mark.slow),
  pytest.param(("kdgqa", "kdgqa"), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("kinds", STACKS, ids="+".join)
def test_nnx_layer_in_transformer_forward_and_grad(rng, kinds):
  causal = "kdgqa" not in kinds
  model = Transformer(
    num_layers=2,
    attention=list(kinds),
    d_model=D,
    num_heads=N,
    num_kv_heads=2,
    mlp="none",
    causal=causal,
    positions="rope" if "gqa" in kinds or "mhe" in kinds else "none",
    options={**HeadStructureAttention.DEFAULT_OPTIONS, "sigma_q_aug_dim": 8},
    implementation="reference",
    rngs=nnx.Rngs(0),
  )
  x = normal(rng, (2, 7, D), jnp.float32)
  ids = jnp.array([[1] * 4 + [2] * 3, [1] * 7])

  @nnx.jit
  def run(model, x):
    loss, grads = nnx.value_and_grad(lambda m: jnp.sum(m(x, segment_ids_BT=ids) ** 2))(model)
    out = []
    for block in model.blocks:  # capture: the reference path on the per-head q/k/v
      captured, inter = nnx.capture(block.attn, nnx.Intermediate)(
        x, segment_ids_BT=ids, capture=True
      )
      out.append((captured, inter["probs"][0], block.attn(x, segment_ids_BT=ids)))
    return loss, grads, out

  loss, grads, out = run(model, x)
  assert np.isfinite(float(loss))
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  for block, kind, (captured, probs, y) in zip(model.blocks, kinds, out, strict=True):
    assert isinstance(block.attn, HeadStructureAttention) and block.attn.kind == kind
    close(captured, y, 2e-5)
    assert probs.shape == (2, N, 7, 7)
    if causal:
      assert np.all(np.asarray(probs)[:, :, 0, 1:] == 0)
