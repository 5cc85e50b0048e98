"""Multi-head latent attention (mla) and its absorbed form (mla_absorbed): the fast path
equals the oracle, the paper's equations, MHA as a special case, absorbed equals expanded,
decoding equals the full computation, and absorbed decode's arithmetic intensity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import CausalMask, SegmentMask, attention_reference, registry
from attn_jax.attention import mla as mla_lib
from attn_jax.attention.rope import apply_rope
from attn_jax.nn.mla import MLAAttention
from attn_jax.nn.transformer import Transformer

FNS = {"mla": mla_lib.mla, "mla_absorbed": mla_lib.mla_absorbed}
# Awkward sizes: low-rank queries, V != P, d_c < D; one config with full-rank queries.
SIZES = dict(d_model=24, num_heads=3, head_dim=8)
LOW_RANK = dict(
  kv_lora_rank=10, q_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5
)
FULL_RANK = dict(
  kv_lora_rank=16, q_lora_rank=0, qk_nope_head_dim=8, qk_rope_head_dim=2, v_head_dim=8
)


def _params(key, dtype=jnp.float64, **options):
  return mla_lib.init_mla(key, dtype=dtype, **SIZES, **(options or LOW_RANK))


def _cast(tree, dtype):
  return jax.tree.map(lambda a: a.astype(dtype), tree)


def run(fn, params, x, **kwargs):
  """``fn(params, x, **kwargs)`` under jit: one compile instead of one per op (suite time)."""
  return jax.jit(lambda p, x: fn(p, x, **kwargs))(params, x)


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def _equations(params, x_BTD, context_BSD, *, causal, q_pos, kv_pos):
  """MLA written out from DeepSeek-V2's equations, one head at a time, in float64."""
  src = x_BTD if context_BSD is None else context_BSD
  c = src @ params["w_dkv"]
  kr = apply_rope((src @ params["w_kr"])[:, :, None], kv_pos)[:, :, 0]
  cq = x_BTD @ params["w_dq"] if "w_dq" in params else x_BTD
  w_uq = params["w_uq"] if "w_dq" in params else params["w_q"]
  T, S = x_BTD.shape[1], src.shape[1]
  P, R = w_uq.shape[-1], kr.shape[-1]
  visible = np.tril(np.ones((T, S), bool), S - T) if causal else np.ones((T, S), bool)
  y = 0.0
  for n in range(w_uq.shape[1]):
    q_n = jnp.concatenate(
      [cq @ w_uq[:, n], apply_rope((cq @ params["w_qr"][:, n])[:, :, None], q_pos)[:, :, 0]], -1
    )
    k_n = jnp.concatenate([c @ params["w_uk"][:, n], kr], -1)
    v_n = c @ params["w_uv"][:, n]
    logits = jnp.einsum("bth,bsh->bts", q_n, k_n) / np.sqrt(P + R)
    probs = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)
    y = y + jnp.einsum("bts,bsv->btv", probs, v_n) @ params["w_o"][n]
  return y


@pytest.mark.parametrize(
  "mech_id, causal, cross", [("mla", True, False), ("mla_absorbed", False, True)]
)
def test_equals_paper_equations_float64(rng, mech_id, causal, cross):
  kp, kx, kc = jax.random.split(rng, 3)
  params = _params(kp)
  x = normal(kx, (2, 11, 24), jnp.float64)
  context = normal(kc, (2, 5, 24), jnp.float64) if cross else None
  T, S = 11, 5 if cross else 11
  q_pos, kv_pos = (jnp.arange(T) + S - T, jnp.arange(S)) if cross else (jnp.arange(T),) * 2
  want = jax.jit(_equations, static_argnames="causal")(
    params, x, context, causal=causal, q_pos=q_pos, kv_pos=kv_pos
  )
  got = run(FNS[mech_id], params, x, context_BSD=context, causal=causal, implementation="xla")
  close(got, want, 1e-12)


@pytest.mark.parametrize("mech_id", FNS)
def test_xla_float32_equals_float64_oracle_with_gradients(rng, mech_id):
  kp, kx, kw = jax.random.split(rng, 3)
  params = _params(kp, **FULL_RANK)
  x = normal(kx, (2, 11, 24), jnp.float64)
  w_out = normal(kw, (2, 11, 24), jnp.float64)
  segment_ids = jnp.array([[1] * 6 + [2] * 5, [1] * 11])
  segments = SegmentMask(segment_ids, segment_ids)

  def loss(p, x, impl):
    y = FNS[mech_id](p, x, causal=True, implementation=impl, mask=segments)
    return jnp.sum(y * w_out.astype(y.dtype)), y

  grad = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True), static_argnums=2)
  (_, want), want_g = grad(params, x, "reference")
  (_, got), got_g = grad(_cast(params, jnp.float32), x.astype(jnp.float32), "xla")
  assert got.dtype == jnp.float32
  close(got, want, 2e-5)
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
    close(g, w, 5e-5)


def test_bfloat16_within_written_tolerance(rng):
  kp, kx = jax.random.split(rng)
  params = _params(kp)
  x = normal(kx, (2, 11, 24), jnp.float64)
  want = run(mla_lib.mla, params, x, causal=True, implementation="reference")
  for fn in FNS.values():
    got = run(fn, _cast(params, jnp.bfloat16), x.astype(jnp.bfloat16), causal=True)
    assert got.dtype == jnp.bfloat16
    close(got, want, 6e-2)  # bf16 has 8 mantissa bits; a handful of roundings per element


def test_cache_holds_c_plus_r_numbers_per_token(rng):
  kp, kx = jax.random.split(rng)
  params = _params(kp)
  x = normal(kx, (2, 7, 24), jnp.float64)
  c, kr = jax.eval_shape(mla_lib.mla_cache, params, x, jnp.arange(7))
  assert c.shape == (2, 7, 10) and kr.shape == (2, 7, 4)  # d_c + d_R = 14 per token
  no_rope = _params(kp, **{**LOW_RANK, "qk_rope_head_dim": 0})
  c, kr = jax.eval_shape(mla_lib.mla_cache, no_rope, x)
  assert c.shape == (2, 7, 10) and kr.shape == (2, 7, 0)
  # Paper sizes: the cache per token is 512 + 64 numbers, against 2·128·128 for MHA.
  dims = mla_lib.resolve_dims(d_model=5120, num_heads=128, head_dim=128, q_lora_rank=1536)
  assert (dims.C, dims.R, dims.C + dims.R) == (512, 64, 576)


@pytest.mark.parametrize("mech_id", FNS)
def test_reproduces_mha_without_rope_and_identity_down_projection(rng, mech_id):
  kq, kk, kv, ko, kx = jax.random.split(rng, 5)
  D, N, H = 24, 3, 8
  w_q, w_k, w_v = (normal(k, (D, N, H), jnp.float64) for k in (kq, kk, kv))
  w_o = normal(ko, (N, H, D), jnp.float64)
  params = {"w_q": w_q, "w_dkv": jnp.eye(D), "w_uk": w_k, "w_uv": w_v, "w_o": w_o}
  x = normal(kx, (2, 9, D), jnp.float64)

  @jax.jit
  def mha(x):
    q, k, v = (jnp.einsum("BTD,DNH->BTNH", x, w) for w in (w_q, w_k, w_v))
    return jnp.einsum("BTNH,NHD->BTD", attention_reference(q, k, v, mask=CausalMask()), w_o)

  close(run(FNS[mech_id], params, x, causal=True, implementation="xla"), mha(x), 1e-12)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-5), (jnp.float64, 1e-12)])
def test_absorbed_equals_expanded_prefill_and_decode(rng, dtype, tol):
  kp, kx, kc = jax.random.split(rng, 3)
  params = _cast(_params(kp), dtype)
  x = normal(kx, (2, 11, 24), dtype)
  context = normal(kc, (2, 17, 24), dtype)

  @jax.jit
  def both_forms(params, x, context):
    pairs = []
    for kw in (dict(causal=True), dict(causal=False), dict(causal=True, context_BSD=context)):
      pairs.append((mla_lib.mla_absorbed(params, x, **kw), mla_lib.mla(params, x, **kw)))
    cache = mla_lib.mla_cache(params, context)
    absorbed = mla_lib.mla_absorbed_decode(params, x[:, :1], cache, jnp.array([17]))
    expanded = mla_lib.mla_decode(params, x[:, :1], cache, jnp.array([17]))
    return pairs, absorbed, expanded

  pairs, (y_abs, cache_abs), (y_exp, cache_exp) = both_forms(params, x, context)
  for absorbed, expanded in pairs:
    close(absorbed, expanded, tol)
  close(y_abs, y_exp, tol)
  assert y_abs.shape == (2, 1, 24) and cache_abs[0].shape == (2, 18, 10)
  close(cache_abs[1], cache_exp[1], 0)


@pytest.mark.parametrize("mech_id", FNS)
def test_decode_equals_last_rows_of_full_causal(rng, mech_id):
  kp, kx = jax.random.split(rng)
  params = _params(kp)
  x = normal(kx, (2, 13, 24), jnp.float64)
  absorbed = mech_id == "mla_absorbed"

  @jax.jit
  def decode(params, x):
    cache = mla_lib.mla_cache(params, x[:, :10])
    y1, cache = mla_lib.mla_decode(params, x[:, 10:11], cache, jnp.array([10]), absorbed=absorbed)
    y2, cache = mla_lib.mla_decode(params, x[:, 11:], cache, absorbed=absorbed)  # two at once
    return y1, y2, cache, mla_lib.mla_cache(params, x)

  full = run(FNS[mech_id], params, x, causal=True, implementation="xla")
  y1, y2, cache, cache_of_all = decode(params, x)
  close(y1[:, 0], full[:, 10], 1e-12)
  close(y2, full[:, 11:], 1e-12)
  close(cache[0], cache_of_all[0], 1e-12)
  close(cache[1], cache_of_all[1], 1e-12)


def test_shifting_all_positions_changes_nothing(rng):
  kp, kx = jax.random.split(rng)
  params = _params(kp)
  x = normal(kx, (2, 9, 24), jnp.float64)
  base = run(mla_lib.mla, params, x, causal=True)
  shifted = run(mla_lib.mla_absorbed, params, x, causal=True, positions_BT=jnp.arange(9) + 37)
  close(shifted, base, 1e-12)
  other_base = run(mla_lib.mla, params, x, causal=True, rope={"base": 500.0, "rotary_dim": 2})
  assert not np.allclose(other_base, base, atol=1e-6)  # the rope dict reaches the rotation


@pytest.mark.parametrize("mech_id", FNS)
def test_causal_through_gradients(rng, mech_id):
  kp, kx = jax.random.split(rng)
  params = _params(kp)
  x = normal(kx, (1, 7, 24), jnp.float64)
  jac = jax.jit(jax.jacrev(lambda x: FNS[mech_id](params, x, causal=True)))(x)
  jac_tt = np.abs(np.asarray(jac)).sum(axis=(0, 2, 3, 5))  # [T_out, T_in]
  assert np.all(np.triu(jac_tt, 1) == 0) and np.all(np.diag(jac_tt) > 0)


def test_roofline_absorbed_mla_two_orders_of_magnitude_above_mha():
  shape = dict(context_len=4096, num_heads=128, batch=8)
  mha = mla_lib.decode_roofline("mha", head_dim=128, **shape)
  mqa = mla_lib.decode_roofline("mqa", head_dim=128, **shape)
  mla = mla_lib.decode_roofline("mla_absorbed", kv_lora_rank=512, qk_rope_head_dim=64, **shape)
  assert mha["intensity"] == pytest.approx(1.0)  # 2 FLOPs per 2-byte element read
  assert mqa["intensity"] == pytest.approx(128 * mha["intensity"])
  assert mla["intensity"] > 100 * mha["intensity"]
  assert mla["intensity"] == pytest.approx(2 * 128 * (2 * 512 + 64) / (576 * 2))


def test_bad_inputs_raise_with_the_argument_named(rng):
  params = _params(rng)
  x = normal(rng, (2, 5, 24), jnp.float64)
  with pytest.raises(ValueError, match=r"x_BTD must have model dim D=24"):
    mla_lib.mla(params, x[..., :20], causal=True)
  with pytest.raises(ValueError, match=r"context_BSD must share x's batch size"):
    mla_lib.mla_absorbed(params, x, context_BSD=x[:1], causal=False)
  with pytest.raises(ValueError, match=r"rope\['rotary_dim'\] must be even and in \[0, "):
    mla_lib.mla(params, x, causal=True, rope={"rotary_dim": 6})
  with pytest.raises(ValueError, match=r"params\['w_uq'\] must have shape \(12, 3, 6\)"):
    mla_lib.mla(dict(params, w_uq=params["w_uq"][..., :5]), x, causal=True)
  with pytest.raises(ValueError, match=r"positions_BT must have shape \(2, 5\) or \(5,\)"):
    mla_lib.mla_cache(params, x, jnp.arange(4))
  with pytest.raises(ValueError, match=r"cache must be \(c \[B, S, C\], kr \[B, S, R\]\)"):
    mla_lib.mla_absorbed_decode(params, x[:, :1], (jnp.zeros((2, 3, 9)), jnp.zeros((2, 3, 4))))
  with pytest.raises(ValueError, match=r"qk_rope_head_dim must be even"):
    mla_lib.init_mla(rng, d_model=24, num_heads=3, qk_rope_head_dim=3)
  with pytest.raises(ValueError, match=r"unknown MLA options \['window'\]"):
    mla_lib.init_mla(rng, d_model=24, num_heads=3, window=4)
  with pytest.raises(ValueError, match=r"kind must be one of"):
    mla_lib.decode_roofline("mla", context_len=8, num_heads=2)
  with pytest.raises(ValueError, match=r"does not take qk_norm=True"):
    MLAAttention(d_model=24, num_heads=3, qk_norm=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"unknown attention options \['rank'\]"):
    MLAAttention(d_model=24, num_heads=3, options={"rank": 4, "window": 8}, rngs=nnx.Rngs(0))


def test_module_calls_the_function_and_captures(rng):
  options = {**LOW_RANK, "window": 64, "chunk": 64, "prefix": 0, "softcap": 50.0}
  x = normal(rng, (2, 9, 24), jnp.float32)
  segment_ids = jnp.array([[1] * 4 + [2] * 5] * 2)
  mask = SegmentMask(segment_ids, segment_ids)
  for kind in FNS:
    layer = MLAAttention(
      d_model=24, num_heads=3, kind=kind, positions="none", options=options, rngs=nnx.Rngs(1)
    )
    y = nnx.jit(lambda m, x: m(x, segment_ids_BT=segment_ids))(layer, x)
    want = run(FNS[kind], layer.param_tree(), x, causal=True, mask=mask, rope=layer.rope)
    close(y, want, 1e-6)
  # Capture (the expanded reference) on the absorbed module: same output, maps of every head.
  captured, inter = nnx.jit(
    lambda m, x: nnx.capture(m, nnx.Intermediate)(x, segment_ids_BT=segment_ids, capture=True)
  )(layer, x)
  close(captured, y, 2e-5)
  assert inter["probs"].get_value()[0].shape == (2, 3, 9, 9)
  assert inter["heads"].get_value()[0].shape == (2, 9, 3, 5)


def test_transformer_forward_and_grad(rng):
  # One stack holds both ids (one layer each): the mixed form of attention=<id>.
  model = Transformer(
    num_layers=2,
    attention=["mla", "mla_absorbed"],
    d_model=24,
    num_heads=3,
    mlp="none",
    positions="learned",
    options={"q_lora_rank": 8},
    rngs=nnx.Rngs(0),
  )
  x = normal(rng, (2, 9, 24), jnp.float32)
  y, grads = nnx.jit(nnx.value_and_grad(lambda m: jnp.sum(m(x) ** 2)))(model)
  leaves = jax.tree.leaves(nnx.state(grads))
  assert np.isfinite(y) and len(leaves) == 2 * (8 + 2) + 2  # 8 MLA weights, a norm per layer
  assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in leaves)


def test_registry_entries():
  for mech_id in FNS:
    mech = registry.get(mech_id)
    assert mech.interface == "layer" and mech.decode and mech.family == "b"
    assert mech.function() is FNS[mech_id]


@pytest.mark.parametrize("platform, impl", [("tpu", "pallas_tpu"), ("cuda", "pallas_gpu")])
def test_kernels_lower(rng, platform, impl):
  params = _cast(_params(rng), jnp.float32)
  x = normal(rng, (2, 9, 24), jnp.float32)
  for fn in FNS.values():
    traced = jax.jit(lambda p, x: fn(p, x, causal=True, implementation=impl)).trace(params, x)
    traced.lower(lowering_platforms=(platform,))


@pytest.mark.slow
def test_pallas_interpret_equals_oracle(rng):
  params = _params(rng)
  x = normal(rng, (1, 9, 24), jnp.float64)
  want = mla_lib.mla(params, x, causal=True, implementation="reference")
  for fn in FNS.values():
    got = fn(
      _cast(params, jnp.float32),
      x.astype(jnp.float32),
      causal=True,
      implementation="pallas_interpret",
    )
    close(got, want, 2e-5)
