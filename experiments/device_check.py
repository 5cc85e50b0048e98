r"""The Pallas kernels on a lent accelerator, in one prepared run: compiled correctness first,
then timings, sized to fit a short device lease.

  PYTHONPATH=. python3 experiments/device_check.py --out=$OUT      # on a GPU or TPU machine
  make device-check                                                # the same
  .venv/bin/python experiments/device_check.py --interpret --quick # this CPU, tiny shapes
  .venv/bin/python experiments/device_check.py --lower=cuda        # lower every call only

It needs only jax, numpy and the repository (no install: ``PYTHONPATH=.`` and the machine's
own jax). The backend is the default device's (``--backend`` overrides); ``--interpret``
runs the kernels in Pallas interpret mode instead (the TPU kernels through
``implementation="pallas_interpret"``), and ``--lower=cuda|tpu`` only lowers every kernel
call of the full run, at its real sizes, for that platform (each must contain a Pallas
kernel call): that is how ``make test`` keeps this script working on a machine without an
accelerator, so that a lease is not spent on a call that cannot compile.

1. Correctness, each case on fresh random inputs (never zeros), forward and the gradients
   of Σ out·w (w random) against a float64 oracle evaluated on the host CPU:
   * the flash kernel through ``dot_product_attention(implementation="pallas_gpu" |
     "pallas_tpu")`` against ``implementation="reference"``: causal, GQA, sliding window
     with sinks, softcap with a dense bias, ragged cross attention, packed segments, a
     block-sparse mask (the block-sparse kernel); float32 and bfloat16;
   * the block-sparse kernel called directly with random per-head lists (empty rows
     included) against ``attention_reference`` under the lists' dense mask (out and lse);
   * the chunked linear and delta-rule kernels against their token-scan references.
   Error = ‖fast − oracle‖ / ‖oracle‖ per array; a case passes when every array is finite
   where the oracle is and under the tolerance of its dtype (float32 1e-4: the kernels ask
   for full-precision float32 dots, so a TF32 fallback, ~3e-4, fails; bfloat16 2e-2).
2. Timings (median of batches of calls, each batch synchronised, compilation excluded):
   * dense causal attention, forward and forward+backward: the flash kernel against the
     XLA paths on the same device (``jax.nn.dot_product_attention`` with XLA's own
     implementation and, on GPU, cuDNN's; attn_jax's blocked ``"xla"`` path), with the
     kernel's achieved TFLOP/s;
   * block-sparse attention (``bench_sparse.random_block_sparse`` patterns, 128-token
     blocks) at densities 1/2 … 1/32 against the dense causal kernel: realised speedup and
     realised / ideal (ideal = causal tiles / sparse tiles), as ``bench_sparse.py``;
   * the dense causal kernel at ``--tiles_t`` with its default tiles and four other
     (block_q, block_kv) pairs, to choose the defaults on that hardware.
   Each section stops starting new cases when ``--budget_s`` is spent (they are listed as
   skipped); a case that fails is recorded with its error and the run goes on.

Writes ``<out>/device_check.json`` and ``<out>/device_check.md`` and prints the tables.
"""

import argparse
import functools
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from attn_jax.attention import (
  CausalMask,
  SegmentMask,
  attention_reference,
  dot_product_attention,
  sliding_window,
)
from attn_jax.attention.delta import delta_rule_attention
from attn_jax.attention.linear import linear_attention
from pallas_kernels import block_sparse

RESULTS = Path(__file__).resolve().parent / "results" / "device_check"
SECTIONS = ("correctness", "dense", "sparse", "tiles")
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
KERNEL = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}
# What a lowered Pallas kernel call is named in StableHLO, per lowering platform.
KERNEL_CALLS = {"cuda": ("__gpu$xla.gpu.triton", "mosaic_gpu"), "tpu": ("tpu_custom_call",)}


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--backend", choices=("auto", "gpu", "tpu"), default="auto")
  p.add_argument("--interpret", action="store_true", help="Pallas interpret mode (no device)")
  p.add_argument(
    "--lower",
    choices=("cuda", "tpu"),
    help="only lower every kernel call of the run for this platform (no device needed)",
  )
  p.add_argument("--quick", action="store_true", help="tiny shapes, one size per section")
  p.add_argument("--sections", default="correctness,dense,sparse,tiles")
  p.add_argument("--tiles_t", type=int, default=8192, help="length of the tile sweep")
  p.add_argument("--ts", default="2048,8192,16384", help="dense timing lengths")
  p.add_argument("--sparse_ts", default="8192,16384", help="block-sparse timing lengths")
  p.add_argument("--densities", default="2,4,8,16,32", help="1/ρ of the sparse patterns")
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--head_dim", type=int, default=128)
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
  p.add_argument("--reps", type=int, default=7, help="timed batches per path")
  p.add_argument("--budget_s", type=float, default=420.0, help="no new case after this")
  p.add_argument("--out", default=str(RESULTS))
  args = p.parse_args(argv)
  if args.lower:
    args.backend = {"cuda": "gpu", "tpu": "tpu"}[args.lower]
  if args.backend == "auto":
    platform_name = jax.default_backend()
    if platform_name not in KERNEL and not args.interpret:
      p.error(f"no GPU or TPU here (default backend {platform_name!r}): pass --interpret")
    args.backend = platform_name if platform_name in KERNEL else "tpu"
  if args.quick:
    args.ts, args.sparse_ts, args.densities, args.tiles_t = "256", "256", "2", 256
    args.heads, args.head_dim, args.reps = 2, 32, 2
  return args


class Budget:
  def __init__(self, seconds):
    self.start, self.seconds = time.perf_counter(), seconds

  def spent(self):
    return time.perf_counter() - self.start > self.seconds

  def elapsed(self):
    return time.perf_counter() - self.start


def log(msg):
  print(msg, flush=True)


def _host():
  return jax.devices("cpu")[0]


def rel_error(got, want):
  """‖got − want‖ / ‖want‖ over the entries where the oracle is finite; inf when the finite
  patterns differ."""
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  want = np.asarray(want, np.float64)
  finite = np.isfinite(want)
  if got.shape != want.shape or not np.array_equal(np.isfinite(got), finite):
    return math.inf
  norm = float(np.linalg.norm(want[finite]))
  return float(np.linalg.norm(got[finite] - want[finite])) / max(norm, 1e-30)


def gradients(fn, args, w, *, lse_weight=None, lower_for=None):
  """(out, lse or None, grads of Σ out·w (+ Σ lse·lse_weight) w.r.t. every argument); with
  ``lower_for`` only lowers that computation for the platform and returns None."""

  def loss(*a):
    res = fn(*a)
    out, lse = (res if isinstance(res, tuple) else (res, None))[:2]
    total = jnp.sum(out.astype(w.dtype) * w)
    if lse is not None and lse_weight is not None:
      total = total + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * lse_weight)
    return total, (out, lse)

  argnums = tuple(range(len(args)))
  grad_fn = jax.jit(jax.grad(loss, argnums, has_aux=True))
  if lower_for is not None:
    _lower(grad_fn, args, lower_for)
    return None
  grads, (out, lse) = grad_fn(*args)
  return out, lse, grads


def _lower(jitted, args, platform_name):
  """Lowers ``jitted`` for the platform; raises unless a Pallas kernel call is in it."""
  text = jitted.trace(*args).lower(lowering_platforms=(platform_name,)).as_text()
  if not any(f"@{call}" in text for call in KERNEL_CALLS[platform_name]):
    raise AssertionError(f"no Pallas kernel call in the computation lowered for {platform_name}")


def compare(name, dtype, fast_fn, ref_fn, arrays, rs, *, with_lse=False, lower_for=None):
  """Runs ``fast_fn`` on the default device in ``dtype`` and ``ref_fn`` in float64 on the
  host; returns the case's row. With ``lower_for``, only lowers ``fast_fn``'s forward and
  gradients for that platform."""
  cast = [jnp.asarray(a, dtype) for a in arrays]
  shapes = jax.eval_shape(fast_fn, *cast)
  out_shape = shapes[0] if isinstance(shapes, tuple) else shapes
  w = rs.standard_normal(out_shape.shape).astype(np.float32)
  lse_w = rs.standard_normal(shapes[1].shape).astype(np.float32) if with_lse else None
  if lower_for is not None:
    gradients(fast_fn, cast, jnp.asarray(w), lse_weight=lse_w, lower_for=lower_for)
    log(f"  {name:28s} {dtype:8s} lowered for {lower_for}")
    return {"case": name, "dtype": dtype, "lowered": lower_for, "passed": True}
  out, lse, grads = gradients(fast_fn, cast, jnp.asarray(w), lse_weight=lse_w)
  jax.block_until_ready(grads)
  with jax.default_device(_host()), jax.enable_x64(True):
    # The oracle sees the same (dtype-rounded) inputs, upcast.
    exact = [np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in cast]
    r_out, r_lse, r_grads = gradients(
      ref_fn,
      [jnp.asarray(a) for a in exact],
      jnp.asarray(w, jnp.float64),
      lse_weight=None if lse_w is None else jnp.asarray(lse_w, jnp.float64),
    )
    r_out, r_grads = np.asarray(r_out), [np.asarray(g) for g in r_grads]
    r_lse = None if r_lse is None else np.asarray(r_lse)
  errors = {"out": rel_error(out, r_out)}
  if with_lse:
    errors["lse"] = rel_error(lse, r_lse)
  for arg, g, rg in zip(("q", "k", "v", "sinks"), grads, r_grads, strict=False):
    errors[f"d{arg}"] = rel_error(g, rg)
  worst = max(errors.values())
  ok = worst <= TOLERANCE[dtype]
  log(f"  {name:28s} {dtype:8s} worst {worst:.2e} {'ok' if ok else 'FAIL'}  {errors}")
  return {"case": name, "dtype": dtype, "errors": errors, "worst": worst, "passed": ok}


# ---------------------------------------------------------------------------------------
# 1. Correctness.
# ---------------------------------------------------------------------------------------


def flash_cases(args):
  """(name, dtype, (B, T, S, N, K, H), mask builder, options) for the kernel's public path."""
  blk = 128

  def sparse(T):
    from bench_sparse import random_block_sparse

    return random_block_sparse(T, blk, 1 / 4, seed=T)

  def window(T):
    return sliding_window(256)

  def segments(T):
    ids = np.repeat(np.arange(4), -(-T // 4))[:T]
    return SegmentMask(np.stack([ids, ids[::-1]]))

  if args.quick:
    return [
      ("causal", "float32", (1, 128, 128, 2, 1, 32), lambda T: CausalMask(), {}),
      ("block_sparse_causal", "float32", (1, 256, 256, 2, 2, 32), sparse, {}),
    ]
  return [
    ("causal", "float32", (2, 1024, 1024, 4, 4, 64), lambda T: CausalMask(), {}),
    ("causal_gqa", "bfloat16", (1, 2048, 2048, 8, 2, 128), lambda T: CausalMask(), {}),
    ("window_sinks_ragged", "float32", (1, 1000, 1000, 4, 2, 64), window, {"sinks": True}),
    ("softcap_bias", "float32", (1, 512, 512, 2, 2, 64), None, {"softcap": 20.0}),
    ("cross_ragged", "float32", (1, 384, 1000, 4, 4, 64), None, {}),
    ("segments", "float32", (2, 1024, 1024, 4, 4, 64), segments, {}),
    ("block_sparse_causal", "float32", (1, 2048, 2048, 4, 4, 64), sparse, {}),
    ("block_sparse_causal", "bfloat16", (1, 4096, 4096, 8, 8, 128), sparse, {}),
  ]


def check_flash(args, impl, rs, case):
  name, dtype, (B, T, S, N, K, H), make_mask, opts = case
  mask = None if make_mask is None else make_mask(T)
  arrays = [
    rs.standard_normal((B, T, N, H)),
    rs.standard_normal((B, S, K, H)),
    rs.standard_normal((B, S, K, H)),
  ]
  kw = {}
  if opts.get("softcap"):
    kw["softcap"] = opts["softcap"]
    bias = 0.5 * rs.standard_normal((1, N, T, S)).astype(np.float32)
  if opts.get("sinks"):
    arrays.append(rs.standard_normal((N,)))

  def attend(implementation):
    def fn(q, k, v, *sinks):
      extra = dict(kw)
      if sinks:
        extra["sinks"] = sinks[0].astype(jnp.float32)
      if opts.get("softcap"):
        extra["bias"] = jnp.asarray(bias, q.dtype)
      return dot_product_attention(q, k, v, mask=mask, implementation=implementation, **extra)

    return fn

  return compare(name, dtype, attend(impl), attend("reference"), arrays, rs, lower_for=args.lower)


def check_block_sparse_lists(args, rs):
  """The kernel API with random per-query-head lists, GQA, causal, an empty row."""
  B, T, N, K, H = (1, 256, 2, 1, 32) if args.quick else (2, 1024, 8, 2, 64)
  L = 128 if args.backend == "tpu" or not args.quick else 64  # TPU: kv tiles of 128
  nQ = T // L
  count = np.zeros((B, N, nQ), np.int32)
  idx = np.zeros((B, N, nQ, nQ), np.int32)
  for b, n, i in np.ndindex(B, N, nQ):
    past = rs.permutation(i + 1)  # causal lists: blocks up to the diagonal
    count[b, n, i] = rs.integers(0, i + 2)
    idx[b, n, i, : i + 1] = past
  count[0, 0, 0] = 0
  full = idx < np.arange(nQ)[None, None, :, None]  # strictly past blocks: wholly visible
  backend, interpret = args.backend, args.interpret
  if interpret and backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu

    interpret = pltpu.InterpretParams()

  def fast(q, k, v):
    return block_sparse.block_sparse_attention(
      q,
      k,
      v,
      jnp.asarray(count),
      jnp.asarray(idx),
      kv_full=jnp.asarray(full),
      block_size=L,
      causal=True,
      return_lse=True,
      backend=backend,
      block_q=64 if backend == "gpu" else None,  # Triton tiles of 64 (as the API picks)
      block_kv=64 if backend == "gpu" else None,
      interpret=interpret,
    )

  def ref(q, k, v):
    visible = block_sparse.dense_mask(
      jnp.asarray(count), jnp.asarray(idx), q_len=T, kv_len=T, block_size=L, causal=True
    )
    visible = jnp.repeat(visible, N // visible.shape[1], axis=1)  # per query head
    bias = jnp.where(visible, 0.0, -jnp.inf)  # rows that see nothing: out 0, lse -inf
    return attention_reference(q, k, v, bias=bias, return_lse=True)

  arrays = [rs.standard_normal(s) for s in ((B, T, N, H), (B, T, K, H), (B, T, K, H))]
  return compare(
    "block_sparse_lists", "float32", fast, ref, arrays, rs, with_lse=True, lower_for=args.lower
  )


def check_chunked(args, impl, rs, which):
  B, T, N, H = (1, 64, 2, 16) if args.quick else (2, 1024, 4, 64)
  C = 16 if args.quick else 64
  log_decay = -np.exp(rs.standard_normal((B, T, N)) - 2.0)  # per-token gates g < 0
  arrays = [rs.standard_normal((B, T, N, H)) for _ in range(3)]

  def run(implementation):
    def fn(q, k, v):
      g = jnp.asarray(log_decay, jnp.float32)
      if which == "linear":
        return linear_attention(q, k, v, g, chunk_size=C, implementation=implementation)
      beta = jax.nn.sigmoid(q.sum(-1)).astype(q.dtype)
      return delta_rule_attention(
        q, k, v, beta, g, chunk_size=C, implementation=implementation, l2_normalize=True
      )

    return fn

  return compare(
    f"{which}_chunk", "float32", run(impl), run("reference"), arrays, rs, lower_for=args.lower
  )


def correctness(args, impl, budget):
  rows = []
  rs = np.random.default_rng(0)
  checks = [
    (f"flash:{c[0]}:{c[1]}", lambda c=c: check_flash(args, impl, rs, c)) for c in flash_cases(args)
  ]
  checks.append(("block_sparse_lists", lambda: check_block_sparse_lists(args, rs)))
  checks += [
    (f"{w}_chunk", lambda w=w: check_chunked(args, impl, rs, w)) for w in ("linear", "delta")
  ]
  for label, check in checks:
    rows.append(_guarded(label, check, budget))
  return rows


def _guarded(label, fn, budget):
  if budget.spent():
    log(f"  {label}: skipped (budget)")
    return {"case": label, "skipped": "budget"}
  try:
    return fn()
  except Exception as err:  # recorded, and the run goes on
    log(f"  {label}: ERROR {type(err).__name__}: {err}")
    return {
      "case": label,
      "error": f"{type(err).__name__}: {err}",
      "trace": traceback.format_exc(limit=4),
    }


# ---------------------------------------------------------------------------------------
# 2. Timings.
# ---------------------------------------------------------------------------------------


def median_seconds(fn, args, reps):
  """Median over ``reps`` synchronised batches of the per-call time; a batch lasts >= 20 ms."""
  jax.block_until_ready(fn(*args))  # compile and warm up
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  calls = max(1, min(200, int(0.02 / max(time.perf_counter() - t0, 1e-6))))
  per_call = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    per_call.append((time.perf_counter() - t0) / calls)
  return statistics.median(per_call)


def _inputs(args, T, seed):
  rs = np.random.default_rng(seed)
  shape = (1, T, args.heads, args.head_dim)
  return [jnp.asarray(rs.standard_normal(shape), args.dtype) for _ in range(3)]


def _paths(attend):
  """The jitted forward and forward+backward (a squared-output loss) of ``attend``."""
  loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) ** 2)  # noqa: E731
  return {"fwd": jax.jit(attend), "fwd+bwd": jax.jit(jax.grad(loss, (0, 1, 2)))}


def _timed_paths(attend, qkv, reps):
  """{fwd, fwd+bwd: seconds} of one attention function."""
  return {key: median_seconds(fn, qkv, reps) for key, fn in _paths(attend).items()}


def _lower_paths(args, calls, budget):
  """``--lower``: the timing sections' kernel calls, forward and gradient, lowered only."""
  rows = []
  for label, attend, T in calls:

    def one(label=label, attend=attend, T=T):
      specs = [jax.ShapeDtypeStruct((1, T, args.heads, args.head_dim), args.dtype)] * 3
      for fn in _paths(attend).values():
        _lower(fn, specs, args.lower)
      log(f"  {label}: lowered for {args.lower}")
      return {"case": label, "dtype": args.dtype, "lowered": args.lower, "passed": True}

    rows.append(_guarded(label, one, budget))
  return rows


def dense_timings(args, impl, budget):
  paths = {
    "kernel": lambda q, k, v: dot_product_attention(
      q, k, v, mask=CausalMask(), implementation=impl
    ),
    "attn_jax xla": lambda q, k, v: dot_product_attention(
      q, k, v, mask=CausalMask(), implementation="xla"
    ),
    "jax.nn xla": lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation="xla"
    ),
  }
  if args.backend == "gpu" and not args.interpret:
    paths["jax.nn cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation="cudnn"
    )
  if args.lower:
    ts = [int(t) for t in args.ts.split(",")]
    return _lower_paths(args, [(f"dense T={T} kernel", paths["kernel"], T) for T in ts], budget)
  rows = []
  for T in [int(t) for t in args.ts.split(",")]:
    qkv = _inputs(args, T, seed=T)
    flops = 4 * args.heads * T * T * args.head_dim / 2  # causal forward
    for name, attend in paths.items():

      def one(name=name, attend=attend, T=T):
        times = _timed_paths(attend, qkv, args.reps)
        row = {"T": T, "path": name, **{k: 1e3 * v for k, v in times.items()}}
        row["fwd TFLOP/s"] = flops / times["fwd"] / 1e12
        row["fwd+bwd TFLOP/s"] = 3.5 * flops / times["fwd+bwd"] / 1e12
        log(f"  T={T:6d} {name:14s} fwd {row['fwd']:9.3f} ms  fwd+bwd {row['fwd+bwd']:9.3f} ms")
        return row

      rows.append(_guarded(f"dense T={T} {name}", one, budget))
  for row in rows:  # the kernel's speedup over each path, same T
    kernel = next(
      (r for r in rows if r.get("path") == "kernel" and r.get("T") == row.get("T")), None
    )
    if kernel and "fwd" in row and "fwd" in kernel:
      row["kernel speedup fwd"] = row["fwd"] / kernel["fwd"]
      row["kernel speedup fwd+bwd"] = row["fwd+bwd"] / kernel["fwd+bwd"]
  return rows


def sparse_timings(args, impl, budget):
  from bench_sparse import random_block_sparse, tiles

  block, rows = 128, []
  if args.lower:
    calls = []
    for T in [int(t) for t in args.sparse_ts.split(",")]:
      for d in [int(x) for x in args.densities.split(",")]:
        mask = random_block_sparse(T, block, 1 / d, seed=T + d)
        attend = functools.partial(dot_product_attention, mask=mask, implementation=impl)
        calls.append((f"sparse T={T} 1/{d}", attend, T))
    return _lower_paths(args, calls, budget)
  for T in [int(t) for t in args.sparse_ts.split(",")]:
    qkv = _inputs(args, T, seed=T + 1)
    causal = lambda q, k, v: dot_product_attention(q, k, v, mask=CausalMask(), implementation=impl)  # noqa: E731
    dense = _guarded(f"sparse T={T} dense", lambda: _timed_paths(causal, qkv, args.reps), budget)
    causal_tiles = tiles(CausalMask(), T, block)
    for d in [int(x) for x in args.densities.split(",")]:

      def one(d=d, T=T, dense=dense):
        mask = random_block_sparse(T, block, 1 / d, seed=T + d)
        attend = lambda q, k, v: dot_product_attention(q, k, v, mask=mask, implementation=impl)  # noqa: E731
        times = _timed_paths(attend, qkv, args.reps)
        ideal = causal_tiles / tiles(mask, T, block)
        row = {"T": T, "density": f"1/{d}", "ideal": ideal}
        for key, t in times.items():
          row[f"{key} ms"] = 1e3 * t
          row[f"{key} dense ms"] = 1e3 * dense[key]
          row[f"{key} ratio"] = dense[key] / t / ideal
        log(
          f"  T={T:6d} 1/{d:<3d} ideal {ideal:5.2f}  fwd {row['fwd ms']:8.3f} ms "
          f"ratio {row['fwd ratio']:.2f}  fwd+bwd {row['fwd+bwd ms']:8.3f} ms "
          f"ratio {row['fwd+bwd ratio']:.2f}"
        )
        return row

      if "error" in dense or "skipped" in dense:
        rows.append({"case": f"sparse T={T} 1/{d}", "skipped": "no dense baseline"})
      else:
        rows.append(_guarded(f"sparse T={T} 1/{d}", one, budget))
  return rows


# Kernel tiles (block_q, block_kv) swept on dense causal attention against the kernel's
# defaults (GPU 64 x 64; TPU 512 x 512). GPU: powers of two >= 16; TPU: block_q a multiple
# of 8, block_kv of 128.
TILES = {
  "gpu": [(128, 64), (64, 128), (128, 128), (32, 64)],
  "tpu": [(256, 256), (128, 128), (256, 512), (1024, 512)],
}


def tile_timings(args, impl, budget):
  """The dense causal kernel at ``--tiles_t`` for each tile pair: which tiles to default to."""
  T = args.tiles_t
  pairs = [(None, None)] + [(bq, bk) for bq, bk in TILES[args.backend] if bq <= T and bk <= T]
  pairs = pairs[:2] if args.quick else pairs
  label = lambda bq, bk: "default" if bq is None else f"{bq}x{bk}"  # noqa: E731

  def attend_with(bq, bk):
    return functools.partial(
      dot_product_attention, mask=CausalMask(), implementation=impl, block_q=bq, block_kv=bk
    )

  if args.lower:
    calls = [(f"tiles T={T} {label(bq, bk)}", attend_with(bq, bk), T) for bq, bk in pairs]
    return _lower_paths(args, calls, budget)
  qkv = _inputs(args, T, seed=T + 2)
  rows = []
  for bq, bk in pairs:

    def one(bq=bq, bk=bk):
      times = _timed_paths(attend_with(bq, bk), qkv, args.reps)
      row = {"T": T, "tiles": label(bq, bk), **{k: 1e3 * v for k, v in times.items()}}
      log(f"  T={T} tiles {row['tiles']}: fwd {row['fwd']:.3f} ms  fwd+bwd {row['fwd+bwd']:.3f} ms")
      return row

    rows.append(_guarded(f"tiles T={T} {label(bq, bk)}", one, budget))
  default = rows[0] if rows and "fwd" in rows[0] else None
  for row in rows:
    if default and "fwd" in row:
      row["fwd vs default"] = row["fwd"] / default["fwd"]
      row["fwd+bwd vs default"] = row["fwd+bwd"] / default["fwd+bwd"]
  return rows


# ---------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------


def _fmt(x):
  if isinstance(x, float):
    return f"{x:.3g}" if abs(x) < 1e-2 or abs(x) >= 1e4 else f"{x:.3f}".rstrip("0").rstrip(".")
  return str(x)


def _table(rows, columns):
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for row in rows:
    lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
  return lines


def report(result):
  env = result["environment"]
  lines = [
    "# Pallas kernels on the device: correctness and timings",
    "",
    f"Device: {env['device']} ({env['backend']}{', interpret mode' if env['interpret'] else ''}), "
    f"jax {env['jax']}, Python {env['python']}; {env['elapsed_s']:.0f} s.",
    f"Command: `{env['command']}`",
    "",
  ]
  if env.get("lower"):
    rows = [r for name in SECTIONS for r in result.get(name, [])]
    for r in rows:
      r["status"] = f"lowered for {r['lowered']}" if r.get("lowered") else r.get("error", "")
    ok = sum(bool(r.get("lowered")) for r in rows)
    lines += [f"## Lowering only ({ok} of {len(rows)} calls lowered)", ""]
    return "\n".join(lines + _table(rows, ["case", "dtype", "status"]) + [""])
  if "correctness" in result:
    rows = result["correctness"]
    passed = sum(bool(r.get("passed")) for r in rows)
    lines += [
      f"## Correctness ({passed} of {len(rows)} passed; tolerance float32 1e-4, bfloat16 2e-2, "
      "relative Frobenius error against a float64 host oracle)",
      "",
    ]
    for r in rows:
      r["errors_text"] = ", ".join(f"{k} {v:.1e}" for k, v in r.get("errors", {}).items())
      r["status"] = "pass" if r.get("passed") else r.get("skipped") or r.get("error") or "FAIL"
    lines += _table(rows, ["case", "dtype", "worst", "status", "errors_text"]) + [""]
  if "dense" in result:
    lines += ["## Dense causal attention (ms, median)", ""]
    cols = ["T", "path", "fwd", "fwd+bwd", "fwd TFLOP/s", "fwd+bwd TFLOP/s"]
    lines += _table(result["dense"], cols + ["kernel speedup fwd", "kernel speedup fwd+bwd"]) + [""]
  if "sparse" in result:
    lines += ["## Block-sparse kernel vs dense causal kernel (128-token blocks)", ""]
    cols = ["T", "density", "ideal", "fwd dense ms", "fwd ms", "fwd ratio"]
    cols += ["fwd+bwd dense ms", "fwd+bwd ms", "fwd+bwd ratio"]
    lines += _table(result["sparse"], cols) + [""]
  if "tiles" in result:
    lines += ["## Kernel tiles (block_q x block_kv), dense causal (ms, median)", ""]
    cols = ["T", "tiles", "fwd", "fwd+bwd", "fwd vs default", "fwd+bwd vs default"]
    lines += _table(result["tiles"], cols) + [""]
  return "\n".join(lines)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  impl = "pallas_interpret" if args.interpret and not args.lower else KERNEL[args.backend]
  budget = Budget(args.budget_s)
  device = jax.devices()[0]
  result = {
    "environment": {
      "device": getattr(device, "device_kind", str(device)),
      "backend": args.backend,
      "interpret": args.interpret,
      "lower": args.lower,
      "jax": jax.__version__,
      "python": platform.python_version(),
      "command": "python experiments/device_check.py " + " ".join(argv),
    }
  }
  sections = {
    "correctness": correctness,
    "dense": dense_timings,
    "sparse": sparse_timings,
    "tiles": tile_timings,
  }
  for name in args.sections.split(","):
    log(f"== {name} ({budget.elapsed():.0f} s)")
    result[name] = sections[name](args, impl, budget)
  result["environment"]["elapsed_s"] = budget.elapsed()
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "device_check.json").write_text(json.dumps(result, indent=1, default=str))
  text = report(result)
  (out / "device_check.md").write_text(text + "\n")
  print(text)
  return result


if __name__ == "__main__":
  main()
