r"""Differential attention's noise cancellation made visible: attention maps of MHA vs
``diff_attn`` on a toy retrieval task (catalog ``diff_attn``; issue "score functions").

"Differential Transformer" claims that subtracting a second softmax map cancels the
attention a standard head spends on irrelevant context. This script trains two small
decoders that differ only in the attention kind of every layer (``mha`` vs ``diff_attn``, same
widths) on multi-query associative recall with random distractor tokens (keys can reappear
as filler), then reads the last layer's maps at the query positions:

* the map of one test example, query rows against all keys, for the head of each model that
  puts the most weight on the queried pair (``A`` for MHA, ``A_1 − λ A_2`` for diff_attn;
  the latter may be negative, so it is drawn with a diverging scale);
* over the test set, per query row: the share of the row's absolute attention mass on the
  queried pair's positions {2j, 2j + 1, 2j + 2} (``signal``: the key, its value, and the
  next position, where a previous-token head of the first layer copies the value — which of
  these a trained model reads depends on the circuit it found), the rest (``noise``), and
  the share of |A| on the row's 3 largest entries (``top-3 share``, a circuit-free
  concentration measure); best head and mean over heads.

Model: ``attn_jax.models.decoder_lm.DecoderLM``, 2 layers, d_model 64, 2 heads, learned
positions, no MLP; AdamW, cross-entropy on the query positions only, fresh examples every
step; training stops at ``--target_acc`` on a held-out batch or after ``--max_steps``.

  .venv/bin/python experiments/diff_attention_maps.py
  .venv/bin/python experiments/diff_attention_maps.py --max_steps=200 --out=/tmp/maps  # quick

Writes ``experiments/results/diff_attention_maps.{png,json,md}``.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from attn_jax.data import mqar
from attn_jax.models import decoder_lm

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("mha", "diff_attn")


def make_source(args, split):
  return mqar.MQARSource(
    num_examples=10**8 if split == "train" else args.num_test,
    seq_len=args.seq_len,
    num_pairs=args.num_pairs,
    vocab_size=args.vocab_size,
    seed=args.seed,
    split=split,
    random_non_queries=True,
  )


def build(kind, args):
  return decoder_lm.DecoderLM(
    vocab_size=args.vocab_size,
    d_model=args.d_model,
    num_layers=2,
    num_heads=args.num_heads,
    attention=kind,
    mlp="none",
    positions="learned",
    max_len=args.seq_len,
    rngs=nnx.Rngs(args.seed),
  )


def loss_and_acc(model, inputs, targets):
  logits = model(inputs)
  scored = targets >= 0
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(targets, 0))
  loss = jnp.sum(jnp.where(scored, ce, 0.0)) / jnp.sum(scored)
  acc = jnp.sum(jnp.where(scored, logits.argmax(-1) == targets, False)) / jnp.sum(scored)
  return loss, acc


def train(kind, args):
  model = build(kind, args)
  opt = nnx.Optimizer(model, optax.adamw(args.lr, weight_decay=0.1), wrt=nnx.Param)
  train_src, test_src = make_source(args, "train"), make_source(args, "test")

  @nnx.jit
  def step(model, opt, inputs, targets):
    (loss, acc), grads = nnx.value_and_grad(loss_and_acc, has_aux=True)(model, inputs, targets)
    opt.update(model, grads)
    return loss, acc

  evaluate = nnx.jit(loss_and_acc)
  test = test_src.generate(np.arange(args.num_test))
  t0, acc = time.time(), 0.0
  for i in range(args.max_steps):
    batch = train_src.generate(np.arange(i * args.batch, (i + 1) * args.batch))
    step(model, opt, jnp.asarray(batch["inputs"]), jnp.asarray(batch["targets"]))
    if (i + 1) % args.eval_every == 0 or i + 1 == args.max_steps:
      _, acc = evaluate(model, jnp.asarray(test["inputs"]), jnp.asarray(test["targets"]))
      acc = float(acc)
      print(
        f"  [{kind}] step {i + 1}: test accuracy {acc:.4f} ({time.time() - t0:.0f} s)", flush=True
      )
      if acc >= args.target_acc:
        break
  return model, {"steps": i + 1, "test_accuracy": acc, "train_time_s": time.time() - t0}


def last_layer_maps(model, inputs):
  """``[B, N, T, T]`` maps of the last layer (``A`` or ``A_1 − λ A_2``), via capture."""
  _, inter = nnx.capture(model, nnx.Intermediate)(inputs, capture=True)
  probs = [leaf for path, leaf in _leaves(inter) if "probs" in path]
  return np.asarray(probs[-1], np.float64)


def _leaves(tree):
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(jax.tree_util.keystr(p), leaf) for p, leaf in flat]


def pair_positions(inputs, targets, num_pairs):
  """For every scored position (b, t): the context positions of the queried key and value."""
  b, t = np.nonzero(targets >= 0)
  keys = inputs[:, 0 : 2 * num_pairs : 2]
  j = np.argmax(keys[b] == inputs[b, t][:, None], axis=1)
  return b, t, 2 * j, 2 * j + 1


def signal_shares(maps, inputs, targets, num_pairs):
  """``([N], [N])``: mean over query rows of |A| on the queried pair's positions
  {2j, 2j + 1, 2j + 2} / |A| of the row, and of the row's top-3 |A| share."""
  b, t, kpos, vpos = pair_positions(inputs, targets, num_pairs)
  rows = np.abs(maps[b, :, t, :])  # [R, N, S]
  total = np.maximum(rows.sum(-1), 1e-30)
  r = np.arange(len(b))
  nxt = np.minimum(vpos + 1, rows.shape[-1] - 1)
  sig = rows[r, :, kpos] + rows[r, :, vpos] + rows[r, :, nxt]
  top3 = -np.sort(-rows, axis=-1)[..., :3].sum(-1)
  return (sig / total).mean(0), (top3 / total).mean(0)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seq_len", type=int, default=64)
  p.add_argument("--num_pairs", type=int, default=8)
  p.add_argument("--vocab_size", type=int, default=256)
  p.add_argument("--d_model", type=int, default=64)
  p.add_argument("--num_heads", type=int, default=2)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--max_steps", type=int, default=4000)
  p.add_argument("--eval_every", type=int, default=100)
  p.add_argument("--target_acc", type=float, default=0.99)
  p.add_argument("--num_test", type=int, default=256)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=str(RESULTS / "diff_attention_maps"))
  args = p.parse_args(argv)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  test = make_source(args, "test").generate(np.arange(args.num_test))
  results, maps = {}, {}
  for kind in KINDS:
    model, info = train(kind, args)
    m = last_layer_maps(model, jnp.asarray(test["inputs"]))
    shares, top3 = signal_shares(m, test["inputs"], test["targets"], args.num_pairs)
    best = int(np.argmax(shares))
    info.update(
      signal_share_best_head=float(shares[best]),
      signal_share_mean_over_heads=float(shares.mean()),
      noise_share_best_head=float(1 - shares[best]),
      top3_share_best_head=float(top3[best]),
      best_head=best,
      negative_mass_share=float(np.abs(np.minimum(m, 0)).sum() / np.abs(m).sum()),
    )
    results[kind], maps[kind] = info, m[:, best]
    print(f"{kind}: " + ", ".join(f"{k} {v:.4g}" for k, v in info.items()), flush=True)
  command = "python experiments/diff_attention_maps.py " + " ".join(
    sys.argv[1:] if argv is None else argv
  )
  settings = {k: v for k, v in vars(args).items() if k != "out"}
  out.with_suffix(".json").write_text(
    json.dumps({"settings": settings, "command": command, "results": results}, indent=1)
  )
  lines = [
    "# Differential vs standard attention maps on toy retrieval (last layer, query rows)\n",
    f"MQAR L={args.seq_len}, {args.num_pairs} pairs, vocab {args.vocab_size}, random "
    f"distractor tokens; 2 layers, d_model {args.d_model}, {args.num_heads} heads, no MLP. "
    "Signal share: |attention| on the queried pair's positions {2j, 2j+1, 2j+2} / "
    f"|attention| of the row (mean over {args.num_test} test examples' query rows); top-3 "
    "share: |attention| on the row's 3 largest entries / |attention| of the row.\n",
    f"Command: `{command}`\n",
    "| model | steps | test accuracy | signal share (best head) | noise share (best head) "
    "| top-3 share (best head) | signal share (mean over heads) | negative mass share |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for kind, r in results.items():
    lines.append(
      f"| {kind} | {r['steps']} | {r['test_accuracy']:.4f} | {r['signal_share_best_head']:.3f} "
      f"| {r['noise_share_best_head']:.3f} | {r['top3_share_best_head']:.3f} "
      f"| {r['signal_share_mean_over_heads']:.3f} "
      f"| {r['negative_mass_share']:.3f} |"
    )
  out.with_suffix(".md").write_text("\n".join(lines) + "\n")
  plot(maps, results, test, args, out.with_suffix(".png"))
  print("\n".join(lines))


def plot(maps, results, test, args, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  b = 0
  rows = np.nonzero(test["targets"][b] >= 0)[0]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4), gridspec_kw={"width_ratios": [4, 4, 2]})
  for ax, kind in zip(axes[:2], KINDS, strict=True):
    a = maps[kind][b][rows]
    lim = np.abs(a).max()
    im = ax.imshow(a, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    _, _, kpos, vpos = pair_positions(
      test["inputs"][b : b + 1], test["targets"][b : b + 1], args.num_pairs
    )
    ax.scatter(vpos, np.arange(len(rows)), marker="x", color="k", s=12, label="queried value")
    ax.scatter(kpos, np.arange(len(rows)), marker="+", color="k", s=16, label="queried key")
    ax.scatter(vpos + 1, np.arange(len(rows)), marker="|", color="k", s=16, label="next position")
    label = "A" if kind == "mha" else "A1 - lambda A2"
    ax.set_title(f"{kind} (head {results[kind]['best_head']}): {label}")
    ax.set_xlabel("key position")
    ax.set_ylabel("query row (query-key positions)")
    fig.colorbar(im, ax=ax)
  axes[0].legend(loc="lower right", fontsize=7)
  shares = [results[k]["signal_share_best_head"] for k in KINDS]
  axes[2].bar(KINDS, shares, color=["tab:gray", "tab:blue"])
  axes[2].set_ylim(0, 1)
  axes[2].set_title("share of |A| on positions 2j..2j+2")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main()
