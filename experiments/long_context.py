"""Long-context check: causal attention forward + backward at T = 131,072 on this CPU.

Runs the blocked ``xla`` path once (B=1, N=8, H=64, float32) under ``jax.value_and_grad``,
records compile time, wall time and peak resident memory, and checks a few output rows and
the gradient of a few key rows against the float64 oracle computed on just what those rows
see. Writes ``experiments/results/long_context.json``.

  python experiments/long_context.py                 # T = 131072 (about 15-25 min, 2 cores)
  python experiments/long_context.py --seq-len 16384 # a quicker look
"""

import argparse
import json
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from attn_jax.attention import CausalMask, attention_reference, dot_product_attention

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq-len", type=int, default=131072)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--out", default=os.path.join(RESULTS, "long_context.json"))
  args = parser.parse_args()
  T, N, H = args.seq_len, args.heads, args.head_dim
  kq, kk, kv, kc = jax.random.split(jax.random.key(0), 4)
  q_BTNH = jax.random.normal(kq, (1, T, N, H), jnp.float32)
  k_BTNH = jax.random.normal(kk, (1, T, N, H), jnp.float32)
  v_BTNH = jax.random.normal(kv, (1, T, N, H), jnp.float32)
  cot_BTNH = jax.random.normal(kc, (1, T, N, H), jnp.float32)

  def loss(q, k, v):
    out = dot_product_attention(q, k, v, mask=CausalMask(), implementation="xla")
    return jnp.vdot(out, cot_BTNH), out

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  print(f"T={T}: compiling ...", flush=True)
  t0 = time.perf_counter()
  compiled = step.lower(q_BTNH, k_BTNH, v_BTNH).compile()
  compile_s = time.perf_counter() - t0
  print(f"compiled in {compile_s:.1f}s; running forward + backward ...", flush=True)
  t0 = time.perf_counter()
  (_, out_BTNH), (dq, dk, dv) = jax.block_until_ready(compiled(q_BTNH, k_BTNH, v_BTNH))
  wall_s = time.perf_counter() - t0
  peak = peak_rss_mib()
  print(f"forward + backward: {wall_s:.1f}s, peak RSS {peak:.0f} MiB", flush=True)

  # Oracle on the rows: output row i depends only on q_i and keys/values 0..i.
  f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
  errors = {}
  for i in sorted({0, 1, T // 3, T - 1}):
    ref = attention_reference(
      jnp.asarray(f64(q_BTNH[:, i : i + 1])),
      jnp.asarray(f64(k_BTNH[:, : i + 1])),
      jnp.asarray(f64(v_BTNH[:, : i + 1])),
      mask=CausalMask(),
    )
    errors[f"out_row_{i}"] = float(np.abs(f64(out_BTNH[:, i]) - f64(ref[:, 0])).max())
  # dv of the last key: only the last query sees it, with weight p_{T-1, T-1}.
  _, probs = attention_reference(
    jnp.asarray(f64(q_BTNH[:, -1:])),
    jnp.asarray(f64(k_BTNH)),
    jnp.asarray(f64(v_BTNH)),
    mask=CausalMask(),
    return_probs=True,
  )
  dv_last = f64(probs[0, :, 0, -1])[:, None] * f64(cot_BTNH[0, -1])
  errors["dv_last_row"] = float(np.abs(f64(dv[0, -1]) - dv_last).max())
  finite = all(bool(jnp.all(jnp.isfinite(g))) for g in (out_BTNH, dq, dk, dv))
  print("max abs errors vs float64 oracle:", errors, "all finite:", finite, flush=True)

  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  record = {
    "B": 1,
    "T": T,
    "N": N,
    "H": H,
    "dtype": "float32",
    "mask": "causal",
    "implementation": "xla",
    "compile_s": compile_s,
    "fwd_bwd_s": wall_s,
    "peak_rss_mib": peak,
    "errors_vs_oracle": errors,
    "all_finite": finite,
    "jax": jax.__version__,
    "cores": os.cpu_count(),
    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
