"""Native sparse attention (``attn_jax.attention.nsa``).

The layer against a float64 oracle written out here (compression, compressed softmax,
selection from the summed group probabilities, dense masked selected branch, dense window
branch, gates), values and gradients; the catalog check (all blocks selected and w >= T:
the selected and window branches are causal attention); the selection rule alone; the
kernel path (TPU kernel, TPU memory simulated) equals the blocked path; the NNX layer.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from attn_jax.attention import CausalMask, dot_product_attention
from attn_jax.attention import nsa as nsa_lib
from attn_jax.nn.nsa import NSAAttention


def _params(key, D=24, N=4, K=2, H=8, block=4, gates=True):
  p = nsa_lib.init_nsa(key, d_model=D, num_heads=N, num_kv_heads=K, head_dim=H, nsa_block=block)
  kc, kv, kg = jax.random.split(jax.random.fold_in(key, 9), 3)
  # Non-trivial compression maps and gates, so the test sees them.
  p["w_cmp_k"] = p["w_cmp_k"] + 0.2 * normal(kc, p["w_cmp_k"].shape, jnp.float32)
  p["w_cmp_v"] = p["w_cmp_v"] + 0.2 * normal(kv, p["w_cmp_v"].shape, jnp.float32)
  if gates:
    p["w_gate"] = 0.3 * normal(kg, p["w_gate"].shape, jnp.float32)
  return p


def _softmax_masked(s, visible):
  s = jnp.where(visible, s, -jnp.inf)
  top = jnp.max(s, -1, keepdims=True)
  e = jnp.exp(s - jnp.where(jnp.isfinite(top), top, 0.0))
  total = e.sum(-1, keepdims=True)
  return e / jnp.where(total > 0, total, 1.0)


def _oracle(p, x, block, top_n, window, selected):
  """Everything dense and explicit, in x's dtype; ``selected`` [B, K, T, nC] is given (the
  selection is a detached discrete choice, checked separately)."""
  B, T, D = x.shape
  q = jnp.einsum("btd,dnh->btnh", x, p["w_q"])
  k = jnp.einsum("btd,dkh->btkh", x, p["w_k"])
  v = jnp.einsum("btd,dkh->btkh", x, p["w_v"])
  N, K, H = q.shape[2], k.shape[2], q.shape[3]
  G = N // K
  kr, vr = jnp.repeat(k, G, 2), jnp.repeat(v, G, 2)
  t = jnp.arange(T)
  s = jnp.einsum("btnh,bsnh->bnts", q, kr) / np.sqrt(H)
  # Compressed branch.
  nB = T // block
  kc = jnp.stack(
    [
      jnp.einsum("blkh,lkh->bkh", k[:, b * block : (b + 1) * block], p["w_cmp_k"])
      for b in range(nB)
    ],
    1,
  )
  vc = jnp.stack(
    [
      jnp.einsum("blkh,lkh->bkh", v[:, b * block : (b + 1) * block], p["w_cmp_v"])
      for b in range(nB)
    ],
    1,
  )
  sc = jnp.einsum("btnh,bcnh->bntc", q, jnp.repeat(kc, G, 2)) / np.sqrt(H)
  vis_c = (jnp.arange(nB)[None] + 1) * block - 1 <= t[:, None]
  o_cmp = jnp.einsum("bntc,bcnh->btnh", _softmax_masked(sc, vis_c), jnp.repeat(vc, G, 2))
  # Selected branch: tokens of the selected blocks, causal.
  sel_tok = jnp.repeat(jnp.repeat(selected, G, 1), block, -1)[..., :T]  # [B, N, T, T]
  vis_s = sel_tok & (t[None, :] <= t[:, None])
  o_slc = jnp.einsum("bnts,bsnh->btnh", _softmax_masked(s, vis_s), vr)
  # Window branch.
  vis_w = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window)
  o_win = jnp.einsum("bnts,bsnh->btnh", _softmax_masked(s, vis_w), vr)
  g = jax.nn.sigmoid(jnp.einsum("btd,dnc->btnc", x, p["w_gate"]))
  o = g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win
  return jnp.einsum("btnh,nhd->btd", o, p["w_o"])


def test_layer_equals_float64_oracle_with_gradients(rng):
  B, T, D, block, top_n, window = 2, 30, 24, 4, 3, 6
  p = _params(rng, D=D, block=block)
  x = normal(jax.random.fold_in(rng, 1), (B, T, D), jnp.float32)
  kw = dict(nsa_top_n=top_n, nsa_window=window)
  _, aux = nsa_lib.nsa(p, x, return_aux=True, **kw)
  sel = aux["selected"]
  w = normal(jax.random.fold_in(rng, 2), (B, T, D), jnp.float32)

  def loss_fast(p, x):
    return jnp.sum(nsa_lib.nsa(p, x, **kw) * w)

  def loss_ref(p, x):
    return jnp.sum(_oracle(p, x, block, top_n, window, sel) * w)

  val, grads = jax.jit(jax.value_and_grad(loss_fast, (0, 1)))(p, x)
  p64 = jax.tree.map(lambda a: a.astype(jnp.float64), p)
  val_r, grads_r = jax.value_and_grad(loss_ref, (0, 1))(p64, x.astype(jnp.float64))
  np.testing.assert_allclose(val, val_r, rtol=2e-5)
  for g, gr in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r), strict=True):
    scale = max(1.0, float(jnp.abs(gr).max()))
    np.testing.assert_allclose(np.asarray(g), np.asarray(gr), atol=5e-5 * scale, rtol=0)


def test_selection_rule(rng):
  """Forced blocks (first, own, previous) always in; never a future block; at most top_n;
  the rest by the group-summed compressed probabilities (one list per kv head)."""
  B, N, K, T, block, top_n = 2, 4, 2, 40, 4, 4
  nB = T // block
  p = jax.random.uniform(rng, (B, N, T, nB))
  sel = np.asarray(nsa_lib.select_blocks(p, K, T, block, top_n))
  assert sel.shape == (B, K, T, 10)
  imp = np.asarray(p).reshape(B, K, N // K, T, nB).sum(2)
  for b, h, t in np.ndindex(B, K, T):
    own = t // block
    chosen = set(np.flatnonzero(sel[b, h, t]).tolist())
    forced = {0, own, max(own - 1, 0)}
    assert forced <= chosen and max(chosen) <= own
    assert len(chosen) == min(top_n, own + 1)
    rest = [c for c in range(own + 1) if c not in forced]
    best = sorted(rest, key=lambda c: -imp[b, h, t, c])[: len(chosen) - len(forced)]
    assert chosen == forced | set(best)


def test_all_blocks_and_wide_window_are_causal(rng):
  """Catalog check: every block selected and w >= T make the selected and window branches
  causal attention."""
  B, T, D, block = 1, 24, 16, 4
  p = _params(rng, D=D, N=2, K=1, block=block)
  x = normal(jax.random.fold_in(rng, 1), (B, T, D), jnp.float32)
  _, aux = nsa_lib.nsa(p, x, nsa_top_n=T, nsa_window=T, return_aux=True)
  q = jnp.einsum("btd,dnh->btnh", x, p["w_q"])
  k = jnp.einsum("btd,dkh->btkh", x, p["w_k"])
  v = jnp.einsum("btd,dkh->btkh", x, p["w_v"])
  causal = dot_product_attention(q, k, v, mask=CausalMask(), implementation="reference")
  _, o_slc, o_win = aux["branches"]
  np.testing.assert_allclose(o_slc, causal, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(o_win, causal, atol=2e-5, rtol=2e-5)


def test_kernel_path_equals_blocked_path(rng):
  """The selected and window branches on the TPU kernels (pallas_interpret; block 128)."""
  B, T, D, block = 1, 300, 32, 128
  p = _params(rng, D=D, N=2, K=1, H=16, block=block)
  x = normal(jax.random.fold_in(rng, 1), (B, T, D), jnp.float32)
  kw = dict(nsa_top_n=2, nsa_window=100)
  got = nsa_lib.nsa(p, x, implementation="pallas_interpret", **kw)
  want = nsa_lib.nsa(p, x, implementation="xla", **kw)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_nnx_layer_and_bad_inputs(rng):
  layer = NSAAttention(
    d_model=16,
    num_heads=4,
    num_kv_heads=2,
    positions="none",
    options={"nsa_block": 4, "nsa_top_n": 2, "nsa_window": 5},
    rngs=nnx.Rngs(0),
  )
  assert layer.call_options == {"nsa_top_n": 2, "nsa_window": 5}
  x = normal(rng, (2, 13, 16), jnp.float32)
  y = nnx.jit(lambda m, x: m(x))(layer, x)
  assert y.shape == x.shape and np.all(np.isfinite(np.asarray(y)))
  with pytest.raises(ValueError, match="causal-only"):
    NSAAttention(d_model=16, num_heads=4, causal=False, rngs=nnx.Rngs(0))
  p = layer.param_tree()
  with pytest.raises(ValueError, match="nsa_top_n must be an int >= 1"):
    nsa_lib.nsa(p, x, nsa_top_n=0)
  with pytest.raises(ValueError, match="causal self-attention"):
    nsa_lib.nsa(p, x, causal=False)
  with pytest.raises(ValueError, match="nsa params must hold"):
    nsa_lib.nsa({"w_q": p["w_q"]}, x)
  with pytest.raises(NotImplementedError, match="takes no extra mask"):
    nsa_lib.nsa(p, x, mask=CausalMask())
  with pytest.raises(ValueError, match="nsa_block must be an int >= 1"):
    nsa_lib.init_nsa(rng, d_model=16, num_heads=4, nsa_block=0)


def test_sequence_shorter_than_a_block(rng):
  """No complete block yet: the compressed branch is 0; the others still run."""
  p = _params(rng, D=16, N=2, K=1, block=8)
  x = normal(jax.random.fold_in(rng, 1), (1, 5, 16), jnp.float32)
  y, aux = nsa_lib.nsa(p, x, nsa_top_n=2, nsa_window=3, return_aux=True)
  assert np.all(np.asarray(aux["branches"][0]) == 0.0)
  assert np.all(np.isfinite(np.asarray(y)))
