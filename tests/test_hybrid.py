"""Hybrid linear / full-attention schedules (hybrid_schedule) and stack decoding: the
schedule's layout and bad inputs; the stack expands it from config options; all-full equals
the Transformer and all-linear the pure linear model; prefill followed by token-by-token
decoding against one cache (recurrent states and KV) equals full-sequence evaluation, for
attention layers (MHA, GQA / MQA heads, RoPE) alone and for hybrids of every linear kind."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import hybrid, registry
from attn_jax.nn import transformer
from attn_jax.nn.transformer import Transformer


def close(a, b, tol=2e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol)


def test_schedule_layout_and_bad_inputs():
  assert hybrid.hybrid_schedule(8) == ["gated_delta"] * 3 + ["mha"] + ["gated_delta"] * 3 + ["mha"]
  assert hybrid.hybrid_schedule(4, linear="lightning", full="gqa", linear_per_full=1) == [
    "lightning",
    "gqa",
    "lightning",
    "gqa",
  ]
  assert hybrid.hybrid_schedule(5, linear_per_full=2, full_first=True) == [
    "mha",
    "gated_delta",
    "gated_delta",
    "mha",
    "gated_delta",
  ]
  assert hybrid.hybrid_schedule(3, linear_per_full=0) == ["mha"] * 3
  assert hybrid.hybrid_schedule(3, linear_per_full=3) == ["gated_delta"] * 3
  with pytest.raises(ValueError, match="not a linear-attention id"):
    hybrid.hybrid_schedule(4, linear="mha")
  with pytest.raises(ValueError, match="linear_per_full must be"):
    hybrid.hybrid_schedule(4, linear_per_full=-1)
  with pytest.raises(ValueError, match="num_layers must be"):
    hybrid.hybrid_schedule(0)
  with pytest.raises(ValueError, match="is itself a schedule"):
    hybrid.hybrid_schedule(4, full="hybrid_schedule")
  with pytest.raises(ValueError, match="unknown"):
    hybrid.hybrid_schedule(4, linear="no_such_mechanism")
  assert registry.get("hybrid_schedule").interface == "schedule"


def make(attention, num_layers=4, options=None, seed=0, num_kv_heads=None, positions="none"):
  return Transformer(
    num_layers=num_layers,
    attention=attention,
    d_model=32,
    num_heads=4,
    num_kv_heads=num_kv_heads,
    positions=positions,
    mlp="gelu",
    options=options,
    rngs=nnx.Rngs(seed),
  )


def test_stack_expands_the_schedule_from_options():
  opts = {**transformer.default_options("hybrid_schedule"), "hybrid_linear": "lightning"}
  opts["hybrid_linear_per_full"] = 1
  model = make("hybrid_schedule", options=opts)
  assert model.kinds == ["lightning", "mha", "lightning", "mha"]
  assert transformer.layer_kinds("hybrid_schedule", 4) == hybrid.hybrid_schedule(4)


@pytest.mark.parametrize("per_full,reference", [(0, "mha"), (4, "gated_delta")])
def test_all_full_is_the_transformer_and_all_linear_the_linear_model(rng, per_full, reference):
  opts = {**transformer.default_options("hybrid_schedule"), "hybrid_linear_per_full": per_full}
  x = normal(rng, (2, 12, 32), jnp.float32)
  hyb, ref = make("hybrid_schedule", options=opts), make(reference)
  assert hyb.kinds == ref.kinds == [reference] * 4
  forward = nnx.jit(lambda m, x: m(x))
  close(forward(hyb, x), forward(ref, x), 0)


def decode_matches_full(model, x, prefill):
  """Prefill ``prefill`` tokens, then decode the rest one at a time under one jit."""
  B, T, _ = x.shape

  @nnx.jit
  def run(model, x):
    full = model(x)
    cache = model.init_cache(B, T)
    out, cache = model.step(x[:, :prefill], cache)
    outs = [out]
    for t in range(prefill, T):
      out, cache = model.step(x[:, t : t + 1], cache)
      outs.append(out)
    return full, jnp.concatenate(outs, axis=1), cache["length"]

  full, decoded, length = run(model, x)
  assert int(length) == T
  close(decoded, full, 2e-5)


@pytest.mark.parametrize(
  "kind,num_kv_heads,positions", [("mha", None, "none"), ("mha", 2, "rope"), ("rope", 1, "none")]
)
def test_attention_layers_decode_like_the_full_sequence(rng, kind, num_kv_heads, positions):
  model = make(kind, num_layers=2, num_kv_heads=num_kv_heads, positions=positions)
  decode_matches_full(model, normal(rng, (2, 9, 32), jnp.float32), prefill=5)


def test_layers_without_a_decode_path_say_so():
  model = make("sliding_window", num_layers=1)
  with pytest.raises(NotImplementedError, match="decoding with a cache is built for"):
    model.init_cache(1, 8)


def test_hybrid_of_every_linear_kind_decodes_like_the_full_sequence(rng):
  """One stack holding every linear kind and attention: prefill 5 tokens, then decode 4 one
  at a time against the single cache (recurrent states and KV) == the full forward."""
  kinds = [
    "linear_attn",
    "lightning",
    "mha",
    "simple_gla",
    "gla",
    "delta_rule",
    "gated_delta",
    "based",
    "hgrn2",
    "mha",
  ]
  model = make(kinds, num_layers=len(kinds))
  cache = model.init_cache(2, 9)
  assert cache["layers"][0]["state"].shape == (2, 4, 8, 9)  # elu+1 features, z column
  assert cache["layers"][2]["k"].shape == (2, 9, 4, 8)
  decode_matches_full(model, normal(rng, (2, 9, 32), jnp.float32), prefill=5)


def test_short_convolutions_decode_like_the_full_sequence(rng):
  """``short_conv`` carries the last W − 1 projections in the cache: prefill 2 tokens (fewer
  than W − 1), then one at a time == the full forward."""
  model = make(["gated_delta", "mha", "based"], num_layers=3, options={"short_conv": 4})
  cache = model.init_cache(2, 9)
  assert cache["layers"][0]["conv_v"].shape == (2, 3, 4, 8)
  decode_matches_full(model, normal(rng, (2, 9, 32), jnp.float32), prefill=2)
