r"""Algorithmic tasks, standard vs positional attention (catalog ``positional_tasks``).

"Positional Attention: Expressivity and Learnability of Algorithmic Computation": a model
whose attention weights come from positions only (``positional_attn``) extrapolates to value
ranges far outside training, where standard attention (weights from the values) does not.

Set-up, as the catalog describes it: n = 8 reals per sample plus one zero scratch position.
Training draws a sub-range ``[lo, hi]`` inside ``[-2, 2]`` per sample and ``x_i ~ U(lo, hi)``;
out-of-distribution tests draw the sub-range inside ``[-c, c]`` (c = 4, 6, 10, 20), rejecting
sub-ranges that lie entirely inside ``[-2, 2]``. Targets per position i < n: cumulative sum,
cumulative min, running median, running maximum-subarray sum (of ``x[:i+1]``) and the sorted
sequence. Model: ``Linear(1 -> 64)``, then log2(n) + 1 = 4 layers of
``h <- MLP(concat[h, Attn(h)])`` (no residual, no norm; the MLP is ``Dense(128 -> 64)``, ReLU,
``Dense(64 -> 64)``), then ``Linear(64 -> 1)``; 2 heads, non-causal. The standard model takes
its queries and keys from ``concat[h, onehot(position)]``; the positional model from the
one-hot positions only, through ``attn_jax.attention.positional.positional_attn``. Both take
values from ``h``. Adam 5e-4, batch 1000 from a fixed set of 30k training samples, MSE loss.
The number of steps (the paper's is not restated in the catalog) is ``--steps``.

  .venv/bin/python experiments/positional_tasks.py                       # every task, both models
  .venv/bin/python experiments/positional_tasks.py --tasks=sum,min --steps=500 --seeds=1

Writes ``experiments/results/positional_tasks.{json,md}`` (MSE per task, model and range).
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

from attn_jax.attention import dot_product_attention
from attn_jax.attention import positional as positional_lib

N_VALUES, D, HEADS = 8, 64, 2
L = N_VALUES + 1  # the scratch position
LAYERS = int(np.log2(N_VALUES)) + 1
TRAIN_HALF_WIDTH = 2.0
OOD_HALF_WIDTHS = (4.0, 6.0, 10.0, 20.0)
RESULTS = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------ the tasks


def _running_median(x):
  return np.stack([np.median(x[:, : i + 1], axis=1) for i in range(x.shape[1])], axis=1)


def _running_max_subarray(x):
  best_end, best = x[:, 0], x[:, 0]
  out = [best]
  for i in range(1, x.shape[1]):
    best_end = np.maximum(x[:, i], best_end + x[:, i])
    best = np.maximum(best, best_end)
    out.append(best)
  return np.stack(out, axis=1)


TASKS = {
  "sum": lambda x: np.cumsum(x, axis=1),
  "min": lambda x: np.minimum.accumulate(x, axis=1),
  "median": _running_median,
  "max_subarray": _running_max_subarray,
  "sort": lambda x: np.sort(x, axis=1),
}


def sample_ranges(rng, num: int, half_width: float, reject_inside: float | None = None):
  """``num`` sub-ranges ``lo <= hi`` uniform inside ``[-half_width, half_width]``; with
  ``reject_inside`` = r, redraws those lying entirely inside ``[-r, r]``."""
  lo, hi = np.empty(num), np.empty(num)
  todo = np.arange(num)
  while todo.size:
    a, b = rng.uniform(-half_width, half_width, size=(2, todo.size))
    lo[todo], hi[todo] = np.minimum(a, b), np.maximum(a, b)
    if reject_inside is None:
      break
    inside = (lo[todo] >= -reject_inside) & (hi[todo] <= reject_inside)
    todo = todo[inside]
  return lo, hi


def make_split(rng, task: str, num: int, half_width: float, ood: bool):
  """``(x [num, L, 1], y [num, N_VALUES])``: values, a zero scratch position, targets."""
  lo, hi = sample_ranges(rng, num, half_width, TRAIN_HALF_WIDTH if ood else None)
  x = rng.uniform(lo[:, None], hi[:, None], size=(num, N_VALUES))
  y = TASKS[task](x)
  x = np.concatenate([x, np.zeros((num, 1))], axis=1)[..., None]
  return x.astype(np.float32), y.astype(np.float32)


# ------------------------------------------------------------------------------ the models


def _dense(key, fan_in, fan_out):
  return {
    "w": jax.random.normal(key, (fan_in, fan_out)) / np.sqrt(fan_in),
    "b": jnp.zeros((fan_out,)),
  }


def _apply_dense(p, x):
  return x @ p["w"] + p["b"]


def init_model(key, kind: str):
  keys = iter(jax.random.split(key, 4 * LAYERS + 2))
  layers = []
  for _ in range(LAYERS):
    if kind == "positional":
      attn = positional_lib.init_positional_attn(
        next(keys), d_model=D, num_heads=HEADS, positional_dim=L
      )
    else:
      kq, kk, kv, ko = jax.random.split(next(keys), 4)
      H = D // HEADS
      attn = {
        "w_q": jax.random.normal(kq, (D + L, HEADS, H)) / np.sqrt(D + L),
        "w_k": jax.random.normal(kk, (D + L, HEADS, H)) / np.sqrt(D + L),
        "w_v": jax.random.normal(kv, (D, HEADS, H)) / np.sqrt(D),
        "w_o": jax.random.normal(ko, (HEADS, H, D)) / np.sqrt(D),
      }
    layers.append(
      {"attn": attn, "mlp1": _dense(next(keys), 2 * D, D), "mlp2": _dense(next(keys), D, D)}
    )
  return {"embed": _dense(next(keys), 1, D), "layers": layers, "out": _dense(next(keys), D, 1)}


def _standard_attention(p, h_BLD, implementation):
  B = h_BLD.shape[0]
  onehot = jnp.broadcast_to(jnp.eye(L, dtype=h_BLD.dtype), (B, L, L))
  qk_in = jnp.concatenate([h_BLD, onehot], axis=-1)
  q = jnp.einsum("BLE,ENH->BLNH", qk_in, p["w_q"])
  k = jnp.einsum("BLE,ENH->BLNH", qk_in, p["w_k"])
  v = jnp.einsum("BLD,DNH->BLNH", h_BLD, p["w_v"])
  o = dot_product_attention(q, k, v, implementation=implementation)
  return jnp.einsum("BLNH,NHD->BLD", o, p["w_o"])


def apply_model(params, x_BL1, kind: str, implementation: str | None = None):
  h = _apply_dense(params["embed"], x_BL1)
  for layer in params["layers"]:
    if kind == "positional":
      a = positional_lib.positional_attn(
        layer["attn"], h, causal=False, implementation=implementation
      )
    else:
      a = _standard_attention(layer["attn"], h, implementation)
    m = jax.nn.relu(_apply_dense(layer["mlp1"], jnp.concatenate([h, a], axis=-1)))
    h = _apply_dense(layer["mlp2"], m)
  return _apply_dense(params["out"], h)[:, :N_VALUES, 0]


def mse(params, x, y, kind, implementation=None):
  return jnp.mean((apply_model(params, x, kind, implementation) - y) ** 2)


# ------------------------------------------------------------------------------ training


def train_and_test(
  task: str,
  kind: str,
  seed: int,
  steps: int,
  num_train: int,
  batch: int,
  num_test: int,
  lr: float,
  log_every: int,
):
  rng = np.random.default_rng(seed)
  x_train, y_train = make_split(rng, task, num_train, TRAIN_HALF_WIDTH, ood=False)
  tests = {"in-dist [-2,2]": make_split(rng, task, num_test, TRAIN_HALF_WIDTH, ood=False)}
  for c in OOD_HALF_WIDTHS:
    tests[f"ood [-{c:g},{c:g}]"] = make_split(rng, task, num_test, c, ood=True)
  params = init_model(jax.random.key(seed), kind)
  opt = optax.adam(lr)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(mse)(params, x, y, kind)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  evaluate = jax.jit(lambda p, x, y: mse(p, x, y, kind))
  order = rng.permutation(num_train)
  start, t0 = 0, time.time()
  for i in range(steps):
    if start + batch > num_train:
      order, start = rng.permutation(num_train), 0
    idx = order[start : start + batch]
    start += batch
    params, opt_state, loss = step(params, opt_state, x_train[idx], y_train[idx])
    if log_every and (i + 1) % log_every == 0:
      print(
        f"  [{task}/{kind}/seed {seed}] step {i + 1}/{steps}: train MSE {float(loss):.4g} "
        f"({time.time() - t0:.0f} s)",
        flush=True,
      )
  if not np.isfinite(float(loss)):
    raise FloatingPointError(f"{task}/{kind}: training diverged (loss {float(loss)})")
  return {name: float(evaluate(params, x, y)) for name, (x, y) in tests.items()}


def write_table(rows, ranges, out: Path):
  lines = [
    "| task | model | " + " | ".join(ranges) + " |",
    "|---|---|" + "---|" * len(ranges),
  ]
  for r in rows:
    cells = [f"{np.median(r['mse'][name]):.3g}" for name in ranges]
    lines.append(f"| {r['task']} | {r['model']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {list(TASKS)}")
  p.add_argument("--models", default="standard,positional")
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--seeds", type=int, default=1)
  p.add_argument("--num_train", type=int, default=30_000)
  p.add_argument("--batch", type=int, default=1000)
  p.add_argument("--num_test", type=int, default=2000)
  p.add_argument("--lr", type=float, default=5e-4)
  p.add_argument("--log_every", type=int, default=250)
  p.add_argument("--out", default=str(RESULTS / "positional_tasks"))
  args = p.parse_args(argv)
  tasks = [t for t in args.tasks.split(",") if t]
  models = [m for m in args.models.split(",") if m]
  for t in tasks:
    if t not in TASKS:
      raise SystemExit(f"unknown task {t!r}; known: {list(TASKS)}")
  for m in models:
    if m not in ("standard", "positional"):
      raise SystemExit(f"unknown model {m!r}; known: ['standard', 'positional']")
  if args.batch > args.num_train:
    raise SystemExit(f"--batch={args.batch} is larger than --num_train={args.num_train}")
  rows = []
  for task in tasks:
    for model in models:
      per_seed = [
        train_and_test(
          task,
          model,
          seed,
          args.steps,
          args.num_train,
          args.batch,
          args.num_test,
          args.lr,
          args.log_every,
        )
        for seed in range(args.seeds)
      ]
      mse_by_range = {name: [s[name] for s in per_seed] for name in per_seed[0]}
      rows.append({"task": task, "model": model, "mse": mse_by_range})
      print(
        f"{task:>13} {model:>10}: "
        + ", ".join(f"{name} {np.median(v):.3g}" for name, v in mse_by_range.items()),
        flush=True,
      )
  ranges = list(rows[0]["mse"])
  table = write_table(rows, ranges, Path(args.out))
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  meta = {k: v for k, v in vars(args).items() if k != "out"}
  meta["command"] = "python experiments/positional_tasks.py " + " ".join(
    sys.argv[1:] if argv is None else argv
  )
  out.with_suffix(".json").write_text(json.dumps({"settings": meta, "rows": rows}, indent=1))
  header = (
    "# Algorithmic tasks: standard vs positional attention (test MSE, median over seeds)\n\n"
    f"n = {N_VALUES}, {LAYERS} layers, {HEADS} heads, d = {D}, {args.steps} steps of Adam "
    f"{args.lr:g}, batch {args.batch} from {args.num_train} training samples, {args.seeds} "
    f"seed(s), {args.num_test} test samples per range.\n\nCommand: `{meta['command']}`\n\n"
  )
  out.with_suffix(".md").write_text(header + table + "\n")
  print("\n" + table)
  return rows


if __name__ == "__main__":
  main()
