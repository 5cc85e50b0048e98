r"""MQAR recall against recurrent-state size (catalog ``recall_state``, reduced to one cell).

Reads MQAR runs made by ``experiments/mqar_sweep.py`` (its ``.json`` outputs and each run's
``config.json``), computes each model's decoding state in bytes and tabulates test accuracy
against it, next to the published trend of "Simple linear attention language models balance
the recall-throughput tradeoff" (read off its figure, as the catalog gives it: sliding window
0.07 … 1.00 as the state doubles from 2^14.9 to 2^22 bytes; Based 0.54 at 2^14.5 rising to
≈ 0.99 at 2^19.2; full attention 1.00).

State bytes (float32, summed over layers; the cell's length L bounds the KV cache):
  * softmax attention: keys + values, 2·L·K·H·4 per layer; sliding window w: 2·min(w, L)·K·H·4;
  * linear kinds: N·H'·Hv'·4 per layer, H' the feature dimension (Based: 1 + f + f² for f
    projected features), Hv' = Hv + 1 with the z normaliser (linear_attn, based); delta
    rules, GLA, HGRN-2 and Lightning: N·H·Hv·4;
  * short convolutions (option ``short_conv`` = W of the linear kinds): the last W − 1
    q/k/v projections, (W − 1)·(N·H + K·H + K·Hv)·4 per layer;
  * hybrids: the sum over their layers.

Accuracy is each run's final test accuracy, with its step budget alongside (runs trained
under different caps or schedules do not compare exactly); ``--at_step`` reads the last
evaluation at or before a step instead.

The reduction, stated: one cell ((64, 4), d_model 64, 2 layers, 1 head, learned positions,
no MLP) instead of the paper's training mixture and seven test cells, and CPU-sized step
budgets. Linear kinds run with and without ``short_conv`` (the paper's Based has short
convolutions; here they sit inside each linear layer rather than as separate layers).

  # train (see mqar_sweep.py and experiments/results/mqar_linear_conv.md), then:
  .venv/bin/python experiments/recall_state.py \
      --inputs=experiments/results/mqar_linear_conv.json --cell=64x16 --d_model=16,32,64

Writes ``experiments/results/recall_state.{json,md,png}``.
"""

import argparse
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
RESULTS = os.path.join(ROOT, "experiments", "results")

# The published figure, as the catalog reads it: (log2 bytes, accuracy).
PUBLISHED = {
  "sliding window (paper)": [
    (14.9 + i * (22 - 14.9) / 7, a)
    for i, a in enumerate((0.07, 0.14, 0.31, 0.51, 0.65, 0.80, 0.94, 1.00))
  ],
  "Based (paper, endpoints)": [(14.5, 0.54), (19.2, 0.99)],
}
NORMALISED = ("linear_attn", "based")


def qk_width(kind: str, opts: dict, H: int) -> int:
  """Width of the q/k projections (Based projects to ``based_dim`` features)."""
  return int(opts.get("based_dim", 16)) if kind == "based" else H


def layer_state_bytes(kind: str, model: dict, seq_len: int) -> int:
  from attn_jax.attention import registry

  opts = model.get("attention_options") or {}
  N, K = model["num_heads"], model["num_kv_heads"]
  H = model.get("head_dim") or model["d_model"] // N
  Hv = H
  family = registry.get(kind).family
  if family == "g" and kind not in ("flowformer", "agent_attn", "aaren"):
    Hk = H
    if kind == "based":
      f = int(opts.get("based_dim", 16))
      Hk = 1 + f + f * f
    conv = int(opts.get("short_conv", 0))
    conv_bytes = 4 * max(conv - 1, 0) * ((N + K) * qk_width(kind, opts, H) + K * Hv)
    return 4 * N * Hk * (Hv + (kind in NORMALISED)) + conv_bytes
  if kind == "sliding_window":
    return 2 * 4 * min(int(opts.get("window", seq_len)), seq_len) * K * H
  return 2 * 4 * seq_len * K * H


def run_model_config(row: dict) -> dict:
  """The run's model config: its ``config.json`` when the run directory is here, else the
  MQAR config rebuilt from the row (mechanism, options, cell, width)."""
  path = os.path.join(ROOT, row["workdir"], "config.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)["model"]
  sys.path.insert(0, ROOT)
  import mqar_sweep  # experiments/ is on sys.path

  from configs import mqar

  name, options = mqar_sweep.parse_mechanism(row["mechanism"])
  arg = f"attn={name},seq_len={row['seq_len']},num_pairs={row['num_pairs']}"
  model = mqar.get_config(arg + f",d_model={row['d_model']}").model.to_dict()
  model["attention_options"] = {**model["attention_options"], **options}
  return model


def state_bytes(row: dict) -> tuple[int, list[str]]:
  from attn_jax.nn import transformer

  model = run_model_config(row)
  kinds = transformer.layer_kinds(
    model["attention"], model["num_layers"], model.get("attention_options")
  )
  total = sum(layer_state_bytes(k, model, row["seq_len"]) for k in kinds)
  return total, kinds


def lr_of(row: dict):
  """The run's learning rate: the row's ``lr``, else its ``config.json`` (None when neither
  is here)."""
  if row.get("lr") is not None:
    return row["lr"]
  path = os.path.join(ROOT, row["workdir"], "config.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)["optim"]["lr"]


def accuracy_at(row: dict, step: int):
  points = [(s, a) for s, a in row.get("curve", []) if s <= step]
  return (points[-1][1], points[-1][0]) if points else (None, None)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--inputs", required=True, help="comma-separated mqar_sweep .json files")
  p.add_argument("--cell", default="64x4")
  p.add_argument("--d_model", default="64", help="one width or several: 16,32,64")
  p.add_argument("--at_step", type=int, default=None, help="default: the final evaluation")
  p.add_argument("--out", default=os.path.join(RESULTS, "recall_state"))
  args = p.parse_args(argv)
  L, _, P = args.cell.partition("x")
  widths = [int(d) for d in str(args.d_model).split(",")]
  rows = []
  for path in args.inputs.split(","):
    with open(path) as f:
      for r in json.load(f):
        if (r["seq_len"], r["num_pairs"]) != (int(L), int(P)) or r["d_model"] not in widths:
          continue
        nbytes, kinds = state_bytes(r)
        acc, step = accuracy_at(r, args.at_step) if args.at_step else (r["accuracy"], r["steps"])
        rows.append(
          {
            "mechanism": r["mechanism"],
            "d_model": r["d_model"],
            "lr": lr_of(r),
            "layers": kinds,
            "state_bytes": nbytes,
            "log2_bytes": math.log2(nbytes),
            "accuracy": acc,
            "at_step": step,
            "final_accuracy": r["accuracy"],
            "final_step": r["steps"],
            "source": os.path.relpath(path, ROOT),
          }
        )
  rows.sort(key=lambda r: r["state_bytes"])
  command = "python experiments/recall_state.py " + " ".join(sys.argv[1:] if argv is None else argv)
  with open(args.out + ".json", "w") as f:
    json.dump({"command": command, "rows": rows, "published": PUBLISHED}, f, indent=1)
  lines = [
    "# MQAR recall vs decoding-state size (recall_state, one cell)\n",
    f"Cell (L, P) = ({L}, {P}), d_model {args.d_model}, 2 layers, 1 head; accuracy on the "
    "test examples at "
    + (f"the last evaluation at or before step {args.at_step}" if args.at_step else "the end")
    + " of each run (final accuracy and step alongside). State: float32 bytes summed over "
    "layers.\n",
    f"Command: `{command}`\n",
    "| mechanism | d_model | lr | layers | state bytes | log2 | accuracy | at step "
    "| final (step) |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    acc = "—" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
    lines.append(
      f"| {r['mechanism']} | {r['d_model']} | {r['lr']} | {'+'.join(r['layers'])} | "
      f"{r['state_bytes']:,} | "
      f"{r['log2_bytes']:.1f} | {acc} | {r['at_step']} | {r['final_accuracy']:.3f} "
      f"({r['final_step']}) |"
    )
  lines += [
    "",
    "Published (figure, as the catalog reads it; larger models and the full training "
    "mixture): sliding window 0.07, 0.14, 0.31, 0.51, 0.65, 0.80, 0.94, 1.00 from 2^14.9 to "
    "2^22 bytes; Based 0.54 at 2^14.5 to ≈ 0.99 at 2^19.2; attention 1.00.",
  ]
  with open(args.out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  plot(rows, args.out + ".png", args.at_step)
  print("\n".join(lines))
  return rows


def plot(rows, path, at_step):
  """Accuracy against log2 state bytes: one line per mechanism across widths (several
  d_model) or one labelled point each (a single width); the published curves dashed."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7.5, 4.8))
  for name, pts in PUBLISHED.items():
    ax.plot(*zip(*pts, strict=True), ls="--", marker=".", color="0.6", label=name)
  rows = [r for r in rows if r["accuracy"] is not None]
  several = len({r["d_model"] for r in rows}) > 1
  groups = {}
  lrs = {r["lr"] for r in rows}
  for r in rows:
    label = r["mechanism"].replace("short_conv=4", "conv").replace("based_dim=", "f")
    if len(lrs) > 1 and r["lr"] is not None:
      label += f" lr {r['lr']:g}"
    groups.setdefault(label, []).append(r)
  colors, markers = plt.get_cmap("tab20").colors, "osD^v<>ph*"
  for i, (label, rs) in enumerate(groups.items()):
    rs.sort(key=lambda r: r["state_bytes"])
    xs, ys = [r["log2_bytes"] for r in rs], [r["accuracy"] for r in rs]
    if several:
      style = {"color": colors[i % 20], "marker": markers[i % len(markers)]}
      ax.plot(xs, ys, ms=4, label=label, **style)
      for r in rs:
        ax.annotate(f"d{r['d_model']}", (r["log2_bytes"], r["accuracy"]), fontsize=6)
    else:
      ax.scatter(xs, ys, zorder=3)
      ax.annotate(label, (xs[0], ys[0]), fontsize=7)
  ax.set_xlabel("decoding state, log2 bytes")
  ax.set_ylabel("MQAR accuracy" + (f" (step {at_step})" if at_step else ""))
  ax.set_ylim(0, 1.05)
  ax.legend(fontsize=6, loc="lower right", ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main()
