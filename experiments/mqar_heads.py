r"""MQAR for the head-structure, cross-head and routing mechanisms (and the score functions
that change the heads), each with the head count it needs.

Every row is one ``python -m attn_jax.main`` run through ``experiments/mqar_sweep.py``
(fresh examples every step, as its figure-2 preset), in ``runs/mqar_heads/<heads>/``; runs
that finished are reused, so the table can be built while the sweep is still going or
after it was interrupted (``--only_finished`` tabulates what exists without launching).

  python experiments/mqar_heads.py                        # every row, (64,4), d_model=64
  python experiments/mqar_heads.py --rows=gqa,mqa --cells=64x4,128x8
  python experiments/mqar_heads.py --only_finished        # just the table of finished runs

Writes ``experiments/results/mqar_heads.{md,json,png}``.
"""

import argparse
import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mqar_sweep  # noqa: E402

# name -> (heads directory, get_config arguments, config overrides)
ROWS = {
  "gqa": ("h4k2", "num_heads=4", "model.num_kv_heads=2"),
  "mqa": ("h2", "num_heads=2", ""),
  "moh": ("h4", "num_heads=4", ""),
  "mla": ("h2", "num_heads=2", ""),
  "moa": ("h4k1", "num_heads=4", "model.num_kv_heads=1"),
  "mae_h1": ("h4", "num_heads=4", ""),
  "dha": ("h4k2", "num_heads=4", "model.num_kv_heads=2"),
  "diff_attn": ("h2", "num_heads=2", ""),
  "knocking_heads": ("h4", "num_heads=4", ""),
  "mhe": ("h4", "num_heads=4", ""),
  "talking_heads": ("h4", "num_heads=4", ""),
}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {list(ROWS)}")
  p.add_argument("--cells", default="64x4")
  p.add_argument("--d_model", type=int, default=64)
  p.add_argument("--out", default="experiments/results/mqar_heads")
  p.add_argument("--only_finished", action="store_true", help="tabulate without launching")
  args = p.parse_args(argv)
  os.chdir(mqar_sweep.ROOT)
  cells = [tuple(int(x) for x in c.split("x")) for c in args.cells.split(",")]
  results = []
  for name in filter(None, args.rows.split(",")):
    if name not in ROWS:
      raise SystemExit(f"unknown row {name!r}; known: {list(ROWS)}")
    heads_dir, config_arg, sets = ROWS[name]
    run_args = types.SimpleNamespace(
      runs_dir=f"runs/mqar_heads/{heads_dir}",
      config_arg=f"num_train=3072000,epochs=1,{config_arg}",
      sets=",".join(filter(None, ["eval_every=250", sets])),
      rerun=False,
    )
    for L, P in cells:
      workdir = os.path.join(run_args.runs_dir, mqar_sweep.run_name(name, L, P, args.d_model))
      finished = os.path.exists(os.path.join(workdir, "summary.json"))
      if args.only_finished and not finished:
        print(f"[skip] {name} (L={L}, P={P}): no finished run in {workdir}")
        continue
      (row,) = mqar_sweep.collect([name], [(L, P)], [args.d_model], run_args)
      row["mechanism"] = f"{name} ({heads_dir})"
      results.append(row)
  if not results:
    raise SystemExit("no finished runs to tabulate")
  table = mqar_sweep.write_table(results, args.out)
  mqar_sweep.plot(results, args.out)
  print("\n" + table)


if __name__ == "__main__":
  main()
