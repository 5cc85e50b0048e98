r"""Chunked linear attention vs dense causal softmax attention: time, time per token and
peak memory from T = 1k to 128k+, in one run.

Ops (B=1, N=8, H=Hv=64, float32, chunk 64, the chunkwise-parallel ``xla`` path unless
``--implementation`` names a kernel): ``linear_attn`` (elu+1 features, normalised),
``lightning`` (fixed per-head decay), ``simple_gla`` (data-dependent scalar decay), ``gla``
(per-dimension gates, chunk ``--gla_chunk``, default 16: its in-chunk decays are
[C, C, N, H], so small chunks are faster), ``delta_rule``, ``gated_delta``; against
``softmax`` = causal ``dot_product_attention`` (the blocked xla path). Forward and
forward+backward (gradients of q, k, v), median of ``--reps`` timed calls after a warm-up
call (compilation excluded; one timed call when a call takes longer than ``--long_s``).
Dense softmax stops at
``--softmax_max`` (its cost grows as T², 12.8 s forward at 32k on this CPU).

Peak memory is XLA's own accounting of the compiled program (``memory_analysis()``:
arguments + outputs + temporaries, the buffers live at the program's peak), the same for
every op, so the ratios are comparable; it is not an RSS measurement.

It reports time per token (µs) — flat in T for the linear ops, the Lightning claim — and
the crossover length, the smallest measured T where each linear op beats softmax.

  .venv/bin/python experiments/bench_linear.py                       # 1k ... 128k, this CPU
  .venv/bin/python experiments/bench_linear.py --ts=1024,4096 --reps=1 --out=/tmp/bl
  python experiments/bench_linear.py --implementation=pallas_gpu     # on a GPU

Writes ``experiments/results/bench_linear.{json,md,png}``.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from attn_jax.attention import CausalMask, dot_product_attention
from attn_jax.attention import delta as delta_lib
from attn_jax.attention import linear as linear_lib

B, N, H = 1, 8, 64
RESULTS = Path(__file__).resolve().parent / "results"
OPS = ("softmax", "linear_attn", "lightning", "simple_gla", "gla", "delta_rule", "gated_delta")


def make_op(name, T, key, implementation, chunk, gla_chunk):
  """(fn(q, k, v) -> out, extra inputs closed over)."""
  kg = jax.random.fold_in(key, 7)
  if name == "softmax":
    return lambda q, k, v: dot_product_attention(q, k, v, mask=CausalMask())
  kw = dict(chunk_size=chunk, implementation=implementation)
  if name == "linear_attn":
    return lambda q, k, v: linear_lib.linear_attention(
      q, k, v, feature_map="elu1", normalize=True, **kw
    )
  if name == "lightning":
    g = jnp.asarray(linear_lib.lightning_log_decay(N))
    return lambda q, k, v: linear_lib.linear_attention(q, k, v, g, **kw)
  if name == "simple_gla":
    g = -jax.nn.softplus(jax.random.normal(kg, (B, T, N))) / 16
    return lambda q, k, v: linear_lib.linear_attention(q, k, v, g, **kw)
  if name == "gla":
    g = -jax.nn.softplus(jax.random.normal(kg, (B, T, N, H))) / 16
    return lambda q, k, v: linear_lib.linear_attention(
      q, k, v, g, **{**kw, "chunk_size": gla_chunk}
    )
  beta = jax.nn.sigmoid(jax.random.normal(kg, (B, T, N)))
  g = None if name == "delta_rule" else -jax.nn.softplus(jax.random.normal(kg, (B, T, N))) / 16
  return lambda q, k, v: delta_lib.delta_rule_attention(q, k, v, beta, g, l2_normalize=True, **kw)


def time_fn(fn, args, reps, long_s):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
    if times[-1] > long_s:
      break
  return statistics.median(times)


def peak_bytes(fn, args):
  m = fn.lower(*args).compile().memory_analysis()
  if m is None:
    return None
  return int(
    m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  )


def measure(name, T, args, implementation, chunk):
  key = jax.random.key(T)
  q, k, v = (
    jax.random.normal(jax.random.fold_in(key, i), (B, T, N, H), jnp.float32) for i in range(3)
  )
  op = make_op(name, T, key, implementation if name != "softmax" else None, chunk, args.gla_chunk)
  fwd = jax.jit(op)
  bwd = jax.jit(jax.grad(lambda q, k, v: jnp.sum(op(q, k, v) ** 2), (0, 1, 2)))
  row = {"op": name, "T": T}
  for tag, fn in (("fwd", fwd), ("fwd_bwd", bwd)):
    row[f"{tag}_s"] = time_fn(fn, (q, k, v), args.reps, args.long_s)
    row[f"{tag}_us_per_token"] = 1e6 * row[f"{tag}_s"] / T
    row[f"{tag}_peak_mb"] = (peak_bytes(fn, (q, k, v)) or 0) / 2**20
  return row


def crossover(rows, op, key):
  soft = {r["T"]: r[key] for r in rows if r["op"] == "softmax"}
  for r in sorted((r for r in rows if r["op"] == op), key=lambda r: r["T"]):
    if r["T"] in soft and r[key] < soft[r["T"]]:
      return r["T"]
  return None


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--ts", default="1024,2048,4096,8192,16384,32768,65536,131072")
  p.add_argument("--ops", default=",".join(OPS))
  p.add_argument("--softmax_max", type=int, default=32768)
  p.add_argument("--chunk", type=int, default=64)
  p.add_argument("--gla_chunk", type=int, default=16)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--long_s", type=float, default=5.0)
  p.add_argument("--implementation", default="xla")
  p.add_argument("--note", default="", help="a line for the table's header (e.g. the machine)")
  p.add_argument("--out", default=str(RESULTS / "bench_linear"))
  args = p.parse_args(argv)
  ts = [int(t) for t in args.ts.split(",")]
  ops = args.ops.split(",")
  unknown = sorted(set(ops) - set(OPS))
  if unknown:
    p.error(f"unknown ops {unknown}; choose from {OPS}")
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  rows = []
  for T in ts:
    for name in ops:
      if name == "softmax" and T > args.softmax_max:
        continue
      t0 = time.perf_counter()
      row = measure(name, T, args, args.implementation, args.chunk)
      rows.append(row)
      print(
        f"T={T:6d} {name:12s} fwd {row['fwd_s'] * 1e3:9.1f} ms ({row['fwd_us_per_token']:6.2f} "
        f"µs/tok, {row['fwd_peak_mb']:8.1f} MB)  fwd+bwd {row['fwd_bwd_s'] * 1e3:9.1f} ms "
        f"({row['fwd_bwd_us_per_token']:6.2f} µs/tok, {row['fwd_bwd_peak_mb']:8.1f} MB)  "
        f"[{time.perf_counter() - t0:.0f} s]",
        flush=True,
      )
      # Written after every row: an interrupted run keeps what it measured.
      write(rows, ops, args, argv, out, final=False)
  write(rows, ops, args, argv, out, final=True)
  return rows


def write(rows, ops, args, argv, out, final):
  command = "python experiments/bench_linear.py " + " ".join(sys.argv[1:] if argv is None else argv)
  meta = {
    "command": command.strip(),
    "backend": jax.default_backend(),
    "B": B,
    "N": N,
    "H": H,
    "chunk": args.chunk,
    "gla_chunk": args.gla_chunk,
    "implementation": args.implementation,
    "reps": args.reps,
    "complete": final,
  }
  cross = {
    op: {key: crossover(rows, op, key) for key in ("fwd_s", "fwd_bwd_s")}
    for op in ops
    if op != "softmax"
  }
  out.with_suffix(".json").write_text(
    json.dumps({"settings": meta, "rows": rows, "crossover_T": cross}, indent=1)
  )
  if not final:
    return
  lines = [
    "# Chunked linear attention vs dense causal softmax: time, time per token, peak memory\n",
    f"B={B}, N={N}, H=Hv={H}, float32, chunk {args.chunk} (gla {args.gla_chunk}), linear ops on "
    f"`{args.implementation}`, softmax = causal `dot_product_attention` (xla), backend "
    f"{jax.default_backend()}, median of up to {args.reps} timed calls (one when a call "
    f"exceeds {args.long_s} s). Peak memory: XLA's accounting of the compiled program "
    "(arguments + outputs + temporaries).\n",
    *([args.note + "\n"] if args.note else []),
    f"Command: `{meta['command']}`\n",
    "| T | op | fwd ms | fwd µs/token | fwd peak MB | fwd+bwd ms | fwd+bwd µs/token "
    "| fwd+bwd peak MB | fwd vs softmax |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  soft = {r["T"]: r for r in rows if r["op"] == "softmax"}
  for r in rows:
    vs = f"{soft[r['T']]['fwd_s'] / r['fwd_s']:.2f}×" if r["T"] in soft else "—"
    lines.append(
      f"| {r['T']} | {r['op']} | {r['fwd_s'] * 1e3:.1f} | {r['fwd_us_per_token']:.2f} | "
      f"{r['fwd_peak_mb']:.1f} | {r['fwd_bwd_s'] * 1e3:.1f} | "
      f"{r['fwd_bwd_us_per_token']:.2f} | {r['fwd_bwd_peak_mb']:.1f} | {vs} |"
    )
  lines += ["", "Crossover (smallest measured T where the op is faster than softmax):", ""]
  lines += ["| op | forward | forward+backward |", "|---|---|---|"]
  for op, c in cross.items():
    lines.append(f"| {op} | {c['fwd_s'] or 'not reached'} | {c['fwd_bwd_s'] or 'not reached'} |")
  flat = []
  for op in ops:
    sel = sorted((r for r in rows if r["op"] == op), key=lambda r: r["T"])
    if len(sel) > 1 and op != "softmax":
      per = [r["fwd_us_per_token"] for r in sel]
      flat.append(
        f"| {op} | {sel[0]['T']}–{sel[-1]['T']} | {per[0]:.2f} | {per[-1]:.2f} | "
        f"{per[-1] / per[0]:.2f} | {statistics.median(per):.2f} | {max(per) / min(per):.2f} |"
      )
  lines += [
    "",
    "Forward time per token across T (flat = constant speed):",
    "",
    "| op | T range | µs/token at first T | at last T | last / first | median | max / min |",
    "|---|---|---|---|---|---|---|",
    *flat,
  ]
  out.with_suffix(".md").write_text("\n".join(lines) + "\n")
  plot(rows, ops, out.with_suffix(".png"))
  print("\n".join(lines))


def plot(rows, ops, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for op in ops:
    sel = sorted((r for r in rows if r["op"] == op), key=lambda r: r["T"])
    if not sel:
      continue
    ts = np.array([r["T"] for r in sel])
    style = dict(marker="o", label=op, ls="--" if op == "softmax" else "-")
    axes[0].plot(ts, [r["fwd_us_per_token"] for r in sel], **style)
    axes[1].plot(ts, [r["fwd_bwd_us_per_token"] for r in sel], **style)
    axes[2].plot(ts, [r["fwd_bwd_peak_mb"] for r in sel], **style)
  for ax, title in zip(
    axes, ("forward µs / token", "fwd+bwd µs / token", "fwd+bwd peak MB"), strict=True
  ):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("T")
    ax.set_title(title)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main()
