"""The GPU (Pallas Triton) flash kernel: interpret mode vs the oracle, and the CUDA lowering.

This machine has no GPU, so correctness runs the kernel bodies in Pallas interpret mode
(``interpret=True``) and the real GPU path is checked by lowering for CUDA
(``jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))``): the jaxpr → Triton IR
lowering runs, and each emitted Triton module is parsed back and passes the MLIR verifier
(types, power-of-two tensor sizes). Triton's own compilation to PTX is not exercised.

Tolerances (written once, never loosened to pass), against the float64 oracle on the same
inputs:
  float32: outputs and lse atol = rtol = 2e-5, gradients 1e-4.
  bfloat16 (fp32 accumulation; p and ds rounded to bf16 before their matmuls): outputs
  atol = rtol = 2e-2, gradients 4e-2.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.attention import (
  CausalMask,
  ChunkedCausalMask,
  LocalMask,
  PrefixLMMask,
  SegmentMask,
  attention_reference,
)
from attn_jax.attention.kernel_mask import lower
from pallas_kernels import _blocks
from pallas_kernels.flash_gpu import flash_attention

TOL = {
  jnp.float32: dict(out=2e-5, grad=1e-4),
  jnp.bfloat16: dict(out=2e-2, grad=4e-2),
}
T, S = 200, 333  # awkward: not multiples of any block
# Interpret mode is bound by XLA:CPU compile time; skipping LLVM's expensive passes halves
# it and leaves the float32/float64 semantics of every op as they are.
FAST_COMPILE = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)


@dataclasses.dataclass(frozen=True)
class Case:
  mask: str = "none"
  B: int = 1
  N: int = 2
  K: int = 2
  H: int = 64
  Hv: int = 64
  block: tuple = (64, 64)  # (block_q, block_kv); None = the kernel's default
  bias: str | None = None  # which of "BNTS" are full, e.g. "NS" → [1, N, 1, S]
  softcap: float | None = None
  sinks: bool = False
  dtype: object = jnp.float32
  visits: bool = False  # also return (and check) the forward's visited-tile counts
  T: int = T
  S: int = S


CASES = {
  "full_bias": Case(bias="BNTS"),
  "causal_gqa2_softcap": Case("causal", N=4, K=2, Hv=32, block=(32, 64), softcap=5.0, bias="TS"),
  "local_mqa_sinks": Case("local", N=4, K=1, block=(16, 16), sinks=True),
  "chunked_h128": Case("chunked", N=4, K=2, H=128, Hv=128, bias="NS"),
  "prefix_h96": Case("prefix", N=2, K=1, H=96, Hv=64, block=(32, 64), softcap=3.0, bias="BT"),
  "prefix_per_example": Case("prefix_batched", B=2, sinks=True, bias="B"),
  "segment_causal": Case("segment_causal", B=2, N=4, K=2, block=(32, 64), bias="BNTS", visits=True),
  "causal_t_gt_s": Case("causal", N=2, K=1, T=S, S=T, sinks=True, block=(32, 32)),
  # Default blocks (clipped to 16), head dims 8 / 3 padded to 16, GQA 2.
  "tiny_defaults": Case("causal", N=2, K=1, H=8, Hv=3, T=5, S=7, block=(None, None)),
  "bf16_causal_everything": Case(
    "causal", N=4, K=2, softcap=5.0, sinks=True, bias="BNTS", dtype=jnp.bfloat16
  ),
}


def make_mask(name, gen, B, T, S):
  if name == "none":
    return None
  if name == "causal":
    return CausalMask()
  if name == "local":
    return LocalMask(40, 8)
  if name == "chunked":
    return ChunkedCausalMask(48)
  if name == "prefix":
    return PrefixLMMask(50)
  if name == "prefix_batched":
    return PrefixLMMask(jnp.array([5, 120][:B], jnp.int32))
  if name == "segment_causal":  # sorted ids in [1, 3] (packed documents), as the registry's
    q_ids = np.sort(gen.integers(1, 4, (B, T)), axis=-1)
    q_ids[:, -20:] = 0  # padding rows: fully masked
    kv_ids = np.sort(gen.integers(1, 4, (B, S)), axis=-1)
    return SegmentMask(jnp.asarray(q_ids, jnp.int32), jnp.asarray(kv_ids, jnp.int32)) & CausalMask()
  raise ValueError(name)


def make_inputs(case, key):
  """Random inputs from a numpy generator seeded by the test's key (eager jax.random would
  compile a sampler per shape, which costs more than the kernels here)."""
  gen = np.random.default_rng(np.asarray(jax.random.key_data(key)))
  B, N, K = case.B, case.N, case.K

  def normal(shape, dtype=jnp.float32):
    return jnp.asarray(gen.standard_normal(shape, np.float32)).astype(dtype)

  args = dict(
    q=normal((B, case.T, N, case.H), case.dtype),
    k=normal((B, case.S, K, case.H), case.dtype),
    v=normal((B, case.S, K, case.Hv), case.dtype),
  )
  if case.bias is not None:
    full = dict(B=B, N=N, T=case.T, S=case.S)
    args["bias"] = normal(tuple(full[d] if d in case.bias else 1 for d in "BNTS"))
  if case.sinks:
    args["sinks"] = jnp.asarray(2.0 * gen.standard_normal((N,), np.float32))
  mask = make_mask(case.mask, gen, B, case.T, case.S)
  cots = (normal((B, case.T, N, case.Hv)), normal((B, N, case.T)))
  return args, mask, cots


def kernel_fn(case, mask, interpret=True):
  """(args dict) -> (out, lse[, visits]) through the kernel, with the mask lowered."""
  km = lower(mask, case.B, case.T, case.S)

  def fn(args):
    return flash_attention(
      **args,
      block_kinds=km.block_kinds,
      mask_fn=km.mask_fn,
      q_operands=km.q_operands,
      kv_operands=km.kv_operands,
      softcap=case.softcap,
      return_lse=True,
      block_q=case.block[0],
      block_kv=case.block[1],
      interpret=interpret,
      debug_visits=case.visits,
    )

  return fn


def reference_fn(case, mask):
  def fn(args):
    args64 = {name: x.astype(jnp.float64) for name, x in args.items()}
    return attention_reference(**args64, mask=mask, softcap=case.softcap, return_lse=True)

  return fn


def value_and_grads(fn, args, cots):
  """Outputs (out, lse[, visits]) and the grads of <out, c_o> + <finite lse, c_l> for all."""

  def loss(args):
    outs = fn(args)
    out, lse = outs[:2]
    finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(out.astype(jnp.float64) * cots[0]) + jnp.sum(finite_lse * cots[1]), outs

  compiled = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(args)
  (_, outs), grads = compiled.compile(compiler_options=FAST_COMPILE)(args)
  return outs, grads


def assert_close(actual, expected, tol, what):
  actual = np.asarray(jnp.asarray(actual, jnp.float64))
  expected = np.asarray(expected, np.float64)
  np.testing.assert_allclose(actual, expected, atol=tol, rtol=tol, err_msg=what)


def check_case(case, key):
  args, mask, cots = make_inputs(case, key)
  outs, grads = value_and_grads(kernel_fn(case, mask), args, cots)
  (out_ref, lse_ref), grads_ref = value_and_grads(reference_fn(case, mask), args, cots)
  out, lse = outs[:2]
  tol = TOL[case.dtype]
  assert out.shape == (case.B, case.T, case.N, case.Hv) and out.dtype == case.dtype
  assert lse.shape == (case.B, case.N, case.T) and lse.dtype == jnp.float32
  assert_close(out, out_ref.astype(case.dtype), tol["out"], "out")
  np.testing.assert_array_equal(np.isinf(lse), np.isinf(lse_ref))
  finite = np.isfinite(np.asarray(lse_ref))
  assert_close(np.asarray(lse)[finite], np.asarray(lse_ref)[finite], tol["out"], "lse")
  for name in args:
    g = grads[name]
    assert g.shape == args[name].shape and g.dtype == args[name].dtype, name
    assert np.all(np.isfinite(np.asarray(g, np.float64))), f"d{name} not finite"
    assert_close(g, grads_ref[name], tol["grad"], f"d{name}")
  if case.visits:
    check_visits(case, mask, outs[2])
  return mask, out, lse, grads


def check_visits(case, mask, visits):
  """The forward computed exactly the non-empty tiles of the (finalised) block map."""
  bq, bk = case.block
  nQ, nK = -(-case.T // bq), -(-case.S // bk)
  kinds = np.asarray(jax.jit(lambda m: m.block_kinds(case.T, case.S, bq, bk))(mask))
  kinds = _blocks.finalize_kinds(kinds, case.B, case.S, bk)
  nonempty_BQ = np.broadcast_to((kinds[:, 0] != _blocks.EMPTY).sum(-1), (case.B, nQ))
  assert visits.shape == (case.B, case.N, nQ) and visits.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(visits), np.repeat(nonempty_BQ[:, None], case.N, 1))
  assert int(visits.sum()) < case.B * case.N * nQ * nK  # block skipping happened


@pytest.mark.parametrize("name", list(CASES))
def test_matches_oracle(rng, name):
  case = CASES[name]
  mask, out, lse, grads = check_case(case, rng)
  if name == "segment_causal":
    # Padding query rows (segment id 0) see no key: zeros, lse = -inf, zero finite grads.
    empty = ~np.asarray(mask.dense(case.T, case.S)).any(-1)  # [B, T]
    assert empty[:, -20:].all()
    out, lse = np.asarray(out), np.asarray(lse).transpose(0, 2, 1)
    assert np.all(out[empty] == 0.0)
    assert np.all(np.isneginf(lse[empty])) and np.all(np.isfinite(lse[~empty]))
    assert np.all(np.asarray(grads["q"])[empty] == 0.0)


# ------------------------------------------------------------------------------------------
# Block skipping.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_name", ["causal", "local"])
def test_block_skipping_visits(rng, mask_name):
  """Forward only; segment masks (per-example lists) are checked in test_matches_oracle."""
  case = Case(mask_name, B=2, N=2, K=1, block=(32, 32), visits=True)
  args, mask, _ = make_inputs(case, rng)
  fn = jax.jit(kernel_fn(case, mask)).lower(args)
  _, _, visits = fn.compile(compiler_options=FAST_COMPILE)(args)
  check_visits(case, mask, visits)


# ------------------------------------------------------------------------------------------
# Lowering for the real GPU (Triton), forward and backward, every case above.
# ------------------------------------------------------------------------------------------


def triton_modules(lowered):
  """(kernel name, verified?) of every Triton kernel in a lowered computation."""
  from jax._src.lib.mlir import ir
  from jax._src.pallas.triton import lowering as triton_lowering

  found = []

  def walk(op):
    op = op.operation
    if op.name == "stablehlo.custom_call" and "mhlo.backend_config" in op.attributes:
      config = ir.DictAttr(op.attributes["mhlo.backend_config"])
      if "ir" in config:
        found.append((ir.StringAttr(config["name"]).value, ir.StringAttr(config["ir"]).value_bytes))
    for region in op.regions:
      for block in region.blocks:
        for child in block.operations:
          walk(child)

  walk(lowered.compiler_ir("stablehlo").operation)
  verified = []
  context = triton_lowering._new_ir_context()
  for name, blob in found:
    with context:
      verified.append((name, ir.Module.parse(blob).operation.verify()))
  return verified


@pytest.mark.parametrize("name", list(CASES))
def test_lowers_for_cuda(rng, name):
  case = CASES[name]  # segment_causal lowers the debug_visits variant too
  args, mask, _ = make_inputs(case, rng)
  specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
  fn = kernel_fn(case, mask, interpret=False)
  forward = jax.jit(fn).trace(specs).lower(lowering_platforms=("cuda",))
  assert triton_modules(forward) == [("flash_gpu_fwd", True)]

  def loss(args):
    out, lse = fn(args)[:2]
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

  backward = jax.jit(jax.grad(loss)).trace(specs).lower(lowering_platforms=("cuda",))
  assert sorted(triton_modules(backward)) == [
    ("flash_gpu_dkdv", True),
    ("flash_gpu_dq", True),
    ("flash_gpu_fwd", True),
  ]


# ------------------------------------------------------------------------------------------
# Bad inputs: one test per documented error.
# ------------------------------------------------------------------------------------------


def small(dtype=jnp.float32, B=1, T=8, S=8, N=2, K=1, H=16, Hv=16):
  return (
    jnp.zeros((B, T, N, H), dtype),
    jnp.zeros((B, S, K, H), dtype),
    jnp.zeros((B, S, K, Hv), dtype),
  )


def call(*qkv, **kw):
  return flash_attention(*qkv, interpret=True, **kw)


@pytest.mark.parametrize(
  "qkv, kw, match",
  [
    ((jnp.zeros((8, 2, 16)),) + small()[1:], {}, "q must have rank 4"),
    (small(jnp.int32), {}, "q must be float32, bfloat16 or float16"),
    ((small()[0], small()[1].astype(jnp.bfloat16), small()[2]), {}, "must share a dtype"),
    ((small()[0], *small(B=2)[1:]), {}, "batch sizes differ"),
    ((small()[0], small(H=32)[1], small()[2]), {}, "k head dim 32 must equal q head dim 16"),
    ((*small()[:2], small(S=9)[2]), {}, "v shape"),
    (small(N=3, K=2), {}, "multiple of kv heads"),
    (small(), dict(block_q=24), "block_q must be a power of two >= 16"),
    (small(), dict(block_kv=8), "block_kv must be a power of two >= 16"),
    (small(), dict(bias=jnp.zeros((1, 2, 8, 4))), "bias shape"),
    (small(), dict(bias=jnp.zeros((1, 2, 8, 8), jnp.int32)), "bias must be a float array"),
    (small(), dict(sinks=jnp.zeros((3,))), "sinks must be a float array of shape"),
    (small(), dict(scale=float("nan")), "scale must be a finite"),
    (small(), dict(softcap=-1.0), "softcap must be a positive"),
    (small(), dict(mask_fn=3), "mask_fn must be callable"),
    (small(), dict(block_kinds="causal"), "block_kinds must be callable"),
    (small(), dict(block_kinds=lambda bq, bk: np.ones((3, 3), np.int8)), r"block_kinds\(16, 16\)"),
    (small(), dict(q_operands=jnp.zeros((1, 7, 1), jnp.int32)), "q_operands must be an int"),
    (small(), dict(kv_operands=jnp.zeros((1, 1, 8))), "kv_operands must be an int"),
  ],
)
def test_bad_inputs(qkv, kw, match):
  with pytest.raises(ValueError, match=match):
    call(*qkv, **kw)


# ------------------------------------------------------------------------------------------
# Larger grid (make test-slow).
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
  "mask_name", ["none", "causal", "local", "chunked", "prefix", "prefix_batched", "segment_causal"]
)
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("block", [(16, 16), (32, 64), (64, 64)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_oracle_grid(rng, mask_name, group, block, dtype):
  case = Case(
    mask_name, B=2, N=4, K=4 // group, block=block, dtype=dtype, bias="NTS", softcap=4.0, sinks=True
  )
  check_case(case, rng)


@pytest.mark.slow
@pytest.mark.parametrize("head_dims", [(32, 32), (64, 32), (80, 80), (128, 64), (256, 256)])
def test_head_dims(rng, head_dims):
  H, Hv = head_dims
  check_case(Case("causal", N=2, K=1, H=H, Hv=Hv, block=(32, 32)), rng)


@pytest.mark.slow
@pytest.mark.parametrize("bias", ["B", "N", "T", "S", "BN", "TS", "BS", "NT", "BNTS"])
def test_bias_broadcasts(rng, bias):
  check_case(Case("local", B=2, N=2, K=1, block=(32, 32), bias=bias), rng)


def test_mask_fn_without_block_kinds_is_applied(rng):
  """No block map but a predicate: every tile is treated as PARTIAL (never ignored)."""
  case = Case(mask="causal", T=40, S=70, block=(16, 32))
  args, mask, _ = make_inputs(case, rng)
  km = lower(mask, case.B, case.T, case.S)
  out = flash_attention(
    args["q"], args["k"], args["v"], mask_fn=km.mask_fn, block_q=16, block_kv=32, interpret=True
  )
  ref = attention_reference(*(args[n].astype(jnp.float64) for n in "qkv"), mask=mask)
  np.testing.assert_allclose(out, ref, atol=TOL[jnp.float32]["out"], rtol=TOL[jnp.float32]["out"])
