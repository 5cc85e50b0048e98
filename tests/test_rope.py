"""Rotary position embedding: the rotation against an explicit oracle, the catalog's checks
(relative positions only, r = 0 equals no encoding, decode equals prefill), layouts,
implementations, dtypes and one test per validation message.

Tolerances: float64 checks are exact up to rounding (1e-10); float32 paths compare at
atol = rtol = 2e-5 (outputs) and 1e-4 (gradients), as in test_attention.py.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal

from attn_jax.attention import (
  CausalMask,
  apply_rope,
  dot_product_attention,
  rope_attention,
  rope_frequencies,
)

F32, F64 = jnp.float32, jnp.float64


def close(a, b, tol=2e-5):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def qkv(key, B=2, T=13, S=13, N=4, K=2, H=16, Hv=12, dtype=F32):
  kq, kk, kv = jax.random.split(key, 3)
  return (
    normal(kq, (B, T, N, H), dtype),
    normal(kk, (B, S, K, H), dtype),
    normal(kv, (B, S, K, Hv), dtype),
  )


def rope_numpy(x, positions, base, rotary_dim, layout):
  """The oracle: explicit 2x2 rotation matrices per pair, in float64 numpy loops."""
  x = np.asarray(x, np.float64)
  B, T, N, H = x.shape
  pos = np.broadcast_to(np.asarray(positions), (B, T))
  R = rotary_dim // 2
  out = x.copy()
  for j in range(R):
    theta = base ** (-2.0 * j / rotary_dim)
    a, b = (2 * j, 2 * j + 1) if layout == "interleaved" else (j, j + R)
    for bi in range(B):
      for t in range(T):
        ang = pos[bi, t] * theta
        rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
        pair = np.stack([x[bi, t, :, a], x[bi, t, :, b]])  # [2, N]
        out[bi, t, :, a], out[bi, t, :, b] = rot @ pair
  return out


def half_to_interleaved(H, rotary_dim):
  """Head-dim permutation p with interleaved(x[..., p]) == half(x)[..., p]."""
  R = rotary_dim // 2
  return np.concatenate(
    [np.stack([np.arange(R), np.arange(R) + R], 1).ravel(), np.arange(2 * R, H)]
  )


def logits(q_pos, k_pos, q, k, **kw):
  """Rotated q·k for q [B, T, N, H], k [B, S, N, H] -> [B, N, T, S]."""
  qr, kr = apply_rope(q, q_pos, **kw), apply_rope(k, k_pos, **kw)
  return jnp.einsum("btnh,bsnh->bnts", qr, kr)


# ------------------------------------------------------------------------------------------
# The rotation.
# ------------------------------------------------------------------------------------------


def test_frequencies():
  theta = rope_frequencies(8, 500.0)
  assert theta.shape == (4,) and theta.dtype == F32
  close(theta, [500.0 ** (-2 * j / 8) for j in range(4)], 1e-7)
  assert rope_frequencies(0).shape == (0,)
  close(rope_frequencies(6, dtype=F64), 10000.0 ** (-np.arange(3) * 2 / 6), 1e-15)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("rotary_dim", [None, 8, 2])
@pytest.mark.parametrize("batched_positions", [False, True])
def test_apply_rope_equals_explicit_rotation(rng, layout, rotary_dim, batched_positions):
  kx, kp = jax.random.split(rng)
  x = normal(kx, (2, 7, 3, 12), F64)
  shape = (2, 7) if batched_positions else (7,)
  positions = jax.random.randint(kp, shape, -50, 3000)
  out = apply_rope(x, positions, base=1000.0, rotary_dim=rotary_dim, layout=layout)
  assert out.shape == x.shape and out.dtype == x.dtype
  close(out, rope_numpy(x, positions, 1000.0, rotary_dim or 12, layout), 1e-10)
  if rotary_dim is not None:  # partial rotary: the tail passes through bit for bit
    np.testing.assert_array_equal(
      np.asarray(out[..., rotary_dim:]), np.asarray(x[..., rotary_dim:])
    )


def test_rotation_preserves_norms(rng):
  kx, kp = jax.random.split(rng)
  x = normal(kx, (2, 9, 4, 16), F32)
  positions = jax.random.randint(kp, (2, 9), 0, 10_000)
  for layout in ("half", "interleaved"):
    out = apply_rope(x, positions, layout=layout)
    close(jnp.linalg.norm(out, axis=-1), jnp.linalg.norm(x, axis=-1), 1e-5)
    assert not np.allclose(np.asarray(out), np.asarray(x), atol=1e-2)  # it does rotate


def test_position_zero_is_identity_and_gradient_is_inverse_rotation(rng):
  kx, kc, kp = jax.random.split(rng, 3)
  x = normal(kx, (2, 6, 2, 8), F64)
  close(apply_rope(x, jnp.zeros((6,), jnp.int32)), x, 1e-15)
  # R_mᵀ = R_{−m}: the vjp of the rotation rotates the cotangent back.
  cot = normal(kc, x.shape, F64)
  positions = jax.random.randint(kp, (2, 6), 0, 500)
  g = jax.grad(lambda x: jnp.sum(apply_rope(x, positions, layout="interleaved") * cot))(x)
  close(g, apply_rope(cot, -positions, layout="interleaved"), 1e-10)


# ------------------------------------------------------------------------------------------
# The catalog's check: logits depend only on i − j.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_logits_depend_only_on_relative_position(rng, layout):
  kq, kk = jax.random.split(rng)
  H = 16
  q = normal(kq, (1, 1, 1, H), F64)
  k = normal(kk, (1, 1, 1, H), F64)
  P = 12
  pos = jnp.arange(P)
  # The same q at every position m and the same k at every position n.
  L = logits(pos, pos, jnp.tile(q, (1, P, 1, 1)), jnp.tile(k, (1, P, 1, 1)), layout=layout)
  L = np.asarray(L[0, 0])  # [m, n]
  # Toeplitz: L[m, n] == L[m + c, n + c], and it equals the complex-form formula in m − n.
  R = H // 2
  theta = 10000.0 ** (-2.0 * np.arange(R) / H)
  qn, kn = np.asarray(q[0, 0, 0]), np.asarray(k[0, 0, 0])
  if layout == "half":
    qc, kc = qn[:R] + 1j * qn[R:], kn[:R] + 1j * kn[R:]
  else:
    qc, kc = qn[0::2] + 1j * qn[1::2], kn[0::2] + 1j * kn[1::2]
  for m in range(P):
    for n in range(P):
      want = np.real(np.sum(qc * np.conj(kc) * np.exp(1j * (m - n) * theta)))
      np.testing.assert_allclose(L[m, n], want, atol=1e-10, rtol=1e-10)
  close(L[1:, 1:], L[:-1, :-1], 1e-10)
  assert not np.allclose(L[0, 1], L[0, 2])  # different offsets give different logits


def test_shifting_all_positions_changes_nothing(rng):
  kq, kk, kp, ks = jax.random.split(rng, 4)
  q = normal(kq, (2, 9, 4, 16), F64)
  k = normal(kk, (2, 11, 4, 16), F64)
  q_pos = jax.random.randint(kp, (2, 9), 0, 200)
  k_pos = jax.random.randint(ks, (2, 11), 0, 200)
  base_logits = logits(q_pos, k_pos, q, k, rotary_dim=12)
  for c in (1, 37, 100_000):
    close(logits(q_pos + c, k_pos + c, q, k, rotary_dim=12), base_logits, 1e-8)
  # Shifting only the queries moves i − j and changes the logits.
  assert not np.allclose(np.asarray(logits(q_pos + 3, k_pos, q, k)), np.asarray(base_logits))

  q, k, v = qkv(rng, T=9, S=11, dtype=F64)
  for impl in ("reference", "xla"):
    out = rope_attention(q, k, v, mask=CausalMask(), implementation=impl)
    shifted = rope_attention(
      q,
      k,
      v,
      q_positions=jnp.arange(9) + 2 + 1000,
      kv_positions=jnp.arange(11) + 1000,
      mask=CausalMask(),
      implementation=impl,
    )
    close(shifted, out, 1e-10)
    moved = rope_attention(q, k, v, q_positions=jnp.arange(9), mask=CausalMask())
    assert not np.allclose(np.asarray(moved), np.asarray(out), atol=1e-3)


def test_shift_invariance_in_float32(rng):
  """float32 angles at large positions lose a little; the shift still changes nothing at
  a loose tolerance."""
  q, k, v = qkv(rng, T=9, S=9, dtype=F32)
  out = rope_attention(q, k, v, mask=CausalMask())
  shifted = rope_attention(
    q, k, v, q_positions=jnp.arange(9) + 500, kv_positions=jnp.arange(9) + 500, mask=CausalMask()
  )
  close(shifted, out, 2e-3)


# ------------------------------------------------------------------------------------------
# r = 0, layouts, decoding.
# ------------------------------------------------------------------------------------------


def test_rotary_dim_zero_equals_no_positional_encoding(rng):
  q, k, v = qkv(rng)
  np.testing.assert_array_equal(np.asarray(apply_rope(q, jnp.arange(13), rotary_dim=0)), q)
  for mask in (None, CausalMask()):
    for impl in ("reference", "xla"):
      np.testing.assert_array_equal(
        np.asarray(rope_attention(q, k, v, rotary_dim=0, mask=mask, implementation=impl)),
        np.asarray(dot_product_attention(q, k, v, mask=mask, implementation=impl)),
      )
  # And a non-zero rotary dim does change the output.
  assert not np.allclose(
    np.asarray(rope_attention(q, k, v)), np.asarray(dot_product_attention(q, k, v))
  )


@pytest.mark.parametrize("rotary_dim", [16, 10])
def test_half_and_interleaved_agree_after_permuting_the_head_dim(rng, rotary_dim):
  q, k, v = qkv(rng, dtype=F64)
  perm = half_to_interleaved(16, rotary_dim)
  positions = jnp.arange(13) * 7
  half = apply_rope(q, positions, rotary_dim=rotary_dim, layout="half")
  inter = apply_rope(q[..., perm], positions, rotary_dim=rotary_dim, layout="interleaved")
  close(inter, half[..., perm], 1e-12)
  # The logits (and so the attention) are invariant to a joint permutation of q and k.
  close(
    rope_attention(q[..., perm], k[..., perm], v, rotary_dim=rotary_dim, layout="interleaved"),
    rope_attention(q, k, v, rotary_dim=rotary_dim, layout="half"),
    1e-10,
  )
  # Without the permutation the layouts differ.
  assert not np.allclose(
    np.asarray(apply_rope(q, positions, layout="interleaved")),
    np.asarray(apply_rope(q, positions, layout="half")),
  )


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_decode_and_chunked_prefill_equal_the_full_computation(rng, layout):
  T = 17
  q, k, v = qkv(rng, T=T, S=T)
  kw = dict(mask=CausalMask(), layout=layout, rotary_dim=12)
  full = rope_attention(q, k, v, **kw)
  # Decoding the last query against the full cache (default positions, bottom-right aligned).
  last = rope_attention(q[:, -1:], k, v, **kw)
  close(last[:, 0], full[:, -1])
  # Every step t against the cache so far, and a chunk of queries [5, 12).
  for t in (0, 6, T - 1):
    step = rope_attention(q[:, t : t + 1], k[:, : t + 1], v[:, : t + 1], **kw)
    close(step[:, 0], full[:, t])
  chunk = rope_attention(q[:, 5:12], k[:, :12], v[:, :12], **kw)
  close(chunk, full[:, 5:12])
  # Explicit positions give the same answer as the defaults.
  explicit = rope_attention(
    q[:, -1:], k, v, q_positions=jnp.full((2, 1), T - 1), kv_positions=jnp.arange(T), **kw
  )
  close(explicit, last, 0)


# ------------------------------------------------------------------------------------------
# Implementations, gradients, dtypes.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_xla_equals_reference_forward_and_gradients(rng, causal):
  kc, kx = jax.random.split(rng)
  q, k, v = qkv(kx, T=21, S=30)
  cot = normal(kc, (2, 21, 4, 12), F32)
  mask = CausalMask() if causal else None

  def loss_and_grads(impl, q, k, v):
    def loss(q, k, v):
      out = rope_attention(q, k, v, mask=mask, rotary_dim=10, implementation=impl)
      return jnp.sum(out.astype(cot.dtype) * cot)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

  val, grads = loss_and_grads("xla", q, k, v)
  val_ref, grads_ref = loss_and_grads("reference", q, k, v)
  close(val, val_ref, 1e-4)
  for g, g_ref in zip(grads, grads_ref, strict=True):
    close(g, g_ref, 1e-4)
  # Against the float64 oracle as well.
  val64, grads64 = loss_and_grads("reference", *(x.astype(F64) for x in (q, k, v)))
  close(val, val64, 1e-4)
  for g, g64 in zip(grads, grads64, strict=True):
    close(g, g64, 1e-4)
  close(
    rope_attention(q, k, v, mask=mask, implementation="xla"),
    rope_attention(q, k, v, mask=mask, implementation="reference"),
  )
  # float64 end to end: the two implementations agree to rounding.
  q64, k64, v64 = (x.astype(F64) for x in (q, k, v))
  _, g_x = loss_and_grads("xla", q64, k64, v64)
  for g, g64 in zip(g_x, grads64, strict=True):
    close(g, g64, 1e-10)


def test_bf16_keeps_bf16(rng):
  q, k, v = qkv(rng, dtype=jnp.bfloat16)
  assert apply_rope(q, jnp.arange(13)).dtype == jnp.bfloat16
  out, lse = rope_attention(q, k, v, mask=CausalMask(), return_lse=True)
  assert out.dtype == jnp.bfloat16 and lse.dtype == F32
  ref = rope_attention(*(x.astype(F32) for x in (q, k, v)), mask=CausalMask())
  close(out, ref, 2e-2)


def test_jit_with_traced_positions(rng):
  q, k, v = qkv(rng)
  fn = jax.jit(lambda q, k, v, qp, kp: rope_attention(q, k, v, q_positions=qp, kv_positions=kp))
  close(fn(q, k, v, jnp.arange(13), jnp.arange(13)), rope_attention(q, k, v))


# ------------------------------------------------------------------------------------------
# Validation: one test per message.
# ------------------------------------------------------------------------------------------

X = jnp.zeros((2, 5, 3, 8), F32)
Q, K_, V = jnp.zeros((2, 5, 4, 8), F32), jnp.zeros((2, 7, 2, 8), F32), jnp.zeros((2, 7, 2, 6), F32)

BAD_APPLY_ROPE = {
  "layout": (dict(layout="neox"), "layout must be one of ('half', 'interleaved'); got 'neox'"),
  "odd rotary_dim": (
    dict(rotary_dim=5),
    "rotary_dim must be even (dims are rotated in pairs); got 5",
  ),
  "rotary_dim > H": (dict(rotary_dim=10), "rotary_dim must be <= the head dim H=8; got 10"),
  "negative rotary_dim": (dict(rotary_dim=-2), "rotary_dim must be >= 0; got -2"),
  "rotary_dim type": (dict(rotary_dim=4.0), "rotary_dim must be an int or None; got float"),
  "positions length": (
    dict(positions=jnp.arange(4)),
    "positions must have shape [B, T] = (2, 5) or [T] = (5,); got shape (4,)",
  ),
  "positions batch": (
    dict(positions=jnp.zeros((3, 5), jnp.int32)),
    "positions must have shape [B, T] = (2, 5) or [T] = (5,); got shape (3, 5)",
  ),
  "positions dtype": (
    dict(positions=jnp.arange(5.0)),
    "positions must have an integer dtype; got float",
  ),
  "base": (dict(base=-1.0), "base must be finite and > 0; got -1.0"),
  "base type": (dict(base="10000"), "base must be a Python float > 0; got str"),
  "x rank": (dict(x=X[0]), "x must have rank 4 with layout [B, T, N, H]; got shape (5, 3, 8)"),
  "x dtype": (dict(x=X.astype(jnp.int32)), "x must have a floating dtype; got int32"),
}


@pytest.mark.parametrize("case", sorted(BAD_APPLY_ROPE))
def test_apply_rope_bad_input(case):
  changes, message = BAD_APPLY_ROPE[case]
  args = dict(x=X, positions=jnp.arange(5))
  args.update(changes)
  with pytest.raises(ValueError, match=re.escape(message)):
    apply_rope(args.pop("x"), args.pop("positions"), **args)


BAD_ROPE_ATTENTION = {
  "q_positions": (
    dict(q_positions=jnp.arange(7)),
    "q_positions must have shape [B, T] = (2, 5) or [T] = (5,); got shape (7,)",
  ),
  "kv_positions": (
    dict(kv_positions=jnp.zeros((2, 5), jnp.int32)),
    "kv_positions must have shape [B, S] = (2, 7) or [S] = (7,); got shape (2, 5)",
  ),
  "rotary_dim > H": (dict(rotary_dim=16), "rotary_dim must be <= the head dim H=8; got 16"),
  "layout": (dict(layout="Half"), "layout must be one of ('half', 'interleaved'); got 'Half'"),
  "q/k head dim": (
    dict(k=jnp.zeros((2, 7, 2, 6), F32)),
    "q and k must share the head dim H; got q H=8, k H=6",
  ),
  "option passed through": (dict(scale=0.0), "scale must be finite and non-zero; got 0.0"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROPE_ATTENTION))
def test_rope_attention_bad_input(case):
  changes, message = BAD_ROPE_ATTENTION[case]
  args = dict(q=Q, k=K_, v=V)
  args.update(changes)
  with pytest.raises(ValueError, match=re.escape(message)):
    rope_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_rope_frequencies_bad_input():
  with pytest.raises(ValueError, match=re.escape("rotary_dim must be even")):
    rope_frequencies(7)
  with pytest.raises(ValueError, match=re.escape("base must be finite and > 0; got 0.0")):
    rope_frequencies(8, 0.0)
