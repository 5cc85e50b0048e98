"""In-context linear regression with 1, 2 and 4 heads (BENCHMARKS.md §2).

"In-Context Linear Regression Demystified: Training Dynamics and Mechanistic Interpretability
of Multi-Head Softmax Attention": with one layer of softmax attention, one head plateaus near
MSE 0.35-0.43 while two or more heads reach 0.20-0.27 (noise floor 0.1, ridge about 0.115).
This script trains that model for each (mechanism, heads) pair and tabulates the test MSE.

Set-up (as the benchmark describes it): d = 5, L = 40 context pairs ``z_i = [x_i; y_i]`` plus a
query ``[x_q; 0]``; one attention layer, H heads, full-width (d + 1) projections per head, no
bias, no positions; the query attends to the context only (not to itself); a linear readout of
the query row to a scalar. Adam, lr 1e-3, batch 256, fresh problems every step (generated in
JAX from the same distribution as ``attn_jax.data.LinearRegressionSource``); the test set is
``LinearRegressionSource(split="test")`` with the ridge (Bayes-optimal) baseline on it.

Mechanisms: ``mha`` (this script's own per-head projections around
``dot_product_attention``) and any layer-interface registry id (``talking_heads``, ``moh``,
...; parameters from ``registry.init_layer``, output projection included).

  .venv/bin/python experiments/icl_regression.py                      # mha, talking_heads, moh
  .venv/bin/python experiments/icl_regression.py --mechanisms=mha --heads=1,2 --steps=2000

Writes experiments/results/icl_regression.{json,md}.
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

from attn_jax import data
from attn_jax.attention import SegmentMask, dot_product_attention, registry

DIM, PAIRS, NOISE_VAR = 5, 40, 0.1
RESULTS = Path(__file__).resolve().parent / "results"


def sample_batch(key, batch: int):
  """Fresh regression problems ``[B, L + 1, d + 1]`` and the query labels ``[B]``."""
  kb, kx, ke = jax.random.split(key, 3)
  beta_BD = jax.random.normal(kb, (batch, DIM)) / jnp.sqrt(DIM)
  x_BLD = jax.random.normal(kx, (batch, PAIRS + 1, DIM))
  y_BL = jnp.einsum("BLD,BD->BL", x_BLD, beta_BD)
  y_BL = y_BL + jnp.sqrt(NOISE_VAR) * jax.random.normal(ke, (batch, PAIRS + 1))
  inputs = jnp.concatenate([x_BLD, y_BL[..., None]], -1).at[:, PAIRS, DIM].set(0.0)
  return inputs, y_BL[:, PAIRS]


def context_mask(batch: int):
  """Every row sees the context rows only: the query does not attend to itself."""
  q_ids = jnp.ones((batch, PAIRS + 1), jnp.int32)
  kv_ids = q_ids.at[:, PAIRS].set(2)
  return SegmentMask(q_ids, kv_ids)


def init_mha(key, heads: int):
  width = DIM + 1
  kq, kk, kv, ko = jax.random.split(key, 4)
  std = 1.0 / np.sqrt(width)
  return {
    "wq": std * jax.random.normal(kq, (width, heads, width)),
    "wk": std * jax.random.normal(kk, (width, heads, width)),
    "wv": std * jax.random.normal(kv, (width, heads, width)),
    "wo": std / np.sqrt(heads) * jax.random.normal(ko, (heads, width, width)),
  }


def mha(params, z_BTD, mask):
  q = jnp.einsum("BTD,DNH->BTNH", z_BTD, params["wq"])
  k = jnp.einsum("BTD,DNH->BTNH", z_BTD, params["wk"])
  v = jnp.einsum("BTD,DNH->BTNH", z_BTD, params["wv"])
  o = dot_product_attention(q, k, v, mask=mask, implementation="xla")
  return jnp.einsum("BTNH,NHD->BTD", o, params["wo"])


def make_model(mechanism: str, heads: int, key):
  """(params, apply(params, z, mask) -> [B, T, D]) for ``mechanism`` with ``heads`` heads."""
  k_attn, k_read = jax.random.split(key)
  if mechanism == "mha":
    attn_params, attn = init_mha(k_attn, heads), mha
  else:
    mech = registry.get(mechanism)
    if mech.interface != "layer":
      raise ValueError(f"{mechanism!r} is not a layer-interface mechanism (nor 'mha')")
    attn_params = registry.init_layer(
      mechanism, k_attn, d_model=DIM + 1, num_heads=heads, head_dim=DIM + 1
    )

    def attn(params, z_BTD, mask):
      out = registry.run_layer(mechanism, params, z_BTD, causal=False, mask=mask, key=k_attn)
      return out[0] if isinstance(out, tuple) else out

  params = {"attn": attn_params, "readout": jax.random.normal(k_read, (DIM + 1,)) * 0.1}

  def apply(params, z_BTD, mask):
    h_BTD = attn(params["attn"], z_BTD, mask)
    return h_BTD[:, PAIRS] @ params["readout"]

  return params, apply


def train(mechanism: str, heads: int, *, steps: int, batch: int, lr: float, seed: int, test):
  params, apply = make_model(mechanism, heads, jax.random.key(seed))
  tx = optax.adam(lr)
  opt_state = tx.init(params)
  mask = context_mask(batch)

  @jax.jit
  def step(params, opt_state, key):
    z, y = sample_batch(key, batch)
    loss, grads = jax.value_and_grad(lambda p: jnp.mean((apply(p, z, mask) - y) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  test_z, test_y = jnp.asarray(test["inputs"]), jnp.asarray(test["targets"])
  test_mask = context_mask(test_z.shape[0])
  evaluate = jax.jit(lambda p: jnp.mean((apply(p, test_z, test_mask) - test_y) ** 2))
  key = jax.random.key(seed + 1)
  curve, start = [], time.time()
  for i in range(1, steps + 1):
    params, opt_state, loss = step(params, opt_state, jax.random.fold_in(key, i))
    if i % max(steps // 10, 1) == 0 or i == steps:
      mse = float(evaluate(params))
      curve.append({"step": i, "train_loss": float(loss), "test_mse": mse})
      print(f"  [{mechanism} H={heads}] step {i}: train {float(loss):.4f} test {mse:.4f}")
  return {
    "mechanism": mechanism,
    "heads": heads,
    "steps": steps,
    "test_mse": curve[-1]["test_mse"],
    "best_test_mse": min(c["test_mse"] for c in curve),
    "seconds": round(time.time() - start, 1),
    "curve": curve,
  }


def markdown(rows, ridge_mse, args) -> str:
  heads = sorted({r["heads"] for r in rows})
  mechs = list(dict.fromkeys(r["mechanism"] for r in rows))
  by = {(r["mechanism"], r["heads"]): r for r in rows}
  lines = [
    "# In-context linear regression: test MSE by number of heads",
    "",
    f"d={DIM}, L={PAIRS}, noise variance {NOISE_VAR}; one attention layer, Adam lr {args.lr}, "
    f"batch {args.batch}, {args.steps} steps, fresh problems per step; test MSE on "
    f"{args.test_examples} held-out problems (ridge, Bayes-optimal: {ridge_mse:.4f}). "
    f"Command: `{' '.join(['python', 'experiments/icl_regression.py'] + (args.argv or []))}`.",
    "",
    "| mechanism | " + " | ".join(f"H={h}" for h in heads) + " |",
    "|---|" + "---|" * len(heads),
  ]
  for m in mechs:
    cells = [f"{by[(m, h)]['test_mse']:.4f}" if (m, h) in by else "—" for h in heads]
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--mechanisms", default="mha,talking_heads,moh")
  p.add_argument("--heads", default="1,2,4")
  p.add_argument("--steps", type=int, default=5000)
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--test_examples", type=int, default=2000)
  p.add_argument("--out", type=Path, default=RESULTS / "icl_regression")
  args = p.parse_args(argv)
  args.argv = list(argv if argv is not None else sys.argv[1:])
  mechanisms = [m for m in args.mechanisms.split(",") if m]
  heads = [int(h) for h in args.heads.split(",") if h]
  for m in mechanisms:
    if m != "mha":
      registry.get(m)  # unknown ids fail here, before any training
  source = data.LinearRegressionSource(
    args.test_examples, dim=DIM, num_pairs=PAIRS, noise_var=NOISE_VAR, seed=args.seed, split="test"
  )
  examples = [source[i] for i in range(len(source))]
  test = {k: np.stack([e[k] for e in examples]) for k in ("inputs", "targets")}
  ridge = data.regression.ridge_predict(test["inputs"], NOISE_VAR * DIM)
  ridge_mse = float(np.mean((ridge - test["targets"]) ** 2))
  print(f"ridge (Bayes-optimal) test MSE {ridge_mse:.4f}")
  rows = []
  for m in mechanisms:
    for h in heads:
      rows.append(
        train(m, h, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, test=test)
      )
  args.out.parent.mkdir(parents=True, exist_ok=True)
  report = {"ridge_mse": ridge_mse, "config": {k: v for k, v in vars(args).items() if k != "out"}}
  report["config"]["out"] = str(args.out)
  report["results"] = rows
  args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
  args.out.with_suffix(".md").write_text(markdown(rows, ridge_mse, args))
  print(markdown(rows, ridge_mse, args))
  return 0


if __name__ == "__main__":
  sys.exit(main())
