r"""MQAR for a family of mechanisms, each row with the head count and options it needs:
``--family=heads`` (default) the head-structure, cross-head and routing mechanisms and the
score functions that change the heads; ``--family=sparse`` the causal sparse patterns.

Every row is one ``python -m attn_jax.main`` run through ``experiments/mqar_sweep.py``
(fresh examples every step, as its figure-2 preset), in ``runs/mqar_<family>/<heads>/``
(``runs/mqar_<family>_small/`` for the small setting); runs that finished are reused, so the
table can be built while the sweep is still going or after it was interrupted
(``--only_finished`` tabulates what exists without launching).

  python experiments/mqar_heads.py                        # every row, (64,4), d_model=64
  python experiments/mqar_heads.py --rows=gqa,mqa --cells=64x4,128x8
  python experiments/mqar_heads.py --only_finished        # just the table of finished runs
  python experiments/mqar_heads.py --setting=small --cells=64x4,128x8 \
      --out=experiments/results/mqar_heads_small           # the CPU-sized setting

Settings: ``zoology`` (default) — vocabulary 8192, batch 512, 3,072,000 fresh examples,
lr 2.15e-3, evaluation every 250 steps on 3,000 examples; ``small`` — vocabulary 256,
batch 64, 192,000 fresh examples (3,000 steps), lr 1e-2, evaluation every 100 steps on
1,000 examples: about 8x cheaper per step, so every mechanism of the head-structure and
score-function issues fits a CPU session (``mha`` is its baseline row).

Sweeps (Zoology's protocol: each row reports its best run): ``--lrs=1e-2,3e-3`` and
``--steps=0,10000`` (0 = the setting's budget) run every (budget, rate) pair, each in its own
runs directory, and the table keeps the best with its budget and rate in the row's name. A
run stops early at 0.99, so a longer budget costs nothing once the task is solved; it
matters because warm-up and cosine decay follow the budget (at (128,8) gqa, moa and moh stay
near 0.35 within 3,000 steps and solve by step 1,100–2,800 of a 10,000-step schedule). The
small setting's table (without ``--only_finished`` it also trains what is missing):

  python experiments/mqar_heads.py --setting=small --cells=64x4,128x8 --lrs=1e-2,3e-3 \
      --steps=0,10000 --only_finished --out=experiments/results/mqar_heads_small

The sparse family in the small setting (issue 7's rows that are causal):

  python experiments/mqar_heads.py --family=sparse --setting=small --cells=64x4,128x8 \
      --lrs=1e-2,3e-3 --steps=0,10000

Writes ``experiments/results/<runs dir name>.{md,json,png}``, e.g. ``mqar_heads_small``
(``--out`` to change).
"""

import argparse
import os
import shlex
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mqar_sweep  # noqa: E402

# name (a registry id, or "id:option=value" as mqar_sweep takes) -> (heads directory,
# get_config arguments, config overrides)
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
  "mha": ("h1", "num_heads=1", ""),
  "head_dims": ("h2", "num_heads=2", ""),
  "mla_absorbed": ("h2", "num_heads=2", ""),
  # MLA without its decoupled rotary dims (R = 0): positions come from the learned embedding
  # alone, as for every other row; it solves within the 3,000-step budget, where the default
  # R = d_h/2 needs the 10,000-step schedule.
  "mla:qk_rope_head_dim=0": ("h2", "num_heads=2", ""),
  "mla_absorbed:qk_rope_head_dim=0": ("h2", "num_heads=2", ""),
  "sigma_diffqkv": ("h4", "num_heads=4", ""),
  # dcmha and rel_skew train on their dense 'reference' path (the same math, tested equal to
  # the default): at T <= 128 it is 1.5x (dcmha) and 2.8x (rel_skew) faster per step on CPU.
  "dcmha": ("h4", "num_heads=4", "model.implementation=reference"),
  "mta": ("h4", "num_heads=4", ""),
  "chai": ("h4", "num_heads=4", ""),
  "longheads": ("h4", "num_heads=4", ""),
  "qada": ("h2", "num_heads=2", ""),
  # score functions and modifiers (catalog families a, e)
  "grouped_diff_attn": ("h4", "num_heads=4", ""),
  "cog_attn": ("h2", "num_heads=2", ""),
  "entmax": ("h2", "num_heads=2", ""),
  "mgk": ("h2", "num_heads=2", ""),
  "tab": ("h2", "num_heads=2", ""),
  "relational_attn": ("h2", "num_heads=2", ""),
  "positional_attn": ("h2", "num_heads=2", ""),
  "group_mask": ("h2", "num_heads=2", ""),
  "rel_skew": ("h2", "num_heads=2", "model.implementation=reference"),
  "query_temperature": ("h2", "num_heads=2", ""),
  "coca": ("h2", "num_heads=2", ""),
}
# The sparse family (issue 7's rows that are causal, so MQAR can train them): every pattern
# is sized so that a query sees a quarter of the (64,4) sequence (an eighth at (128,8));
# sliding windows of 8/16/32/64 give the curve by window size (64 is the whole (64,4)
# sequence, half of (128,8)). The non-causal rows (biformer, vmoba, window_2d, davit)
# cannot run a causal LM task and are not listed.
SPARSE_ROWS = {
  "sliding_window:window=8": ("h2", "num_heads=2", ""),
  "sliding_window:window=16": ("h2", "num_heads=2", ""),
  "sliding_window:window=32": ("h2", "num_heads=2", ""),
  "sliding_window:window=64": ("h2", "num_heads=2", ""),
  "sink_window:window=16;sink_tokens=4": ("h2", "num_heads=2", ""),
  "gna:window=16": ("h2", "num_heads=2", ""),
  "mw_mha:window=16": ("h2", "num_heads=2", ""),
  "moba:moba_block=16;moba_top_k=2": ("h2", "num_heads=2", ""),
  "nsa:nsa_block=8;nsa_top_n=3;nsa_window=16": ("h2", "num_heads=2", ""),
  "flexprefill:flex_block=16": ("h2", "num_heads=2", ""),
  "landmark:landmark_block=15": ("h2", "num_heads=2", ""),
  "dma:dma_window=16": ("h2", "num_heads=2", ""),
  "routing_transformer:routing_clusters=4": ("h2", "num_heads=2", ""),
  # The strictly causal variant (each token to its nearest centroid), alone and with a
  # local window of 8 keys in the same head.
  "routing_transformer:routing_clusters=4;routing_mode=nearest": ("h2", "num_heads=2", ""),
  "routing_transformer:routing_clusters=4;routing_mode=nearest;routing_window=8": (
    "h2",
    "num_heads=2",
    "",
  ),
}
FAMILIES = {"heads": ROWS, "sparse": SPARSE_ROWS}
# name -> (get_config arguments, config overrides); runs go to runs/mqar_<family>[_<setting>]
SETTINGS = {
  "zoology": ("lr=2.15e-3,num_train=3072000,epochs=1", "eval_every=250"),
  "small": (
    "vocab_size=256,batch_size=64,lr=1e-2,num_train=192000,epochs=1",
    "eval_every=100,eval_examples=1000,checkpoint_every=500",
  ),
}


def runs_root(family: str, setting: str) -> str:
  """The runs directory of a (family, setting): runs/mqar_heads, runs/mqar_sparse_small, ..."""
  return f"runs/mqar_{family}" + ("" if setting == "zoology" else f"_{setting}")


def setting_value(config_arg: str, key: str, default=None) -> float:
  """The value a setting's get_config arguments give ``key`` (``default`` when absent)."""
  values = [float(kv.split("=")[1]) for kv in config_arg.split(",") if kv.startswith(key + "=")]
  return values[0] if values else default


def setting_lr(config_arg: str) -> float:
  """The learning rate a setting's get_config arguments name."""
  return setting_value(config_arg, "lr")


def plot_bars(results, out: str) -> None:
  """One horizontal bar per (row, cell): the row's best test accuracy, with the 0.99 line
  (readable for dozens of rows, where one learning curve per row is not)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(dict.fromkeys(r["mechanism"].split(" (")[0] for r in results))
  cells = sorted({(r["seq_len"], r["num_pairs"]) for r in results})
  acc = {(r["mechanism"].split(" (")[0], r["seq_len"], r["num_pairs"]): r for r in results}
  height = 0.8 / len(cells)
  fig, ax = plt.subplots(figsize=(7, 0.32 * len(names) + 1.2))
  for c, (L, P) in enumerate(cells):
    ys = [i + c * height for i, n in enumerate(names) if (n, L, P) in acc]
    xs = [acc[n, L, P]["accuracy"] for n in names if (n, L, P) in acc]
    ax.barh(ys, xs, height=height, label=f"({L},{P})")
  ax.axvline(0.99, color="grey", lw=0.8, ls="--")
  ax.set_yticks([i + 0.4 - height / 2 for i in range(len(names))], names, fontsize=8)
  ax.invert_yaxis()
  ax.set(xlim=(0, 1.02), xlabel="MQAR test accuracy (best variant per row)")
  ax.legend(title="(L, P)", fontsize=8, loc="lower right")
  fig.tight_layout()
  fig.savefig(out + ".png", dpi=110)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--family", choices=sorted(FAMILIES), default="heads")
  p.add_argument("--rows", default="", help="comma-separated rows of the family (default: all)")
  p.add_argument("--cells", default="64x4")
  p.add_argument("--d_model", type=int, default=64)
  p.add_argument(
    "--out", default="", help="table/plot path stem (default experiments/results/<runs dir name>)"
  )
  p.add_argument("--only_finished", action="store_true", help="tabulate without launching")
  p.add_argument("--setting", choices=sorted(SETTINGS), default="zoology")
  p.add_argument(
    "--lrs",
    default="",
    help="comma-separated learning rates to sweep (default: the setting's); a rate other than "
    "the setting's runs in <runs_dir>_lr<rate>/, and the table keeps each row's best rate "
    "(Zoology's protocol)",
  )
  p.add_argument(
    "--steps",
    default="",
    help="comma-separated training budgets in steps (fresh batches; 0 = the setting's); a "
    "budget other than the setting's runs in <runs_dir>_steps<N>/, and the table keeps each "
    "row's best (budget, rate)",
  )
  args = p.parse_args(argv)
  os.chdir(mqar_sweep.ROOT)
  cells = [tuple(int(x) for x in c.split("x")) for c in args.cells.split(",")]
  rows = FAMILIES[args.family]
  setting_arg, base_sets = SETTINGS[args.setting]
  setting_dir = runs_root(args.family, args.setting)
  out = args.out or os.path.join("experiments/results", os.path.basename(setting_dir))
  base_lr = setting_lr(setting_arg)
  lrs = [float(x) for x in args.lrs.split(",") if x] or [base_lr]
  budgets = [int(x) for x in args.steps.split(",") if x] or [0]
  default_steps = int(
    setting_value(setting_arg, "num_train") // setting_value(setting_arg, "batch_size", 512)
  )
  variants = []  # (runs directory, get_config arguments without lr, lr, label)
  for steps in budgets:
    base_arg = ",".join(kv for kv in setting_arg.split(",") if not kv.startswith("lr="))
    runs_dir = setting_dir
    if steps:  # num_train = steps x batch (one epoch of fresh examples)
      batch = setting_value(setting_arg, "batch_size", 512)
      base_arg = ",".join(kv for kv in base_arg.split(",") if not kv.startswith("num_train="))
      base_arg += f",num_train={steps * int(batch)}"
      runs_dir = f"{setting_dir}_steps{steps}"
    for lr in lrs:
      label = ", ".join(
        ([f"lr {lr:g}"] if len(lrs) > 1 else [])
        + ([f"{steps or default_steps}-step budget"] if len(budgets) > 1 or steps else [])
      )
      lr_dir = runs_dir if lr == base_lr else f"{runs_dir}_lr{lr:g}"
      variants.append((lr_dir, base_arg, lr, label))
  results = []
  for name in filter(None, (args.rows or ",".join(rows)).split(",")):
    if name not in rows:
      raise SystemExit(f"unknown row {name!r} of family {args.family!r}; known: {list(rows)}")
    heads_dir, config_arg, sets = rows[name]
    for L, P in cells:
      best = None
      for lr_dir, base_arg, lr, label in variants:
        run_args = types.SimpleNamespace(
          runs_dir=f"{lr_dir}/{heads_dir}",
          config_arg=f"{base_arg},{config_arg},lr={lr:g}",
          sets=",".join(filter(None, [base_sets, sets])),
          rerun=False,
        )
        workdir = os.path.join(run_args.runs_dir, mqar_sweep.run_name(name, L, P, args.d_model))
        if args.only_finished and mqar_sweep.finished_summary(workdir) is None:
          print(f"[skip] {name} (L={L}, P={P}, {label or 'default'}): no finished run in {workdir}")
          continue
        (row,) = mqar_sweep.collect([name], [(L, P)], [args.d_model], run_args)
        row["lr"] = lr
        row["mechanism"] = f"{name} ({heads_dir}" + (f"; {label})" if label else ")")
        if best is None or row["accuracy"] > best["accuracy"]:
          best = row
      if best is not None:
        results.append(best)
  if not results:
    raise SystemExit("no finished runs to tabulate")
  # The table file names the setting and the command that rebuilds it (--only_finished).
  argv = sys.argv[1:] if argv is None else list(argv)
  command = shlex.join(["python", "experiments/mqar_heads.py", *argv])
  if "--only_finished" not in argv:
    command += " --only_finished"
  header = (
    f"# MQAR, {args.family} family, {args.setting} setting\n\n"
    f"d_model = {args.d_model}; each row's best (budget, rate) variant, with its steps to "
    f"0.99 (early stop) or to the end of its budget; runs in `{setting_dir}*/`. Table:\n\n"
    f"    {command}\n\n"
  )
  table = mqar_sweep.write_table(results, out, header)
  plot_bars(results, out)
  print("\n" + table)


if __name__ == "__main__":
  main()
