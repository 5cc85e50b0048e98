"""attn_jax.nn and attn_jax.models: modules equal the functional oracle, causality through
gradients for every causal mechanism in the registry, size tables build at full size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax import models
from attn_jax.attention import registry
from attn_jax.attention.reference import attention_reference
from attn_jax.models import decoder_lm, encoder
from attn_jax.nn import Attention, Transformer
from attn_jax.nn.transformer import layer_kinds

STACK_IDS = sorted(
  m.id for m in registry.all_mechanisms() if m.module is not None and m.interface != "pool"
)
CAUSAL_STACK_IDS = [i for i in STACK_IDS if registry.get(i).causal]


def _oracle(layer: Attention, x, **kwargs):
  """The layer's math written out: projections, then the oracle, then the output projection."""
  q = jnp.einsum("BTD,DNH->BTNH", x, layer.wq[...])
  k = jnp.einsum("BTD,DKH->BTKH", x, layer.wk[...])
  v = jnp.einsum("BTD,DKH->BTKH", x, layer.wv[...])
  out = attention_reference(q, k, v, **kwargs)
  return jnp.einsum("BTNH,NHD->BTD", out, layer.wo[...])


@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(4, 4, 8), (4, 2, 12), (4, 1, 5)])
def test_attention_layer_equals_oracle(rng, num_heads, num_kv_heads, head_dim):
  from attn_jax.attention import CausalMask

  layer = Attention(
    d_model=24,
    num_heads=num_heads,
    num_kv_heads=num_kv_heads,
    head_dim=head_dim,
    positions="none",
    rngs=nnx.Rngs(jax.random.fold_in(rng, 1)),
  )
  x = normal(rng, (2, 13, 24), jnp.float32)
  np.testing.assert_allclose(layer(x), _oracle(layer, x, mask=CausalMask()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["sliding_window", "alibi", "softcap", "sinks", "chunked_causal"])
def test_layer_kinds_use_their_registry_options(rng, kind):
  from attn_jax.attention import AlibiBias, CausalMask, ChunkedCausalMask, sliding_window

  opts = {"window": 3, "chunk": 4, "softcap": 1.5}
  layer = Attention(
    d_model=16, num_heads=2, kind=kind, positions="none", options=opts, rngs=nnx.Rngs(1)
  )
  if kind == "sinks":  # a non-trivial sink logit so the test can see it
    layer.sinks[...] = jnp.asarray([0.7, -0.3], layer.sinks[...].dtype)
  x = normal(rng, (2, 11, 16), jnp.float32)
  expected = {
    "sliding_window": lambda: dict(mask=sliding_window(3)),
    "alibi": lambda: dict(mask=CausalMask(), bias=AlibiBias.default(2)),
    "softcap": lambda: dict(mask=CausalMask(), softcap=1.5),
    "sinks": lambda: dict(mask=CausalMask(), sinks=layer.sinks[...]),
    "chunked_causal": lambda: dict(mask=ChunkedCausalMask(4)),
  }[kind]()
  np.testing.assert_allclose(layer(x), _oracle(layer, x, **expected), rtol=1e-5, atol=1e-5)
  plain = Attention(d_model=16, num_heads=2, positions="none", rngs=nnx.Rngs(1))
  assert not np.allclose(layer(x), plain(x), atol=1e-4)  # the option changes the output


def test_capture_sows_probabilities_and_head_outputs(rng):
  layer = Attention(
    d_model=16, num_heads=2, kind="sliding_window", options={"window": 4}, rngs=nnx.Rngs(0)
  )
  x = normal(rng, (2, 9, 16), jnp.float32)
  plain = layer(x)
  captured, inter = nnx.capture(layer, nnx.Intermediate)(x, capture=True)
  probs = inter["probs"].get_value()[0]
  heads = inter["heads"].get_value()[0]
  np.testing.assert_allclose(captured, plain, rtol=1e-5, atol=1e-5)
  assert probs.shape == (2, 2, 9, 9) and heads.shape == (2, 9, 2, 8)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  assert float(jnp.abs(jnp.triu(probs, 1)).max()) == 0.0  # causal
  assert float(jnp.abs(jnp.tril(probs, -4)).max()) == 0.0  # window 4
  assert not nnx.state(layer, nnx.Intermediate)  # nothing left on the module
  _, inter = nnx.capture(layer, nnx.Intermediate)(x)
  assert not jax.tree.leaves(inter)  # off by default


def test_segment_ids_keep_documents_apart(rng):
  layer = Attention(d_model=16, num_heads=2, rngs=nnx.Rngs(0))
  x = normal(rng, (1, 10, 16), jnp.float32)
  seg = jnp.asarray([[1] * 4 + [2] * 6])
  packed = layer(x, segment_ids_BT=seg)
  alone = layer(x[:, 4:])  # document 2 alone, with its own positions from 0
  np.testing.assert_allclose(
    packed[:, 4:], layer(x[:, 4:], positions_BT=jnp.arange(4, 10)), rtol=1e-5, atol=1e-5
  )
  # RoPE is relative, so the shifted positions give the same result as starting at 0.
  np.testing.assert_allclose(packed[:, 4:], alone, rtol=1e-4, atol=1e-5)


def test_bad_configurations_raise_before_compiling():
  with pytest.raises(ValueError, match="num_kv_heads"):
    Attention(d_model=16, num_heads=3, num_kv_heads=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="registered ids"):
    layer_kinds("no_such_attention", 2)
  with pytest.raises(ValueError, match="no NNX module"):
    layer_kinds("cross_patterns", 1)
  with pytest.raises(ValueError, match="lists 2 kinds for num_layers=3"):
    layer_kinds(["mha", "sliding_window"], 3)
  with pytest.raises(ValueError, match="causal-only"):
    Attention(d_model=16, num_heads=2, kind="alibi", causal=False, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown attention options"):
    Attention(d_model=16, num_heads=2, options={"windw": 3}, rngs=nnx.Rngs(0))


def test_hybrid_stack_uses_one_kind_per_layer():
  stack = Transformer(
    num_layers=3,
    attention=["sliding_window", "sliding_window", "mha"],
    d_model=16,
    num_heads=2,
    rngs=nnx.Rngs(0),
  )
  assert [b.attn.kind for b in stack.blocks] == ["sliding_window", "sliding_window", "mha"]
  assert layer_kinds("sliding_window+mha", 2) == ["sliding_window", "mha"]
  assert layer_kinds(["swa", "swa", "mha"], 3) == ["sliding_window", "sliding_window", "mha"]


def _decoder(kind, num_layers=2, **kw):
  return decoder_lm.DecoderLM(
    vocab_size=32,
    d_model=16,
    num_layers=num_layers,
    num_heads=2,
    attention=kind,
    options={"window": 3, "chunk": 4, "prefix": 0},
    max_len=12,
    rngs=nnx.Rngs(0),
    **kw,
  )


@pytest.mark.parametrize("kind", CAUSAL_STACK_IDS)
def test_decoder_is_causal_through_gradients(rng, kind):
  # One layer suffices: a leak from position t + 1 shows in its own output at t.
  model = _decoder(kind, num_layers=1, positions="learned")
  x = normal(rng, (1, 12, 16), jnp.float32)
  t = 6

  w = normal(jax.random.fold_in(rng, 2), (16,), jnp.float32)

  def out_t(x):  # a random readout: the plain sum of a LayerNorm output is constant
    return (model.hidden(x)[0, t] * w).sum()

  g = jax.jit(jax.grad(out_t))(x)[0]  # one compiled program, not op-by-op dispatch
  assert float(jnp.abs(g[t + 1 :]).max()) == 0.0, f"{kind}: position {t} sees the future"
  assert float(jnp.abs(g[t]).max()) > 0.0


def test_logits_at_requested_positions_equal_full_logits(rng):
  model = _decoder("mha", tie_embeddings=False)
  tokens = jax.random.randint(rng, (2, 12), 0, 32)
  pos = jnp.asarray([[1, 5, 11], [0, 2, 3]])
  full = model(tokens)
  some = model(tokens, logit_positions_BP=pos)
  np.testing.assert_allclose(some, jnp.take_along_axis(full, pos[..., None], 1), rtol=1e-5)


def test_encoder_features_and_pooling(rng):
  model = encoder.Encoder(
    d_model=16,
    num_outputs=3,
    input_dim=6,
    num_layers=1,
    num_heads=2,
    pooling="mean",
    rngs=nnx.Rngs(0),
  )
  x = normal(rng, (2, 7, 6), jnp.float32)
  out = model(x)
  assert out.shape == (2, 3)
  # Bidirectional: mean pooling is invariant to permuting tokens only without positions;
  # with learned positions, changing the last token changes the output (it is seen).
  x2 = x.at[:, -1].add(1.0)
  assert not np.allclose(model(x2), out)
  with pytest.raises(ValueError, match="exactly one of"):
    encoder.Encoder(d_model=8, num_outputs=1, num_layers=1, num_heads=1, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
  "family, variant",
  [(f, v) for f, table in models.VARIANTS.items() for v in table],
)
def test_variants_build_at_full_size_under_eval_shape(family, variant):
  kw = dict(models.VARIANTS[family][variant])
  if family == "decoder_lm":
    kw.update(vocab_size=32_000)
  else:
    kw.update(vocab_size=32_000, num_outputs=1000)
  model = nnx.eval_shape(lambda: models.build(family, rngs=nnx.Rngs(0), **kw))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model)))
  d = kw["d_model"]
  assert count > kw["num_layers"] * 4 * d * d  # at least the attention projections
  if family == "decoder_lm" and variant == "7b":
    assert 6.0e9 < count < 7.5e9, count
