r"""Sparse attention vs dense causal attention: realised speedup / ideal speedup.

For each length T and target density ρ (1/2 ... 1/32 of the causal work) it times, in one
run, dense causal attention and three sparse patterns on the same q, k, v (B=1, N=8, H=64,
float32): a sliding window (``sliding_window``), a random causal block-sparse pattern
(``BlockSparseMask``, the diagonal block always kept) and MoBA (``moba``: per-query block
selection by a parameter-free gate). Forward and forward+backward, ``--reps`` timed rounds
after a warm-up (compilation excluded).

The ideal speedup is the ratio of computed tiles: (tiles of the causal map) / (tiles of the
sparse map), the work the blocked path does (``block_lists`` at the benchmark's block
size; the sparse patterns run with tiles of that block, dense causal with the faster of
its default tiles and that block's). The realised speedup is t_dense / t_sparse; the
script reports realised / ideal (the issue's target on the pure-JAX path: >= 0.7). MoBA
selects per query, so a tile is computed when ANY of its queries selected the block: its
tile count is measured from the selection itself, and MoBA also pays for its gate.

  .venv/bin/python experiments/bench_sparse.py                          # T 1k-8k, this CPU
  .venv/bin/python experiments/bench_sparse.py --cpu_devices=2          # one device per core
  .venv/bin/python experiments/bench_sparse.py --processes=2            # one process per core
  .venv/bin/python experiments/bench_sparse.py --ts=16384,32768 --densities=8,32 --reps=2
  python experiments/bench_sparse.py --implementation=pallas_tpu        # on a TPU VM
  python experiments/bench_sparse.py --implementation=pallas_gpu        # on a GPU
      # (dense, sliding-window and block-sparse rows on the kernels; MoBA's per-query
      # selection stays on the pure-JAX path)

Timing: the dense baseline and each sparse pattern are timed in rounds: one dense call and
a batch of m sparse calls that lasts about as long (m = dense / sparse time of a warm-up
call, at most 64), the order alternating between rounds. A round's speedup is its dense
time over the mean of its batch; the realised speedup is the median over rounds. Both
paths of a round see the same spell of a shared machine (this one has slow spells of
seconds, which a single short sparse call catches or misses whole: one call per path and
rep moved cells by ±0.1-0.3 between runs). The tables also give the median call times.
The dense baseline runs with the faster of its default and the benchmark's tiles, chosen
once per T by an interleaved race.

``--cpu_devices=N`` (CPU only) splits the host into N XLA devices, one per core, and runs
every path, dense included, with its heads split over them (``sharded_attention`` /
``shard_map``) and q, k, v placed split by heads beforehand (as a head-sharded model's
activations are; splitting them inside the timed call measured 5-20 ms of copies here,
more than a whole 1/32 sparse pass). On XLA:CPU a single device spreads only large
operations over the cores: the dense path's 512-token tiles gain from the second core,
128-token tiles of a sparse pattern do not (measured here), so on one device the
comparison measures XLA's threading as much as the skipping; with a device per core each
core runs its own heads' tiles.

``--processes=N`` (CPU only) runs N worker processes instead, each pinned to its own core
with N-th of the heads and one XLA device, timing the same cells in step (a barrier before
each timed call); a cell's time is the slowest worker's, the wall time of a step in which
every core runs its heads. Head-split attention needs no communication, so this is what a
one-process-per-core deployment (``jax.distributed`` over local processes) runs. It exists
because two XLA devices in ONE process measured about 2x slower than two pinned processes
on sparse patterns of 128-token tiles (a diagonal-only pattern, 4 heads per core, T = 4096:
21 ms vs 10-11 ms; dense causal alike in both).

Writes ``experiments/results/bench_sparse.{json,md,png}``.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # the device count must be set before jax starts
  for _arg in sys.argv[1:]:
    if _arg.startswith("--cpu_devices="):
      _flag = f"--xla_force_host_platform_device_count={int(_arg.split('=', 1)[1])}"
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from attn_jax import host_memory  # noqa: E402
from attn_jax.attention import (  # noqa: E402
  BlockSparseMask,
  CausalMask,
  dot_product_attention,
  sliding_window,
)
from attn_jax.attention import moba as moba_lib  # noqa: E402
from attn_jax.attention.sharded import sharded_attention  # noqa: E402

B, N, H = 1, 8, 64
RESULTS = Path(__file__).resolve().parent / "results"


def tiles(mask, T, block):
  return int(np.asarray(mask.block_lists(T, T, block, block)[0]).sum())


def random_block_sparse(T, block, density, seed):
  """Per q block i: the diagonal block plus a random ρ share of the earlier blocks."""
  rng = np.random.default_rng(seed)
  nQ = T // block
  rows = []
  for i in range(nQ):
    extra = int(round(density * (i + 1))) - 1
    earlier = rng.permutation(i)[: max(extra, 0)]
    rows.append(sorted([*earlier.tolist(), i]))
  width = max(len(r) for r in rows)
  idx = np.full((nQ, width), -1, np.int32)
  for i, r in enumerate(rows):
    idx[i, : len(r)] = r
  return BlockSparseMask(jnp.asarray(idx), block) & CausalMask()


def time_interleaved(fns, args, reps, sync=lambda: None):
  """Median seconds of each fn, timed in turns (a, b, b, a, ...) after one warm-up each.

  ``sync`` (the workers' barrier) runs before every timed call, so the workers time the
  same function at the same time: a worker's call never overlaps another worker's call of
  the other function. Measured (two workers, T = 8192, densities 1/16-1/32): with a barrier
  only before the race, the two workers' forward ratios differed by up to 0.27 in a cell
  (0.53 vs 0.80); with one before every call, by at most 0.04."""
  for fn in fns:
    jax.block_until_ready(fn(*args))
  times = [[] for _ in fns]
  for rep in range(reps):
    order = range(len(fns)) if rep % 2 == 0 else reversed(range(len(fns)))
    for i in order:
      times[i].append(_timed_call(fns[i], args, sync))
  return [statistics.median(t) for t in times]


def _timed_call(fn, args, sync):
  sync()
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


MAX_BATCH = 64


def time_rounds(dense_fn, sparse_fn, args, reps, sync=lambda: None, agree=lambda x: x):
  """``reps`` rounds of one dense call and a batch of sparse calls lasting about as long.

  Returns {"dense": [seconds per round], "sparse": [[seconds per call] per round]}. The
  batch size m = t_dense / t_sparse of a timed warm-up (at most ``MAX_BATCH``; ``agree``
  makes the workers use the same m) gives both paths the same exposure to the machine:
  this machine has slow spells of seconds (a fixed numpy matmul loop, pinned, measured
  0.47-0.84 s per 20 products), which a single 15-80 ms sparse call catches or misses
  whole, so one call per path and rep moved single cells by ±0.1-0.3. Each round's
  speedup is its dense time over the mean of its batch, both spanning adjacent equal
  spells (``with_ratios``). The order alternates between rounds; ``sync`` runs before
  every call."""
  for fn in (dense_fn, sparse_fn):
    jax.block_until_ready(fn(*args))
  t_dense = _timed_call(dense_fn, args, sync)
  t_sparse = _timed_call(sparse_fn, args, sync)
  m = int(agree(min(MAX_BATCH, max(1, round(t_dense / t_sparse)))))
  rounds = {"dense": [], "sparse": []}
  for rep in range(reps):
    if rep % 2:
      rounds["sparse"].append([_timed_call(sparse_fn, args, sync) for _ in range(m)])
      rounds["dense"].append(_timed_call(dense_fn, args, sync))
    else:
      rounds["dense"].append(_timed_call(dense_fn, args, sync))
      rounds["sparse"].append([_timed_call(sparse_fn, args, sync) for _ in range(m)])
  return rounds


def compiled(attend):
  """(forward, forward+backward) jitted functions of attend(q, k, v)."""
  fwd = jax.jit(attend)
  bwd = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v)), (0, 1, 2)))
  return fwd, bwd


def race(fns_a, fns_b, args, reps, sync=lambda: None):
  """{"fwd_s", "fwd_bwd_s"} of a and of b, each kind timed interleaved."""
  out_a, out_b = {}, {}
  for i, kind in enumerate(("fwd_s", "fwd_bwd_s")):
    out_a[kind], out_b[kind] = time_interleaved([fns_a[i], fns_b[i]], args, reps, sync)
  return out_a, out_b


def head_split(fn, mesh):
  """fn(q, k, v) with the heads split over the mesh's devices (identity without a mesh)."""
  if mesh is None:
    return fn
  spec = PartitionSpec(None, None, "heads", None)
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)


def masked_attention(mask, impl, mesh, tiles_kw):
  """Attention under a mask, split over the mesh's devices by heads when there is one."""
  if mesh is None:
    return lambda q, k, v: dot_product_attention(
      q, k, v, mask=mask, implementation=impl, **tiles_kw
    )
  return lambda q, k, v: sharded_attention(
    q,
    k,
    v,
    mesh=mesh,
    batch_axes=None,
    head_axes="heads",
    mask=mask,
    implementation=impl,
    **tiles_kw,
  )


KINDS = ("fwd", "fwd_bwd")


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--ts", default="1024,2048,4096,8192")
  p.add_argument("--densities", default="2,4,8,16,32", help="denominators of ρ")
  p.add_argument("--block", type=int, default=128)
  p.add_argument("--reps", type=int, default=5, help="timed calls per path and cell (medians)")
  p.add_argument("--implementation", default="xla")
  p.add_argument("--patterns", default="sliding_window,block_sparse,moba")
  p.add_argument(
    "--cpu_devices",
    type=int,
    default=1,
    help="split the CPU into this many XLA devices and the heads over them (set at start-up)",
  )
  p.add_argument(
    "--processes",
    type=int,
    default=1,
    help="CPU only: run this many worker processes, each pinned to its own core with its "
    "share of the heads, timing the same cells in step (a barrier before each timed call); "
    "a cell's time is the slowest worker's",
  )
  p.add_argument(
    "--keep_freed_memory",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="glibc keeps and reuses freed memory (attn_jax.host_memory), in every process: "
    "XLA:CPU scratch above 32 MiB is otherwise page-faulted in again on every call",
  )
  p.add_argument("--out", default=str(RESULTS / "bench_sparse"))
  return p.parse_args(argv)


def measure(args, heads, mesh, sync=lambda: None, seed=0, agree=lambda x: x):
  """The table's rows for ``heads`` heads (all of them, or one worker's share)."""
  ts = [int(t) for t in args.ts.split(",")]
  dens = [int(d) for d in args.densities.split(",")]
  patterns = [s for s in args.patterns.split(",") if s]
  impl = args.implementation
  rows = []
  for T in ts:
    if T % args.block:
      raise SystemExit(f"T={T} must be a multiple of --block={args.block}")
    kq, kk, kv = jax.random.split(jax.random.fold_in(jax.random.key(T), seed), 3)
    q = jax.random.normal(kq, (B, T, heads, H), jnp.float32)
    k = jax.random.normal(kk, (B, T, heads, H), jnp.float32)
    v = jax.random.normal(kv, (B, T, heads, H), jnp.float32)
    if mesh is not None:  # activations live split by heads, as in a head-sharded model
      q, k, v = jax.device_put((q, k, v), NamedSharding(mesh, PartitionSpec(None, None, "heads")))
    causal_tiles = tiles(CausalMask(), T, args.block)
    # The blocked xla path skips at its tile granularity: sparse patterns run with tiles of
    # the benchmark's block (the granularity of the ideal count). Dense causal runs with the
    # faster of its default tiles and the block's (an interleaved race, once per T). The
    # kernels choose their own tiles (dividing the blocks).
    tiles_kw = {} if impl.startswith("pallas") else {"block_q": args.block, "block_kv": args.block}
    dense_fns = compiled(masked_attention(CausalMask(), impl, mesh, {}))
    dense_tiles = "default"
    if tiles_kw:
      block_fns = compiled(masked_attention(CausalMask(), impl, mesh, tiles_kw))
      default_t, block_t = race(dense_fns, block_fns, (q, k, v), args.reps, sync)
      # Workers decide on the slowest worker's times, so all of them run the same baseline.
      if agree(block_t["fwd_bwd_s"]) < agree(default_t["fwd_bwd_s"]):
        dense_fns, dense_tiles = block_fns, f"{args.block}"
      print(
        f"T={T} dense causal, default tiles: fwd {default_t['fwd_s'] * 1e3:.1f} ms, fwd+bwd "
        f"{default_t['fwd_bwd_s'] * 1e3:.1f} ms; {args.block}-tiles: fwd "
        f"{block_t['fwd_s'] * 1e3:.1f} ms, fwd+bwd {block_t['fwd_bwd_s'] * 1e3:.1f} ms "
        f"-> baseline {dense_tiles}",
        flush=True,
      )
    nblocks = T // args.block
    for d in dens:
      rho = 1.0 / d
      for name in patterns:
        if name == "sliding_window":
          w = max(1, int(round(T * (1 - math.sqrt(1 - rho)))))  # ~ρ of the causal pairs
          mask = sliding_window(w)
          n_tiles = tiles(mask, T, args.block)
          attend = masked_attention(mask, impl, mesh, tiles_kw)
        elif name == "block_sparse":
          mask = random_block_sparse(T, args.block, rho, seed=T + d)
          n_tiles = tiles(mask, T, args.block)
          # On pallas_* this is the block-sparse kernel: the lists drive the kv tiles.
          attend = masked_attention(mask, impl, mesh, tiles_kw)
        elif name == "moba":
          top_k = max(1, int(round(rho * nblocks)))
          _, sel = moba_lib.moba(
            q, k, v, moba_block=args.block, moba_top_k=top_k, return_selection=True
          )
          sel = np.asarray(sel)  # [B, N, T, nC]: a tile counts if any of its queries chose it
          per_tile = sel.reshape(B, heads, nblocks, args.block, nblocks).any(3)
          n_tiles = per_tile.sum() / (B * heads)

          def moba_attend(q, k, v, top_k=top_k):
            return moba_lib.moba(q, k, v, moba_block=args.block, moba_top_k=top_k)

          attend = head_split(moba_attend, mesh)
        else:
          raise SystemExit(f"unknown pattern {name!r}")
        sparse_fns = compiled(attend)
        row = {
          "T": T,
          "pattern": name,
          "target_density": rho,
          "tiles": float(n_tiles),
          "causal_tiles": causal_tiles,
          "dense_tiles": dense_tiles,
        }
        for i, kind in enumerate(KINDS):
          row[f"{kind}_rounds"] = time_rounds(
            dense_fns[i], sparse_fns[i], (q, k, v), args.reps, sync, agree
          )
        rows.append(with_ratios(row))
        print(
          f"  1/{d} {name:>14}: ideal {row['ideal_speedup']:5.2f}x  fwd "
          f"{row['fwd_speedup']:5.2f}x (ratio {row['fwd_ratio']:.2f})  fwd+bwd "
          f"{row['fwd_bwd_speedup']:5.2f}x (ratio {row['fwd_bwd_ratio']:.2f})",
          flush=True,
        )
  return rows


def with_ratios(row):
  """Adds times, the ideal and realised speedups and their ratios to a row of rounds.

  Per kind: ``dense_<kind>_s`` and ``<kind>_s`` are the median dense and sparse call
  times; the realised speedup is the median over rounds of (the round's dense time / the
  mean of its sparse batch)."""
  row["ideal_speedup"] = row["causal_tiles"] / row["tiles"]
  for kind in KINDS:
    rounds = row[f"{kind}_rounds"]
    row[f"dense_{kind}_s"] = statistics.median(rounds["dense"])
    row[f"{kind}_s"] = statistics.median([t for batch in rounds["sparse"] for t in batch])
    row[f"{kind}_batch"] = len(rounds["sparse"][0])
    row[f"{kind}_speedup"] = statistics.median(
      d / statistics.fmean(batch)
      for d, batch in zip(rounds["dense"], rounds["sparse"], strict=True)
    )
    row[f"{kind}_ratio"] = row[f"{kind}_speedup"] / row["ideal_speedup"]
  return row


def merge_cells(cells):
  """One row from the workers' rows of a cell: every call's time is the slowest worker's
  (the calls ran in step), MoBA's tiles are averaged, each worker's own ratios kept."""
  row = dict(cells[0])
  for kind in KINDS:
    rounds = [c[f"{kind}_rounds"] for c in cells]
    row[f"{kind}_rounds"] = {
      "dense": [max(ts) for ts in zip(*(r["dense"] for r in rounds), strict=True)],
      "sparse": [
        [max(ts) for ts in zip(*batches, strict=True)]
        for batches in zip(*(r["sparse"] for r in rounds), strict=True)
      ],
    }
  row["tiles"] = float(np.mean([c["tiles"] for c in cells]))
  row["per_process_ratios"] = [(c["fwd_ratio"], c["fwd_bwd_ratio"]) for c in cells]
  return with_ratios(row)


def _die_with_parent():
  """On Linux a worker gets SIGTERM when the parent exits, so a killed benchmark leaves no
  workers running (and slowing down whatever is timed next)."""
  try:
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):  # not Linux
    pass


def _worker(index, args, barrier, shared, queue):
  """One pinned worker of ``--processes``: its share of the heads, in step with the rest."""
  _die_with_parent()
  os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[index]})  # before XLA starts
  if args.keep_freed_memory:
    host_memory.keep_freed_memory()

  def agree(x):  # the largest of the workers' values, the same in every worker
    shared[index] = x
    barrier.wait()
    value = max(shared[:])
    barrier.wait()  # nobody writes the next value before everyone has read this one
    return value

  try:
    rows = measure(args, N // args.processes, None, sync=barrier.wait, seed=index, agree=agree)
    queue.put((index, rows, None))
  except BaseException as e:  # the parent reports it; the barrier must not hang the others
    barrier.abort()
    queue.put((index, None, f"{type(e).__name__}: {e}"))


def run_processes(args):
  """Rows merged over ``args.processes`` pinned workers: per cell, the slowest worker's time
  (the wall time when every core runs its heads at once); MoBA's tiles averaged."""
  import multiprocessing

  P = args.processes
  cores = sorted(os.sched_getaffinity(0))
  if P > len(cores) or N % P:
    raise SystemExit(f"--processes={P} needs that many cores (have {len(cores)}) dividing N={N}")
  if args.cpu_devices > 1 or args.implementation.startswith("pallas"):
    raise SystemExit("--processes is for the CPU xla path, without --cpu_devices")
  ctx = multiprocessing.get_context("spawn")
  barrier, shared, queue = ctx.Barrier(P), ctx.Array("d", P), ctx.Queue()
  procs = [ctx.Process(target=_worker, args=(i, args, barrier, shared, queue)) for i in range(P)]
  for proc in procs:
    proc.start()
  results = {}
  for _ in procs:
    index, rows, error = queue.get()
    if error is not None:
      for proc in procs:
        proc.terminate()
      raise SystemExit(f"worker {index} failed: {error}")
    results[index] = rows
  for proc in procs:
    proc.join()
  return [merge_cells(cells) for cells in zip(*(results[i] for i in range(P)), strict=True)]


def main(argv=None):
  args = parse_args(argv)
  if args.keep_freed_memory:  # before XLA starts its threads
    host_memory.keep_freed_memory()
  impl = args.implementation
  mesh = None
  if args.processes > 1:
    rows = run_processes(args)
  else:
    if args.cpu_devices > 1:
      devices = jax.devices()
      if len(devices) < args.cpu_devices or N % args.cpu_devices:
        raise SystemExit(
          f"--cpu_devices={args.cpu_devices} needs that many devices (found {len(devices)}; "
          "pass it on the command line, which sets XLA_FLAGS before jax starts) dividing "
          f"N={N} heads"
        )
      mesh = Mesh(np.array(devices[: args.cpu_devices]), ("heads",))
    rows = measure(args, N, mesh)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  command = "python experiments/bench_sparse.py " + " ".join(sys.argv[1:] if argv is None else argv)
  meta = {
    "command": command,
    "backend": jax.default_backend(),
    "B": B,
    "N": N,
    "H": H,
    "block": args.block,
    "implementation": impl,
    "reps": args.reps,
    "cpu_devices": args.cpu_devices,
    "processes": args.processes,
    "keep_freed_memory": args.keep_freed_memory,
  }
  out.with_suffix(".json").write_text(json.dumps({"settings": meta, "rows": rows}, indent=1))
  if mesh is not None:
    where = f" split into {args.cpu_devices} devices (heads split over them)"
  elif args.processes > 1:
    where = (
      f", {args.processes} processes each pinned to one core with {N // args.processes} of "
      "the heads, timing in step (a cell's time is the slowest process's)"
    )
  else:
    where = ""
  memory = ", glibc keeping freed memory (attn_jax.host_memory)" if args.keep_freed_memory else ""
  lines = [
    "# Sparse vs dense causal attention: realised / ideal speedup\n",
    f"B={B}, N={N}, H={H}, float32, block {args.block}, implementation {impl}, backend "
    f"{jax.default_backend()}{where}{memory}; {args.reps} rounds of one dense call and a "
    "batch of m sparse calls lasting about as long; speedup = median over rounds of dense "
    "time / mean sparse time. Ideal = causal tiles / sparse tiles; ratio = realised / ideal.\n",
    f"Command: `{command}`\n",
    "Times are median calls in ms, dense / sparse (m).\n",
    "| T | pattern | target ρ | ideal | fwd ms | fwd speedup | fwd ratio | fwd+bwd ms "
    "| fwd+bwd speedup | fwd+bwd ratio |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]

  def ms(r, kind):
    return f"{r[f'dense_{kind}_s'] * 1e3:.1f} / {r[f'{kind}_s'] * 1e3:.1f} ({r[f'{kind}_batch']})"

  for r in rows:
    lines.append(
      f"| {r['T']} | {r['pattern']} | 1/{round(1 / r['target_density'])} | "
      f"{r['ideal_speedup']:.2f} | {ms(r, 'fwd')} | {r['fwd_speedup']:.2f} | "
      f"{r['fwd_ratio']:.2f} | {ms(r, 'fwd_bwd')} | {r['fwd_bwd_speedup']:.2f} | "
      f"{r['fwd_bwd_ratio']:.2f} |"
    )
  out.with_suffix(".md").write_text("\n".join(lines) + "\n")
  plot(rows, out.with_suffix(".png"))
  print("\n".join(lines))
  return rows


def plot(rows, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, key in zip(axes, ("fwd_ratio", "fwd_bwd_ratio"), strict=True):
    for pattern, T in sorted({(r["pattern"], r["T"]) for r in rows}):
      sel = [r for r in rows if r["pattern"] == pattern and r["T"] == T]
      ax.plot(
        [r["ideal_speedup"] for r in sel],
        [r[key] for r in sel],
        marker="o",
        label=f"{pattern} T={T}",
      )
    ax.axhline(0.7, color="k", ls="--", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("ideal speedup (causal tiles / sparse tiles)")
    ax.set_ylabel("realised / ideal")
    ax.set_title(key.replace("_ratio", "").replace("_", "+"))
  axes[1].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main()
