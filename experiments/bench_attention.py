"""Benchmarks causal softmax attention: attn_jax (xla, reference, Pallas), jax.nn and torch SDPA.

B=1, N=8 heads, H=64, float32 (--dtype), causal; forward and forward+backward; the median of --reps
timed calls after one warm-up call (compilation is timed separately). Every (implementation,
T) runs in a fresh subprocess, so peak RSS is per config and a crash, OOM or timeout loses
only that config (and the larger T of that implementation).

``xla_per_core`` is the xla path run the way it uses every core of a CPU: its worker starts
XLA with the host split into one device per core and the heads split over them
(``sharded_attention``, 256x128-token tiles, q/k/v placed split by heads before the timed
calls, as a head-sharded model's activations are). On a single XLA:CPU device only large
operations are spread over the cores, so the blocked path's tile loop runs mostly on one.

Launch from the repository root with the project venv:
  # full run: T = 1024 .. 16384, the CPU set of implementations -> experiments/results/
  .venv/bin/python experiments/bench_attention.py
  # quick smoke run (`make run`): T = 512, 1024, 3 reps -> experiments/results/quick/
  .venv/bin/python experiments/bench_attention.py --quick
  # one implementation, longer sequences
  .venv/bin/python experiments/bench_attention.py --implementations xla --max-t 131072
  # on a TPU VM / a GPU machine: the flash kernel against jax.nn (XLA on that device)
  python experiments/bench_attention.py --implementation pallas_tpu --dtype bfloat16
  python experiments/bench_attention.py --implementation pallas_gpu --dtype bfloat16

Writes <outdir>/bench_attention.{json,md,png}.
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

B, N, H = 1, 8, 64
DTYPE = "float32"
T_FULL = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
T_QUICK = (512, 1024)
# the default (CPU) set; xla_per_core is the xla path with the host split into one XLA
# device per core and the heads split over them (see worker_env)
IMPLEMENTATIONS = ("xla", "xla_per_core", "reference", "jax_nn", "torch_sdpa")
PER_CORE = ("xla_per_core",)
# One core runs small tiles faster than the single-device default (512, chosen for XLA:CPU
# spreading large tiles over the cores). Measured at T = 4096, forward (fwd+bwd) ms, each
# run timed interleaved in one process: 512x512 99.6 (297) vs 128x128 87.5 (273);
# 128x128 91.0 (296), 256x128 87.0 (294), 512x128 90.1 (311), 256x64 89.3 (301);
# 128x128 85.4, 256x128 81.2, 128x256 104.8, 64x128 109.5.
PER_CORE_TILES = (256, 128)
KERNELS = ("pallas_tpu", "pallas_gpu", "pallas_interpret")
DTYPES = ("float32", "bfloat16")
MATERIALISING = ("reference", "jax_nn")  # build the [B, N, T, T] logits
LOGITS_BUDGET_BYTES = 12 * 2**30
MATMUL_N = 4096
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def fwd_flops(t: int) -> float:
  """Causal forward FLOPs: q·kᵀ and p·v (2·T²·H each per head), half of the tiles kept."""
  return 4 * B * N * t * t * H / 2


def fwd_bwd_flops(t: int) -> float:
  """Forward + backward FLOPs: the backward does 5 matmuls to the forward's 2."""
  return 3.5 * fwd_flops(t)


def logits_bytes(t: int) -> int:
  """Rough memory of a materialising implementation: logits, probabilities and their grad."""
  return 3 * B * N * t * t * 4


def time_samples(fn, reps: int) -> list[float]:
  """Wall times (ms) of `reps` calls of fn(); fn must block until its result is ready."""
  samples = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    samples.append((time.perf_counter() - start) * 1e3)
  return samples


# --- worker side: one (implementation, T) per process --------------------------------------
# jax / attn_jax / torch are imported inside the workers only, so a torch worker's peak RSS
# carries no JAX runtime and the parent stays light.


def compile_and_time(fn, args, reps: int) -> tuple[float, list[float]]:
  """Jits and compiles fn ahead of time (timed), warms up once, then times `reps` calls."""
  import jax

  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))
  return compile_s, time_samples(lambda: jax.block_until_ready(compiled(*args)), reps)


def jax_attention(impl: str):
  """The causal attention function [B,T,N,H]³ -> [B,T,N,H] that `impl` names."""
  import jax

  from attn_jax import attention

  if impl == "jax_nn":

    def attend(q, k, v):
      return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")

    return attend
  mask = attention.CausalMask()
  if impl in PER_CORE:
    import numpy as np
    from jax.sharding import Mesh

    from attn_jax.attention.sharded import sharded_attention

    devices = jax.devices()
    mesh = Mesh(
      np.array(devices[: max(d for d in range(1, len(devices) + 1) if N % d == 0)]), ("h",)
    )

    def attend(q, k, v):
      return sharded_attention(
        q,
        k,
        v,
        mesh=mesh,
        batch_axes=None,
        head_axes="h",
        mask=mask,
        implementation="xla",
        block_q=PER_CORE_TILES[0],
        block_kv=PER_CORE_TILES[1],
      )

    # Inputs arrive split by heads, as a head-sharded model's activations do.
    attend.input_sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, None, "h")
    )
    return attend

  def attend(q, k, v):
    return attention.dot_product_attention(q, k, v, mask=mask, implementation=impl)

  return attend


def run_jax(impl: str, t: int, reps: int, dtype: str = DTYPE) -> dict:
  """Times the jitted forward and the jitted gradient of out.sum() w.r.t. q, k, v."""
  import jax
  import jax.numpy as jnp

  keys = jax.random.split(jax.random.key(t), 3)
  qkv_BTNH = tuple(jax.random.normal(key, (B, t, N, H), jnp.float32).astype(dtype) for key in keys)
  attend = jax_attention(impl)
  if hasattr(attend, "input_sharding"):
    qkv_BTNH = jax.device_put(qkv_BTNH, attend.input_sharding)
  grad_fn = jax.grad(lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
  compile_fwd_s, fwd = compile_and_time(attend, qkv_BTNH, reps)
  compile_fwd_bwd_s, fwd_bwd = compile_and_time(grad_fn, qkv_BTNH, reps)
  return {
    "compile_fwd_s": compile_fwd_s,
    "compile_fwd_bwd_s": compile_fwd_bwd_s,
    "fwd_samples_ms": fwd,
    "fwd_bwd_samples_ms": fwd_bwd,
    "backend": jax.default_backend(),
    "device": str(jax.devices()[0].device_kind),
    "devices": len(jax.devices()),
  }


def run_torch(t: int, reps: int) -> dict:
  """Times torch SDPA ([B,N,T,H]): forward under no_grad, then forward + out.sum().backward()."""
  import torch
  import torch.nn.functional as F

  torch.manual_seed(t)
  qkv_BNTH = [torch.randn(B, N, t, H, dtype=torch.float32) for _ in range(3)]
  for x in qkv_BNTH:
    x.requires_grad_(True)

  def fwd():
    with torch.no_grad():
      F.scaled_dot_product_attention(*qkv_BNTH, is_causal=True)

  def fwd_bwd():
    for x in qkv_BNTH:
      x.grad = None  # fresh gradients each call: accumulation would add an extra pass
    F.scaled_dot_product_attention(*qkv_BNTH, is_causal=True).sum().backward()

  fwd()
  fwd_samples = time_samples(fwd, reps)
  fwd_bwd()
  return {
    "torch_threads": torch.get_num_threads(),
    "fwd_samples_ms": fwd_samples,
    "fwd_bwd_samples_ms": time_samples(fwd_bwd, reps),
  }


def run_matmul(n: int, reps: int) -> dict:
  """GFLOP/s of an n×n float32 matmul: jitted JAX, and torch when it imports."""
  import jax
  import jax.numpy as jnp

  a_NN, b_NN = (
    jax.random.normal(key, (n, n), jnp.float32) for key in jax.random.split(jax.random.key(0))
  )
  _, samples = compile_and_time(jnp.matmul, (a_NN, b_NN), reps)
  flops = 2 * n**3
  result = {"jax": flops / statistics.median(samples) / 1e6, "jax_samples_ms": samples}
  try:
    import torch
  except ImportError:
    return result
  ta_NN, tb_NN = torch.randn(n, n), torch.randn(n, n)
  torch.matmul(ta_NN, tb_NN)
  samples = time_samples(lambda: torch.matmul(ta_NN, tb_NN), reps)
  result.update(
    torch=flops / statistics.median(samples) / 1e6,
    torch_samples_ms=samples,
    torch_threads=torch.get_num_threads(),
  )
  return result


def worker(spec: str, reps: int, dtype: str = DTYPE) -> int:
  """Runs the config `impl:T` and prints its result (plus peak RSS) as one JSON line."""
  impl, t = spec.split(":")
  if impl == "matmul":
    result = run_matmul(int(t), reps)
  elif impl == "torch_sdpa":
    result = run_torch(int(t), reps)
  else:
    result = run_jax(impl, int(t), reps, dtype)
  # ru_maxrss is in KiB on Linux.
  result["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(json.dumps(result), flush=True)
  return 0


# --- parent side ---------------------------------------------------------------------------


def worker_env(impl: str) -> dict:
  """A worker's environment: XLA:CPU as one device, or one device per core (PER_CORE).

  On one XLA:CPU device only large operations are spread over the cores (a 512-token tile's
  matmuls are; a 128-token tile's are not), so the blocked path leaves cores idle; with a
  device per core and the heads split over the devices each core runs its own heads. Any
  device count inherited from the caller's XLA_FLAGS is replaced.
  """
  flags = [
    f
    for f in os.environ.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count")
  ]
  if impl in PER_CORE:
    flags.append(f"--xla_force_host_platform_device_count={os.cpu_count() or 1}")
  return {**os.environ, "XLA_FLAGS": " ".join(flags)}


def launch(spec: str, reps: int, timeout: float, dtype: str = DTYPE) -> dict:
  """Runs one worker subprocess; returns its result with status "ok", or a failure status."""
  cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", spec, "--reps", str(reps)]
  cmd += ["--dtype", dtype]
  env = worker_env(spec.split(":")[0])
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
  except subprocess.TimeoutExpired:
    return {"status": "timeout"}
  if proc.returncode < 0:  # killed by a signal: on Linux usually the OOM killer's SIGKILL
    return {"status": "oom/killed", "signal": -proc.returncode}
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if proc.returncode != 0 or not lines:
    return {"status": f"error: {error_line(proc.stderr)[:300]}"}
  return {"status": "ok", **json.loads(lines[-1])}


def error_line(stderr: str) -> str:
  """The exception line of a traceback (JAX appends notes after it), else the last line."""
  lines = stderr.strip().splitlines() or ["no output"]
  errors = [line for line in lines if re.match(r"[\w.]+(Error|Exception)\b", line)]
  return (errors or lines)[-1]


def make_row(impl: str, t: int, result: dict) -> dict:
  """A results row: the worker's output plus medians, minima and effective GFLOP/s."""
  row = {"impl": impl, "T": t, **result}
  for kind, flops in (("fwd", fwd_flops(t)), ("fwd_bwd", fwd_bwd_flops(t))):
    samples = row.get(f"{kind}_samples_ms")
    ms = statistics.median(samples) if samples else None
    row[f"{kind}_ms"] = ms
    row[f"{kind}_min_ms"] = min(samples) if samples else None
    row[f"{kind}_gflops"] = flops / ms / 1e6 if ms else None
  row.setdefault("peak_mib", None)
  return row


def progress_line(row: dict) -> str:
  """One line for the log: times and peak memory, or the status."""
  head = f"[{row['impl']} T={row['T']}]"
  if row["status"] != "ok":
    return f"{head} {row['status']}"
  return (
    f"{head} fwd {row['fwd_ms']:.1f} ms  fwd+bwd {row['fwd_bwd_ms']:.1f} ms  "
    f"peak {row['peak_mib']:.0f} MiB"
  )


def precheck(impl: str, t: int, failed: dict, torch_ok: bool) -> str | None:
  """The reason to skip (impl, T) without launching it, or None to run it."""
  if impl in failed:
    return f"skipped: failed at T={failed[impl]}"
  if impl == "torch_sdpa" and not torch_ok:
    return "skipped: torch not installed"
  if impl in MATERIALISING and logits_bytes(t) > LOGITS_BUDGET_BYTES:
    return "skipped: memory"
  return None


def run_all(impls, ts, reps: int, timeout: float, torch_ok: bool, dtype: str = DTYPE) -> list[dict]:
  """Runs every (impl, T), smallest T first; an impl that fails is not tried at larger T."""
  rows, failed = [], {}
  for t in ts:
    for impl in impls:
      skip = precheck(impl, t, failed, torch_ok)
      result = {"status": skip} if skip else launch(f"{impl}:{t}", reps, timeout, dtype)
      if not skip and result["status"] != "ok":
        failed[impl] = t
      rows.append(make_row(impl, t, result))
      print(progress_line(rows[-1]), flush=True)
  return rows


def machine_info(matmul: dict, rows: list[dict]) -> dict:
  """CPU, core count, library versions and the UTC date."""
  cpu = platform.processor() or "unknown"
  try:
    models = [
      line.split(":", 1)[1].strip()
      for line in Path("/proc/cpuinfo").read_text().splitlines()
      if line.startswith("model name")
    ]
    cpu = models[0] if models else cpu
  except OSError:
    pass
  # The matmul worker reports torch's threads; the torch rows do too if it failed.
  threads = [r["torch_threads"] for r in rows if r.get("torch_threads")]
  torch_threads = matmul.get("torch_threads") or (threads[0] if threads else None)
  return {
    "cpu": cpu,
    "cores": os.cpu_count(),
    "jax": package_version("jax"),
    "jaxlib": package_version("jaxlib"),
    "torch": package_version("torch"),
    "torch_threads": torch_threads,
    "python": platform.python_version(),
    "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
  }


def package_version(name: str) -> str | None:
  """The installed version of a distribution, or None."""
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


# --- reports -------------------------------------------------------------------------------


def fmt_ms(ms: float) -> str:
  """Milliseconds with 3-4 significant digits."""
  return f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def short_status(row: dict) -> str:
  """The status for a table cell: error details stay in the JSON (they may hold '|')."""
  return "error" if row["status"].startswith("error") else row["status"]


def markdown(report: dict) -> str:
  """Timing table with ratio columns, matmul peaks, peak-memory table and longest T."""
  cfg, impls = report["config"], report["config"]["implementations"]
  by = {(r["impl"], r["T"]): r for r in report["results"]}
  pairs = [("jax_nn", "xla"), ("xla", "torch_sdpa"), ("jax_nn", "xla_per_core")]
  pairs += [("xla_per_core", "torch_sdpa")] + [("jax_nn", k) for k in KERNELS]
  ratios = [(a, b) for a, b in pairs if a in impls and b in impls]
  m = report["machine"]
  lines = [
    f"# Causal attention benchmark ({cfg.get('backend', 'cpu')})",
    "",
    f"B={B}, N={N}, H={H}, {cfg.get('dtype', DTYPE)}, causal; median of {cfg['reps']} "
    "timed calls after one warm-up (compilation excluded); times in ms. Ratio columns "
    "divide the medians of this "
    f"run. {m['cpu']}, {m['cores']} cores; jax {m['jax']}, torch {m['torch']} "
    f"({m['torch_threads']} threads); {m['date_utc']}.",
    "",
  ]
  head = ["T"] + [f"{i} {k}" for i in impls for k in ("fwd", "fwd+bwd")]
  head += [f"{a} / {b} {k}" for a, b in ratios for k in ("fwd", "fwd+bwd")]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for t in cfg["T"]:
    cells = [str(t)]
    for impl in impls:
      row = by[(impl, t)]
      ok = row["status"] == "ok"
      cells += [fmt_ms(row[k]) if ok else short_status(row) for k in ("fwd_ms", "fwd_bwd_ms")]
    for a, b in ratios:
      ra, rb = by[(a, t)], by[(b, t)]
      ok = ra["status"] == rb["status"] == "ok"
      cells += [f"{ra[k] / rb[k]:.2f}" if ok else "—" for k in ("fwd_ms", "fwd_bwd_ms")]
    lines.append("| " + " | ".join(cells) + " |")
  peaks = report["matmul_peak_gflops"]
  torch_peak = f"{peaks['torch']:.1f}" if peaks.get("torch") else "n/a"
  jax_peak = f"{peaks['jax']:.1f}" if peaks.get("jax") else "n/a"
  lines += [
    "",
    f"Matmul peak ({MATMUL_N}×{MATMUL_N} float32): JAX {jax_peak} GFLOP/s, "
    f"torch {torch_peak} GFLOP/s.",
    "",
    "## Peak resident memory (MiB)",
    "",
    "| T | " + " | ".join(impls) + " |",
    "|" + "---|" * (len(impls) + 1),
  ]
  for t in cfg["T"]:
    cells = [
      f"{by[(i, t)]['peak_mib']:.0f}" if by[(i, t)]["peak_mib"] else short_status(by[(i, t)])
      for i in impls
    ]
    lines.append(f"| {t} | " + " | ".join(cells) + " |")
  lines += ["", "## Longest T that ran", ""]
  lines += [f"- {impl}: {t if t else 'none'}" for impl, t in report["longest_t"].items()]
  return "\n".join(lines) + "\n"


def write_plot(report: dict, path: Path) -> None:
  """Time vs T and effective GFLOP/s vs T (fwd solid, fwd+bwd dashed), log axes."""
  import matplotlib

  matplotlib.use("Agg")  # no display on benchmark machines
  import matplotlib.pyplot as plt

  fig, (ax_t, ax_f) = plt.subplots(1, 2, figsize=(14, 4.8))
  for i, impl in enumerate(report["config"]["implementations"]):
    ok = [r for r in report["results"] if r["impl"] == impl and r["status"] == "ok"]
    ts = [r["T"] for r in ok]
    for kind, style, label in (("fwd", "-o", "fwd"), ("fwd_bwd", "--s", "fwd+bwd")):
      kw = {"color": f"C{i}", "label": f"{impl} {label}", "markersize": 4}
      ax_t.plot(ts, [r[f"{kind}_ms"] for r in ok], style, **kw)
      ax_f.plot(ts, [r[f"{kind}_gflops"] for r in ok], style, **kw)
  peak = report["matmul_peak_gflops"].get("jax")
  if peak:
    ax_f.axhline(peak, color="k", ls=":", label=f"JAX matmul peak {peak:.0f}")
  # A log axis with no data points raises; keep linear axes when every config failed.
  any_ok = any(r["status"] == "ok" for r in report["results"])
  for ax in (ax_t, ax_f):
    if any_ok:
      ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length T")
    ax.grid(True, which="both", alpha=0.3)
  if any_ok:
    ax_t.set_yscale("log")
  ax_t.set_ylabel("time (ms, median)")
  ax_f.set_ylabel("effective GFLOP/s")
  ax_f.set_ylim(bottom=0)
  m = report["machine"]
  fig.suptitle(
    f"Causal attention, B={B} N={N} H={H} {report['config']['dtype']} — {m['cpu']}, "
    f"{m['cores']} cores",
    fontsize=10,
  )
  # One shared legend beside the panels, so it never hides curves or the peak line.
  fig.legend(*ax_f.get_legend_handles_labels(), loc="center right", fontsize=8)
  fig.tight_layout(rect=(0, 0, 0.84, 1))
  fig.savefig(path, dpi=120)
  plt.close(fig)


def parse_args(argv):
  """The command line; --worker is internal (the parent re-invokes this script with it)."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    "--quick",
    action="store_true",
    help="T = 512, 1024, 3 reps, outputs in experiments/results/quick/",
  )
  p.add_argument(
    "--implementations",
    default=",".join(IMPLEMENTATIONS),
    help=f"comma list out of {','.join(IMPLEMENTATIONS + KERNELS)} (default: the CPU set)",
  )
  p.add_argument(
    "--implementation",
    choices=KERNELS,
    help="benchmark this flash kernel against jax.nn (XLA) on the current device",
  )
  p.add_argument("--dtype", choices=DTYPES, default=DTYPE, help="input dtype (default float32)")
  p.add_argument("--max-t", type=int, default=16384, help="largest T (default 16384)")
  p.add_argument("--reps", type=int, help="timed calls per config (default 5, quick 3)")
  p.add_argument("--timeout", type=float, default=900, help="seconds per config (default 900)")
  p.add_argument("--outdir", type=Path, help="default experiments/results[/quick]")
  p.add_argument("--worker", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.implementations = [s.strip() for s in args.implementations.split(",") if s.strip()]
  if args.implementation:
    args.implementations = [args.implementation, "jax_nn"]
  unknown = sorted(set(args.implementations) - set(IMPLEMENTATIONS + KERNELS))
  if unknown or not args.implementations:
    p.error(f"--implementations: unknown {unknown}; choose from {IMPLEMENTATIONS + KERNELS}")
  args.reps = args.reps or (3 if args.quick else 5)
  args.ts = [t for t in (T_QUICK if args.quick else T_FULL) if t <= args.max_t]
  if not args.ts:
    p.error(f"--max-t {args.max_t} is below the smallest T")
  args.outdir = args.outdir or (RESULTS_DIR / "quick" if args.quick else RESULTS_DIR)
  return args


def main(argv=None) -> int:
  """Runs the matmul peak, then every (impl, T), and writes the JSON, markdown and plot."""
  args = parse_args(argv)
  if args.worker:
    return worker(args.worker, args.reps, args.dtype)
  args.outdir.mkdir(parents=True, exist_ok=True)
  print(f"T={args.ts} impls={args.implementations} reps={args.reps} -> {args.outdir}", flush=True)
  matmul = launch(f"matmul:{MATMUL_N}", args.reps, args.timeout)
  peaks = {"jax": matmul.get("jax"), "torch": matmul.get("torch")}
  shown = {name: "n/a" if p is None else f"{p:.1f} GFLOP/s" for name, p in peaks.items()}
  print(
    f"[matmul {MATMUL_N}] {matmul['status']}  JAX {shown['jax']}  torch {shown['torch']}",
    flush=True,
  )
  rows = run_all(
    args.implementations,
    args.ts,
    args.reps,
    args.timeout,
    torch_ok=package_version("torch") is not None,
    dtype=args.dtype,
  )
  backends = {r.get("backend") for r in rows if r.get("backend")}
  report = {
    "machine": machine_info(matmul, rows),
    "config": {
      "B": B,
      "N": N,
      "H": H,
      "dtype": args.dtype,
      "backend": ",".join(sorted(backends)) or "cpu",
      "causal": True,
      "reps": args.reps,
      "T": args.ts,
      "max_t": args.max_t,
      "quick": args.quick,
      "implementations": args.implementations,
      "timeout_s": args.timeout,
      "logits_budget_gib": LOGITS_BUDGET_BYTES / 2**30,
      "matmul_n": MATMUL_N,
      "flops": "fwd = 4*B*N*T^2*H/2 (causal); fwd_bwd = 3.5 * fwd",
    },
    "matmul_peak_gflops": peaks,
    "matmul": matmul,
    "results": rows,
    "longest_t": {
      i: max((r["T"] for r in rows if r["impl"] == i and r["status"] == "ok"), default=None)
      for i in args.implementations
    },
  }
  out = args.outdir / "bench_attention"
  out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
  out.with_suffix(".md").write_text(markdown(report))
  write_plot(report, out.with_suffix(".png"))
  print(f"wrote {out}.json, .md, .png", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
