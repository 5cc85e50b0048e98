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
