"""Token-group masks (group_mask): the table semantics, exact tile kinds, the catalog checks
(all-true table + causal is causal; the modality-mutual rule), attention through the blocked
path equal to the reference, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal

from attn_jax.attention import EMPTY, FULL, CausalMask, GroupMask, dot_product_attention


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def test_visibility_is_the_table_lookup_and_tile_kinds_are_exact(rng):
  kq, kk, kt = jax.random.split(rng, 3)
  B, T, S, G = 2, 29, 41, 4
  qg = jax.random.randint(kq, (B, T), 0, G)
  kg = jax.random.randint(kk, (B, S), 0, G)
  table = jax.random.bernoulli(kt, 0.4, (G, G))
  m = GroupMask(qg, kg, table=table)
  dense = np.asarray(m.dense(T, S))
  want = np.asarray(table)[np.asarray(qg)[:, :, None], np.asarray(kg)[:, None, :]]
  assert np.array_equal(dense, want)
  # Sorted groups make whole tiles empty or full.
  for ids_q, ids_k in ((qg, kg), (jnp.sort(qg, 1), jnp.sort(kg, 1))):
    mm = GroupMask(ids_q, ids_k, table=table)
    d = np.asarray(mm.dense(T, S))
    kinds = np.asarray(mm.block_kinds(T, S, 8, 16))
    for i in range(kinds.shape[1]):
      for j in range(kinds.shape[2]):
        tile = d[:, i * 8 : (i + 1) * 8, j * 16 : (j + 1) * 16]
        assert np.array_equal(kinds[:, i, j] == EMPTY, ~tile.any((1, 2)))
        assert np.array_equal(kinds[:, i, j] == FULL, tile.all((1, 2)))


def test_all_true_table_with_causal_is_causal(rng):
  kq, kk, kv, kg = jax.random.split(rng, 4)
  q, k, v = (normal(x, (2, 19, 2, 8), jnp.float32) for x in (kq, kk, kv))
  groups = jax.random.randint(kg, (2, 19), 0, 3)
  m = CausalMask() & GroupMask(groups, table=jnp.ones((3, 3), bool))
  for impl in ("reference", "xla"):
    close(
      dot_product_attention(q, k, v, mask=m, implementation=impl),
      dot_product_attention(q, k, v, mask=CausalMask(), implementation="reference"),
      2e-6,
    )


def test_modality_mutual_rule(rng):
  """Groups: 0 text prompt, 1 image, 2 answer. Image rows may also see the later prompt;
  text rows are unchanged; nobody sees an answer token after it."""
  ids = jnp.array([[1, 1, 1, 1, 0, 0, 0, 2, 2, 2]])
  T = ids.shape[1]
  table = jnp.zeros((3, 3), bool).at[1, 0].set(True)  # image -> text prompt
  m = CausalMask() | GroupMask(ids, table=table)
  dense = np.asarray(m.dense(T, T))[0]
  causal = np.tril(np.ones((T, T), bool))
  text_rows = np.asarray(ids[0]) != 1
  assert np.array_equal(dense[text_rows], causal[text_rows])
  assert dense[:4, 4:7].all()  # image rows see the whole later prompt
  answer = np.asarray(ids[0]) == 2
  later = np.triu(np.ones((T, T), bool), 1)
  assert not (dense & later & answer[None, :]).any()
  kq, kk, kv = jax.random.split(rng, 3)
  q, k, v = (normal(x, (1, T, 2, 8), jnp.float32) for x in (kq, kk, kv))
  close(
    dot_product_attention(q, k, v, mask=m, implementation="xla"),
    dot_product_attention(q, k, v, mask=m, implementation="reference"),
    2e-6,
  )


@pytest.mark.parametrize(
  "make, message",
  [
    (
      lambda: GroupMask(jnp.zeros((2, 5), jnp.int32), table=jnp.ones((3, 2), bool)),
      "shape \\[G, G\\]",
    ),
    (lambda: GroupMask(jnp.zeros((2, 5), jnp.int32), table=jnp.ones((2, 2))), "bool array"),
    (
      lambda: GroupMask(jnp.full((2, 5), 3), table=jnp.ones((2, 2), bool)),
      "must lie in \\[0, 2\\)",
    ),
    (lambda: GroupMask(jnp.zeros((2, 5)), table=jnp.ones((2, 2), bool)), "q_groups must be an int"),
  ],
)
def test_bad_input_messages(make, message):
  with pytest.raises(ValueError, match=message):
    make()


# ------------------------------------------------------------------------------------------
# The stack layer: ``--config.model.attention=group_mask`` with the group_* options.
# ------------------------------------------------------------------------------------------


def _layer_oracle(layer, x, mask):
  q = jnp.einsum("BTD,DNH->BTNH", x, layer.wq[...])
  k = jnp.einsum("BTD,DKH->BTKH", x, layer.wk[...])
  v = jnp.einsum("BTD,DKH->BTKH", x, layer.wv[...])
  out = dot_product_attention(q, k, v, mask=mask, implementation="reference")
  return jnp.einsum("BTNH,NHD->BTD", out, layer.wo[...])


def _group_layer(options=None, seed=0, positions="none"):
  """A 2-head ``group_mask`` stack layer of width 16."""
  from flax import nnx

  from attn_jax.nn import Attention

  return Attention(
    d_model=16,
    num_heads=2,
    kind="group_mask",
    positions=positions,
    options=options,
    rngs=nnx.Rngs(seed),
  )


def test_layer_groups_from_positions_and_from_ids(rng):
  """Modality-mutual layout from the options (image 0..3, prompt 4..6, answer 7..9) equals
  the mask built by hand; passing the same ids per token gives the same output; the default
  options (one group, all-true table) are plain causal attention."""
  opts = {"group_starts": "0,4,7", "group_table": "110/010/111", "group_rule": "or"}
  layer = _group_layer(opts, 1)
  x = normal(rng, (2, 10, 16), jnp.float32)
  ids = jnp.broadcast_to(jnp.array([0] * 4 + [1] * 3 + [2] * 3), (2, 10))
  table = jnp.array([[1, 1, 0], [0, 1, 0], [1, 1, 1]], bool)
  want = _layer_oracle(layer, x, CausalMask() | GroupMask(ids, table=table))
  close(layer(x), want, 1e-5)
  close(layer(x, group_ids_BT=ids), want, 1e-5)
  causal = _layer_oracle(layer, x, CausalMask())
  assert not np.allclose(np.asarray(want[:, :4]), np.asarray(causal[:, :4]), atol=1e-4)
  plain = _group_layer(seed=1)
  close(plain(x), causal, 1e-5)


def test_layer_isolation_rule_and_packing(rng):
  """'and': two condition branches isolated from each other, both seeing the shared prefix;
  packed documents stay apart and each branch gets its groups from its own positions."""
  opts = {"group_starts": "0,3,6", "group_table": "100/110/101", "group_rule": "and"}
  layer = _group_layer(opts, 2)
  x = normal(rng, (1, 9, 16), jnp.float32)
  ids = jnp.array([[0, 0, 0, 1, 1, 1, 2, 2, 2]])
  table = jnp.array([[1, 0, 0], [1, 1, 0], [1, 0, 1]], bool)
  out = layer(x)
  close(out, _layer_oracle(layer, x, CausalMask() & GroupMask(ids, table=table)), 1e-5)
  # Branch 2 (tokens 6..8) does not depend on branch 1 (tokens 3..5): gradient check.
  grad = jax.grad(lambda x: layer(x)[:, 6:].sum())(x)
  assert float(jnp.abs(grad[:, 3:6]).max()) == 0.0
  assert float(jnp.abs(grad[:, :3]).max()) > 0.0
  # Two packed copies of the first 6 tokens: each equals the copy alone.
  xp = jnp.concatenate([x[:, :6], x[:, :6]], axis=1)
  seg = jnp.array([[1] * 6 + [2] * 6])
  pos = jnp.array([list(range(6)) * 2])
  packed = layer(xp, segment_ids_BT=seg, positions_BT=pos)
  close(packed[:, 6:], out[:, :6], 1e-5)
  close(packed[:, :6], out[:, :6], 1e-5)


@pytest.mark.parametrize(
  "opts, call, message",
  [
    ({"group_starts": "0,4", "group_table": "11/1"}, {}, "2 rows of 2 0/1 digits"),
    ({"group_starts": "0,4", "group_table": "12/11"}, {}, "0/1 digits"),
    ({"group_starts": "2,4"}, {}, "must start at 0 and increase"),
    ({"group_starts": "0,4,4"}, {}, "must start at 0 and increase"),
    ({"group_rule": "xor"}, {}, "group_rule must be 'and' or 'or'"),
    ({}, {"group_ids_BT": jnp.zeros((1, 5), jnp.int32)}, "group_ids_BT must have shape"),
    ({}, {"group_ids_BT": jnp.ones((2, 8), jnp.int32)}, "must lie in \\[0, 1\\)"),
  ],
)
def test_layer_bad_options(rng, opts, call, message):
  layer = _group_layer(opts, positions="rope")
  with pytest.raises(ValueError, match=message):
    layer(normal(rng, (2, 8, 16), jnp.float32), **call)


def test_group_ids_refused_by_other_kinds(rng):
  from flax import nnx

  from attn_jax.nn import Attention

  layer = Attention(d_model=16, num_heads=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="read by kind 'group_mask' only"):
    layer(normal(rng, (2, 8, 16), jnp.float32), group_ids_BT=jnp.zeros((2, 8), jnp.int32))
