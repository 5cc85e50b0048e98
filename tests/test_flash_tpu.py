"""The TPU (Mosaic) Pallas flash kernel, ``pallas_kernels/flash_tpu.py``.

No TPU here: the kernels run under Pallas's TPU interpret mode
(``pltpu.force_tpu_interpret_mode()`` or ``interpret=pltpu.InterpretParams()``), which
simulates TPU memory semantics on CPU (uninitialised VMEM/HBM reads as NaN, so an output
block the kernel forgets to write shows up), forward and backward alike. That mode costs
~5 s of compile per configuration on 2 cores, so the two fast cases that skip no tile
(``mode="hlo"``: every output block is written, nothing for the simulator to catch) run
under the generic interpreter (``interpret=True``), forward and backward too. Separately every
configuration is lowered for the real TPU with ``interpret=False``
(``jit(f).trace(...).lower(lowering_platforms=("tpu",))``): Mosaic must accept the kernels.

Oracle: ``attention_reference`` in float64 on the same (float32 or bf16-rounded) inputs.
Tolerances (max abs error relative to the largest reference magnitude of that output):
  * float32 inputs: 2e-5 (observed ~5e-7; float32 accumulation over S ≤ 512 keys);
  * bfloat16 inputs: 3e-2 (p and ds are rounded to bf16 before the MXU-style matmuls, and
    the outputs are bf16: a few bf16 ulps, 2^-8 ≈ 4e-3 each).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from attn_jax.attention import kernel_mask
from attn_jax.attention import masks as masks_lib
from attn_jax.attention.reference import attention_reference
from pallas_kernels import _blocks, flash_tpu

F32_TOL = 2e-5
BF16_TOL = 3e-2


# ---------------------------------------------------------------------------------------
# Cases: (B, T, S, N, K, H, Hv), a mask builder, bias shape, sinks, softcap, blocks, dtype.
# ---------------------------------------------------------------------------------------


PAD_Q = 72


def _segments(rs, B, T, S, causal):
  """Random sorted segment ids in [1, 3] with a padding (id 0) tail: fully masked rows."""
  q_ids = np.sort(rs.integers(1, 4, (B, T)), axis=-1).astype(np.int32)
  kv_ids = np.sort(rs.integers(1, 4, (B, S)), axis=-1).astype(np.int32)
  q_ids[:, T - PAD_Q :] = 0  # padding queries see nothing (a whole 64-row q block)
  kv_ids[:, S - 5 :] = 0
  mask = masks_lib.SegmentMask(jnp.asarray(q_ids), jnp.asarray(kv_ids))
  return mask & masks_lib.CausalMask() if causal else mask


MASKS = {
  "none": lambda rs, B, T, S: None,
  "causal": lambda rs, B, T, S: masks_lib.CausalMask(),
  "local": lambda rs, B, T, S: masks_lib.LocalMask(60, 0),
  "local_2sided": lambda rs, B, T, S: masks_lib.LocalMask(40, 90),
  "chunked": lambda rs, B, T, S: masks_lib.ChunkedCausalMask(96),
  "prefix": lambda rs, B, T, S: masks_lib.PrefixLMMask(150),
  "prefix_batched": lambda rs, B, T, S: masks_lib.PrefixLMMask(
    jnp.array([30, 250, 5][:B], jnp.int32)
  ),
  "segment": lambda rs, B, T, S: _segments(rs, B, T, S, causal=False),
  "segment_causal": lambda rs, B, T, S: _segments(rs, B, T, S, causal=True),
  "local_or_prefix": lambda rs, B, T, S: masks_lib.LocalMask(30, 0) | masks_lib.PrefixLMMask(20),
  "chunked_or_local": lambda rs, B, T, S: (
    masks_lib.ChunkedCausalMask(96) | masks_lib.LocalMask(40, 0)
  ),
}


def _case(
  mask="none",
  dims=(1, 200, 333, 2, 1, 64, 64),
  bias=None,
  sinks=False,
  softcap=None,
  blocks=(128, 128),
  dtype=jnp.float32,
  mode="tpu",
):
  return dict(
    mask=mask,
    dims=dims,
    bias=bias,
    sinks=sinks,
    softcap=softcap,
    blocks=blocks,
    dtype=dtype,
    mode=mode,
  )


# Fast grid (each case ≈ 5 s of compile in TPU interpret mode, so few and dense): every
# option at least once: masks none / causal / local | chunked / static prefix / per-example
# prefix / segment & causal with padding; GQA 1 (N=K), 2, 4, MQA; ragged T=200, S=333;
# blocks (128,256), (64,128), (128,128), (8,128); softcap, sinks, bias broadcasts
# [1,N,1,S] [1,1,T,S] [1,N,T,S] [B,1,1,1] [B,1,T,1]; H=96/Hv=64, H=128/Hv=32; bf16; fully
# masked rows and a fully masked q block.
FAST = {
  "none_gqa2_softcap_bias_1N1S": _case(
    dims=(1, 200, 333, 4, 2, 64, 64),
    bias=(1, 4, 1, 333),
    softcap=2.0,
    blocks=(128, 256),
    mode="hlo",
  ),
  "causal_mqa_sinks_bias_11TS": _case(
    "causal", (1, 200, 333, 2, 1, 64, 64), bias=(1, 1, 200, 333), sinks=True, blocks=(64, 128)
  ),
  "chunked_or_local_gqa4_bias_1NTS": _case(
    "chunked_or_local", (1, 200, 333, 4, 1, 64, 64), bias=(1, 4, 200, 333)
  ),
  "prefix_batched_h96_hv64": _case(
    "prefix_batched", (2, 200, 333, 2, 2, 96, 64), bias=(2, 1, 1, 1), sinks=True
  ),
  "segment_causal_padding": _case(
    "segment_causal", (2, 200, 333, 2, 1, 64, 64), bias=(2, 1, 200, 1), blocks=(64, 128)
  ),
  "prefix_bq8_h128_hv32": _case("prefix", (1, 40, 150, 2, 1, 128, 32), blocks=(8, 128), mode="hlo"),
  "bf16_causal_softcap_sinks": _case(
    "causal",
    (1, 200, 333, 2, 1, 64, 64),
    sinks=True,
    softcap=3.0,
    dtype=jnp.bfloat16,
    bias=(1, 2, 200, 333),
  ),
}

SLOW = {
  "causal_gqa2_512": _case("causal", (1, 512, 512, 4, 2, 64, 64), blocks=(128, 256)),
  "local_mqa_bq64": _case("local", (1, 300, 300, 4, 1, 64, 64), blocks=(64, 128), sinks=True),
  "local_2sided_softcap": _case(
    "local_2sided", (1, 200, 333, 2, 2, 64, 64), softcap=2.0, blocks=(128, 256)
  ),
  "chunked_bias_full": _case("chunked", (2, 200, 333, 2, 1, 64, 64), bias=(2, 2, 200, 333)),
  "segment_nocausal": _case("segment", (2, 200, 333, 2, 2, 64, 64), softcap=4.0),
  "prefix_static_bias": _case("prefix", (1, 200, 333, 2, 1, 64, 128), bias=(1, 1, 1, 333)),
  "local_or_prefix_bq8": _case("local_or_prefix", (1, 200, 200, 2, 1, 64, 64), blocks=(8, 128)),
  "bf16_segment_gqa2_h128": _case(
    "segment_causal", (2, 200, 333, 4, 2, 128, 128), dtype=jnp.bfloat16
  ),
  "default_blocks_causal": _case("causal", (1, 600, 700, 2, 1, 64, 64), blocks=(None, None)),
}


def _normal(rs, shape, dtype):
  return jnp.asarray(rs.standard_normal(shape, np.float32)).astype(dtype)


def _inputs(key, case):
  """Inputs from numpy's generator seeded by the test's key (no per-shape jax compiles)."""
  rs = np.random.default_rng(np.asarray(jax.random.key_data(key)))
  B, T, S, N, K, H, Hv = case["dims"]
  dtype = case["dtype"]
  q = _normal(rs, (B, T, N, H), dtype)
  k = _normal(rs, (B, S, K, H), dtype)
  v = _normal(rs, (B, S, K, Hv), dtype)
  bias = None if case["bias"] is None else _normal(rs, case["bias"], dtype)
  sinks = _normal(rs, (N,), jnp.float32) if case["sinks"] else None
  mask = MASKS[case["mask"]](rs, B, T, S)
  dout = _normal(rs, (B, T, N, Hv), jnp.float32)
  dlse = _normal(rs, (B, N, T), jnp.float32)
  return (q, k, v, bias, sinks), mask, (dout, dlse)


def _kernel_fn(case, mask, B, T, S, interpret=False):
  lowered = kernel_mask.lower(mask, B, T, S)
  bq, bk = case["blocks"]

  def f(q, k, v, bias, sinks):
    return flash_tpu.flash_attention(
      q,
      k,
      v,
      block_kinds=lowered.block_kinds,
      mask_fn=lowered.mask_fn,
      q_operands=lowered.q_operands,
      kv_operands=lowered.kv_operands,
      bias=bias,
      sinks=sinks,
      softcap=case["softcap"],
      return_lse=True,
      block_q=bq,
      block_kv=bk,
      interpret=interpret,
    )

  return f


def _ref_fn(case, mask):
  def f(q, k, v, bias, sinks):
    return attention_reference(
      q, k, v, mask=mask, bias=bias, sinks=sinks, softcap=case["softcap"], return_lse=True
    )

  return f


def _value_and_grads(f, args, cotangents):
  """(out, lse, grads of every float input) for loss = Σ out·dO + Σ finite(lse)·dlse."""
  dout, dlse = cotangents
  diff = tuple(i for i, a in enumerate(args) if a is not None)

  def loss(*xs):
    full = list(args)
    for i, x in zip(diff, xs, strict=True):
      full[i] = x
    out, lse = f(*full)
    lse_term = jnp.where(jnp.isfinite(lse), lse, 0.0) * dlse.astype(lse.dtype)
    total = (out.astype(dout.dtype) * dout).sum() + lse_term.sum()
    return total, (out, lse)

  grads, (out, lse) = jax.jit(jax.grad(loss, argnums=tuple(range(len(diff))), has_aux=True))(
    *(args[i] for i in diff)
  )
  return out, lse, grads


def _assert_close(name, got, want, tol):
  got = np.asarray(jnp.asarray(got, jnp.float64))
  want = np.asarray(want, np.float64)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  assert np.all(np.isfinite(got) == np.isfinite(want)), f"{name}: finite pattern differs"
  finite = np.isfinite(want)
  assert np.array_equal(got[~finite], want[~finite]), f"{name}: non-finite values differ"
  scale = max(1.0, float(np.abs(want[finite]).max(initial=0.0)))
  err = float(np.abs(got[finite] - want[finite]).max(initial=0.0))
  assert err <= tol * scale, f"{name}: max abs error {err:.3g} > {tol:g} x {scale:.3g}"


def _check_case(rng, case):
  B, T, S = case["dims"][:3]
  args, mask, cots = _inputs(rng, case)
  if case["mode"] == "tpu":
    with pltpu.force_tpu_interpret_mode():
      out, lse, grads = _value_and_grads(_kernel_fn(case, mask, B, T, S), args, cots)
  else:  # Pallas's generic (HLO) interpreter: same kernels, no TPU memory simulation
    f = _kernel_fn(case, mask, B, T, S, interpret=True)
    out, lse, grads = _value_and_grads(f, args, cots)
  args64 = tuple(None if a is None else a.astype(jnp.float64) for a in args)
  r_out, r_lse, r_grads = _value_and_grads(_ref_fn(case, mask), args64, cots)
  assert out.dtype == case["dtype"] and out.shape == r_out.shape
  assert lse.dtype == jnp.float32
  tol = F32_TOL if case["dtype"] == jnp.float32 else BF16_TOL
  _assert_close("out", out, r_out, tol)
  _assert_close("lse", lse, r_lse, tol)
  names = [
    n for n, a in zip(("dq", "dk", "dv", "dbias", "dsinks"), args, strict=True) if a is not None
  ]
  for name, g, rg in zip(names, grads, r_grads, strict=True):
    assert np.all(np.isfinite(np.asarray(g, np.float64))), f"{name} has non-finite values"
    _assert_close(name, g, rg, tol)
  return out, lse, grads


@pytest.mark.parametrize("name", list(FAST))
def test_matches_reference(rng, name):
  out, lse, grads = _check_case(rng, FAST[name])
  if FAST[name]["mask"] == "segment_causal":
    # The last PAD_Q queries carry the padding id: output exactly 0, lse -inf, zero dq.
    assert np.all(np.asarray(out[:, -PAD_Q:]) == 0)
    assert np.all(np.asarray(lse[:, :, -PAD_Q:]) == -np.inf)
    assert np.all(np.asarray(grads[0][:, -PAD_Q:]) == 0)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW))
def test_matches_reference_slow(rng, name):
  _check_case(rng, SLOW[name])


# ---------------------------------------------------------------------------------------
# Block skipping is real: the forward computes exactly the non-empty tiles.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "mask", [masks_lib.CausalMask(), masks_lib.LocalMask(100, 0)], ids=["causal", "local"]
)
def test_visits_only_nonempty_blocks(rng, mask):
  B, T, S, N, H, bq, bk = 1, 384, 384, 1, 64, 128, 128
  rs = np.random.default_rng(np.asarray(jax.random.key_data(rng)))
  q = _normal(rs, (B, T, N, H), jnp.float32)
  k, v = (_normal(rs, (B, S, 1, H), jnp.float32) for _ in range(2))
  lowered = kernel_mask.lower(mask, B, T, S)
  out, visits = flash_tpu.flash_attention(
    q,
    k,
    v,
    block_kinds=lowered.block_kinds,
    mask_fn=lowered.mask_fn,
    block_q=bq,
    block_kv=bk,
    interpret=pltpu.InterpretParams(),
    debug_visits=True,
  )
  kinds = np.asarray(mask.block_kinds(T, S, bq, bk))
  want = (kinds != _blocks.EMPTY).sum(-1)  # [nQ]
  assert visits.shape == (B, N, T // bq) and visits.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(visits), np.broadcast_to(want, visits.shape))
  assert want.sum() < kinds.size
  ref = attention_reference(*(x.astype(jnp.float64) for x in (q, k, v)), mask=mask)
  _assert_close("out", out, ref, F32_TOL)


def test_mask_fn_without_block_kinds_is_applied(rng):
  """No block map but a predicate: every tile is treated as PARTIAL (never ignored)."""
  B, T, S, N, H = 1, 40, 130, 2, 64
  rs = np.random.default_rng(np.asarray(jax.random.key_data(rng)))
  q = _normal(rs, (B, T, N, H), jnp.float32)
  k, v = (_normal(rs, (B, S, 1, H), jnp.float32) for _ in range(2))
  mask = masks_lib.CausalMask()
  lowered = kernel_mask.lower(mask, B, T, S)
  out = flash_tpu.flash_attention(
    q, k, v, mask_fn=lowered.mask_fn, block_q=8, block_kv=128, interpret=True
  )
  ref = attention_reference(*(x.astype(jnp.float64) for x in (q, k, v)), mask=mask)
  _assert_close("out", out, ref, F32_TOL)


# ---------------------------------------------------------------------------------------
# Mosaic accepts every configuration (lowered for TPU, interpret=False), forward and backward.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "name", list(FAST) + [pytest.param(n, marks=pytest.mark.slow) for n in SLOW]
)
def test_lowers_for_tpu(rng, name):
  case = {**FAST, **SLOW}[name]
  B, T, S = case["dims"][:3]
  args, mask, cots = _inputs(rng, case)
  f = _kernel_fn(case, mask, B, T, S, interpret=False)
  fwd = jax.jit(f).trace(*args).lower(lowering_platforms=("tpu",))
  assert "tpu_custom_call" in fwd.as_text()

  diff = tuple(i for i, a in enumerate(args) if a is not None)

  def loss(*xs):
    full = list(args)
    for i, x in zip(diff, xs, strict=True):
      full[i] = x
    out, lse = f(*full)
    return out.astype(jnp.float32).sum() + jnp.where(jnp.isfinite(lse), lse, 0.0).sum()

  grad = jax.grad(loss, argnums=tuple(range(len(diff))))
  bwd = jax.jit(grad).trace(*(args[i] for i in diff)).lower(lowering_platforms=("tpu",))
  text = bwd.as_text()
  assert text.count("tpu_custom_call") >= 3  # forward, dq, dk/dv kernels


# ---------------------------------------------------------------------------------------
# Bad inputs: one test per documented error.
# ---------------------------------------------------------------------------------------


def _qkv(B=1, T=16, S=16, N=2, K=1, H=64, Hv=64, dtype=jnp.float32):
  return (
    jnp.zeros((B, T, N, H), dtype),
    jnp.zeros((B, S, K, H), dtype),
    jnp.zeros((B, S, K, Hv), dtype),
  )


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(block_q=12), "block_q must be a multiple of 8"),
    (dict(block_kv=64), "block_kv must be a multiple of 128"),
    (dict(block_q=0), "block_q must be a positive int"),
    (dict(block_kv=128.0), "block_kv must be a positive int"),
    (dict(bias=jnp.zeros((1, 3, 16, 16))), r"bias dims must each be 1 or the full size"),
    (dict(bias=jnp.zeros((16, 16))), "bias must be a dense 4-d"),
    (dict(bias=jnp.zeros((1, 1, 16, 16), jnp.int32)), "bias must be a float array"),
    (dict(sinks=jnp.zeros((3,))), r"sinks must have shape \[N\]"),
    (dict(sinks=jnp.zeros((2,), jnp.int32)), "sinks must be a float array"),
    (dict(softcap=0.0), "softcap must be a positive number"),
    (dict(q_operands=jnp.zeros((1, 15, 1), jnp.int32)), r"q_operands must have shape \[B, T, Cq\]"),
    (dict(kv_operands=jnp.zeros((1, 16), jnp.int32)), "kv_operands must be a 3-d"),
    (dict(q_operands=jnp.zeros((1, 16, 1))), "q_operands must be an integer array"),
    (dict(block_kinds=lambda bq, bk: np.full((2, 2), 2, np.int8)), r"block_kinds\(16, 128\)"),
  ],
)
def test_bad_options(kwargs, match):
  with pytest.raises(ValueError, match=match):
    flash_tpu.flash_attention(*_qkv(), **kwargs)


@pytest.mark.parametrize(
  "shapes, match",
  [
    (dict(N=3, K=2), "multiple of kv heads"),
    (dict(dtype=jnp.float16), "q must be float32 or bfloat16"),
  ],
)
def test_bad_qkv(shapes, match):
  with pytest.raises(ValueError, match=match):
    flash_tpu.flash_attention(*_qkv(**shapes))


def test_bad_qkv_shapes():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="q must be a 4-d array"):
    flash_tpu.flash_attention(q[0], k, v)
  with pytest.raises(ValueError, match="q and k must share the head dim"):
    flash_tpu.flash_attention(q, k[..., :32], v)
  with pytest.raises(ValueError, match="must share B, S, K"):
    flash_tpu.flash_attention(q, k, v[:, :8])
  with pytest.raises(ValueError, match="must share a dtype"):
    flash_tpu.flash_attention(q, k, v.astype(jnp.bfloat16))


def test_default_blocks():
  assert flash_tpu._block_sizes(200, 333, None, None) == (256, 384)
  assert flash_tpu._block_sizes(20, 33, None, None) == (24, 128)
  assert flash_tpu._block_sizes(4096, 4096, None, None) == (512, 512)
