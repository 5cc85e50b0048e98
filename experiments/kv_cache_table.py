"""KV-cache bytes per token for each head structure of catalog family (b), at a 1B-class shape.

Shape: d_model 2048, 16 query heads, head dim 128, 24 layers, bfloat16 cache (2 bytes). Every
row is read off the parameter shapes the library's own init makes (``jax.eval_shape``, so
nothing is allocated): the cached numbers per token are the key and value projection widths
(``w_k``: Kk·H, ``w_v``: Kv·Hv), MHE's single shared head (H + Hv, its RoPE-free folded form),
and MLA's latent plus rotary key (``w_dkv``: d_c, ``w_kr``: d_R).

  .venv/bin/python experiments/kv_cache_table.py

Writes experiments/results/kv_cache.md (and prints it).
"""

import importlib.util
from pathlib import Path

import jax

from attn_jax.attention import heads

D, N, H, LAYERS, BYTES = 2048, 16, 128, 24, 2
CONTEXT = 4096

# (row label, registry id, init kwargs beyond d_model / num_heads / head_dim)
ROWS = [
  ("MHA (head_dims, K = N)", "head_dims", dict(num_kv_heads=N)),
  ("GQA, K = 8", "gqa", dict(num_kv_heads=8)),
  ("GQA, K = 4", "gqa", dict(num_kv_heads=4)),
  ("KDGQA, K = 4", "kdgqa", dict(num_kv_heads=4)),
  ("MQA", "mqa", {}),
  ("head_dims, H = 64, Hv = 128", "head_dims", dict(num_kv_heads=N, head_dim=64, v_head_dim=128)),
  ("MHE (one shared head, no RoPE)", "mhe", {}),
  ("DHA, 4 key / 8 value heads", "dha", dict(num_kv_heads=4, dha_value_heads=8)),
  (
    "Sigma DiffQKV, 2 key heads of 64 / 8 value heads",
    "sigma_diffqkv",
    dict(num_kv_heads=8, sigma_key_heads=2, sigma_key_head_dim=64),
  ),
]


def cached_per_token(kind: str, shapes: dict) -> int:
  """Numbers cached per token per layer, from the parameter shapes."""
  if kind in ("mla", "mla_absorbed"):
    return shapes["w_dkv"].shape[1] + (shapes["w_kr"].shape[1] if "w_kr" in shapes else 0)
  if kind == "mhe":
    return shapes["w_k"].shape[1] + shapes["w_v"].shape[1]
  _, Kk, Hk = shapes["w_k"].shape
  _, Kv, Hv = shapes["w_v"].shape
  return Kk * Hk + Kv * Hv


def table() -> str:
  rows = list(ROWS)
  init_fns = {kind: getattr(heads, f"init_{kind}") for _, kind, _ in rows}
  if importlib.util.find_spec("attn_jax.attention.mla") is not None:
    from attn_jax.attention import mla

    rows.append(("MLA (d_c = 512, d_R = 64)", "mla", {}))
    init_fns["mla"] = mla.init_mla
  base = None
  lines = [
    f"KV cache per token, d_model {D}, {N} heads, head dim {H}, {LAYERS} layers, bf16.",
    "",
    "| head structure | id | numbers / token / layer | bytes / token / layer | "
    f"bytes / token ({LAYERS} layers) | MiB per {CONTEXT}-token sequence | vs MHA |",
    "|---|---|---:|---:|---:|---:|---:|",
  ]
  for label, kind, kwargs in rows:
    kwargs = {"head_dim": H, **kwargs}
    shapes = jax.eval_shape(
      lambda kind=kind, kwargs=kwargs: init_fns[kind](
        jax.random.key(0), d_model=D, num_heads=N, **kwargs
      )
    )
    numbers = cached_per_token(kind, shapes)
    base = base or numbers
    per_layer = numbers * BYTES
    lines.append(
      f"| {label} | `{kind}` | {numbers} | {per_layer} | {per_layer * LAYERS} | "
      f"{per_layer * LAYERS * CONTEXT / 2**20:.1f} | {numbers / base:.3f} |"
    )
  lines += [
    "",
    "Notes: KDGQA is bidirectional (an encoder mechanism; its row is the K-head cache an "
    "encoder would keep). MHE's row is its RoPE-free form, where every head reads one shared "
    "key/value head; with RoPE the layer materialises N heads. Sigma's augmented queries do "
    "not touch the cache.",
  ]
  return "\n".join(lines) + "\n"


def main():
  text = table()
  out = Path(__file__).parent / "results" / "kv_cache.md"
  out.write_text(text)
  print(text)


if __name__ == "__main__":
  main()
