"""Fusion bottleneck tokens (catalog family (a), ``mbt_bottleneck``) as a pure JAX layer.

"Attention Bottlenecks for Multimodal Fusion".

Dimension key: B batch, T length, D model dim, N query heads, K kv heads, H head dim, Hv
value head dim, M modalities, F fusion tokens, L = M·F + (T − F) the fused call's length.

The sequence holds F fusion tokens followed by the tokens of each modality:
``x = [z (F) ; x_1 (T_1) ; ... ; x_M (T_M)]``. Every modality m has its own projections
``W_q^(m), W_k^(m), W_v^(m), W_o^(m)`` (leading axis M of each parameter). In a fusion layer
(``fuse=True``, layers at or above the fusion layer L_f of the paper) modality m attends over
``[z ; x_m]``; it writes its own tokens' update and its own update of the fusion tokens, and
the fusion tokens' updates are averaged over the modalities::

    [z'_m ; y_m] = Attn_m([z ; x_m]),    y = [mean_m z'_m ; y_1 ; ... ; y_M]

Below the fusion layer (``fuse=False``) every modality attends only to itself and the fusion
tokens only to themselves, so no information crosses modalities. Above it, information
crosses only through the F fusion tokens: within one fusion layer ``y_a`` does not depend on
``x_b`` at all; across two it depends on it only through ``z``.

Fast path: all modalities in one flash call. Each modality's projections of ``[z ; x_m]``
are laid side by side (length L: every modality has its own copy of the fusion tokens, with
its own projections) and a ``GroupMask`` over 2M groups (each modality's fusion copy and its
tokens) keeps the M attentions apart: block-diagonal over ``[z ; x_m]`` when fusing,
diagonal over the 2M groups when not. The blocked paths skip the empty tiles, so the call
costs what the M separate attentions cost. ``implementation="reference"`` runs the M
attentions (or 2M, unfused) as separate materialised calls: an independent computation.

The modality lengths are static (``modality_lengths``, default: the T − F non-fusion tokens
split into M near-equal parts, the first ones longer). Non-causal only (an encoder-fusion
scheme); packing masks and RoPE are refused.
"""

import typing

import jax.numpy as jnp
from jaxtyping import Array, Float

from attn_jax.attention import api as api_lib
from attn_jax.attention import heads as heads_lib
from attn_jax.attention import masks as masks_lib
from attn_jax.attention import registry

PAPER = "Attention Bottlenecks for Multimodal Fusion"
_NAMES = ("w_q", "w_k", "w_v", "w_o")


def layout(T: int, num_fusion: int, num_modalities: int, modality_lengths=None):
  """``(F, lengths)`` of a length-T sequence: F fusion tokens, then one length per modality
  (validated; default near-equal parts of T − F)."""
  F = heads_lib._int("num_fusion", num_fusion, 1)
  M = heads_lib._int("num_modalities", num_modalities, 1)
  if modality_lengths is None:
    rest = T - F
    if rest < M:
      raise ValueError(
        f"a length-{T} sequence with {F} fusion tokens leaves {rest} tokens for {M} modalities"
      )
    lengths = tuple(rest // M + (1 if m < rest % M else 0) for m in range(M))
  else:
    lengths = tuple(int(n) for n in modality_lengths)
    if len(lengths) != M or min(lengths) < 1 or F + sum(lengths) != T:
      raise ValueError(
        f"modality_lengths must give {M} positive lengths summing to T - num_fusion = "
        f"{T} - {F} = {T - F}; got {tuple(modality_lengths)}"
      )
  return F, lengths


def _check_params(params):
  if not isinstance(params, dict) or set(params) != set(_NAMES):
    got = sorted(params) if isinstance(params, dict) else type(params).__name__
    raise ValueError(f"mbt_bottleneck params must hold {sorted(_NAMES)}; got {got}")
  shapes = {k: jnp.shape(params[k]) for k in _NAMES}
  M = shapes["w_q"][0] if len(shapes["w_q"]) == 4 else None
  if M is None or any(len(s) != 4 or s[0] != M for s in shapes.values()):
    raise ValueError(f"every mbt_bottleneck parameter needs a leading modality axis; got {shapes}")
  dims = heads_lib.static_dims({k: params[k][0] for k in _NAMES}, "gqa")
  return M, dims


def _project(params, m, tokens_BLD):
  dtype = tokens_BLD.dtype
  q = jnp.einsum("BLD,DNH->BLNH", tokens_BLD, params["w_q"][m].astype(dtype))
  k = jnp.einsum("BLD,DKH->BLKH", tokens_BLD, params["w_k"][m].astype(dtype))
  v = jnp.einsum("BLD,DKV->BLKV", tokens_BLD, params["w_v"][m].astype(dtype))
  return q, k, v


def _out(params, m, o_BLNV):
  return jnp.einsum("BLNV,NVD->BLD", o_BLNV, params["w_o"][m].astype(o_BLNV.dtype))


@typing.no_type_check
def mbt_bottleneck(
  params,
  x_BTD: Float[Array, "B T D"],
  *,
  context_BSD=None,
  causal: bool = False,
  implementation: str | None = None,
  mask=None,
  positions_BT=None,
  rope=None,
  num_fusion: int = 4,
  modality_lengths=None,
  fuse: bool = True,
) -> Float[Array, "B T D"]:
  """One attention layer of a fusion-bottleneck encoder (Attention Bottlenecks for
  Multimodal Fusion).

  Args:
    params: ``w_q [M, D, N, H]``, ``w_k [M, D, K, H]``, ``w_v [M, D, K, Hv]``,
      ``w_o [M, N, Hv, D]`` (one set of projections per modality).
    x_BTD: ``[fusion tokens ; modality 1 ; ... ; modality M]`` along T.
    causal: must be False. context_BSD, mask, rope: must be None (refused).
    positions_BT: accepted and unused (the layer carries no position).
    num_fusion: F, the number of fusion tokens at the front of x.
    modality_lengths: the M modality lengths (default: near-equal parts of T − F).
    fuse: True at and above the fusion layer (modalities meet through the fusion tokens),
      False below it (every modality and the fusion tokens attend only to themselves).
  """
  del positions_BT
  M, dims = _check_params(params)
  heads_lib._check_tokens("x_BTD", x_BTD, dims.D, "[B, T, D]")
  if causal:
    raise ValueError("mbt_bottleneck is an encoder-fusion layer: causal must be False")
  for name, value in (("context_BSD", context_BSD), ("mask", mask), ("rope", rope)):
    if value is not None:
      raise ValueError(f"mbt_bottleneck takes no {name} (the modality layout is its mask)")
  if not isinstance(fuse, bool):
    raise ValueError(f"fuse must be a bool; got {fuse!r}")
  B, T, _ = x_BTD.shape
  F, lengths = layout(T, num_fusion, M, modality_lengths)
  z_BFD = x_BTD[:, :F]
  starts = [F + sum(lengths[:m]) for m in range(M)]
  xs = [x_BTD[:, s : s + n] for s, n in zip(starts, lengths, strict=True)]
  if implementation == "reference":
    z_out, ys = _separate_calls(params, z_BFD, xs, fuse)
  else:
    z_out, ys = _one_call(params, z_BFD, xs, fuse, implementation)
  return jnp.concatenate([z_out] + ys, axis=1)


def _separate_calls(params, z_BFD, xs, fuse):
  """The oracle: each modality's attention on its own, materialised."""
  z_outs, ys = [], []
  F = z_BFD.shape[1]
  for m, x_m in enumerate(xs):
    parts = [jnp.concatenate([z_BFD, x_m], axis=1)] if fuse else [z_BFD, x_m]
    outs = []
    for part in parts:
      q, k, v = _project(params, m, part)
      o = api_lib.dot_product_attention(q, k, v, implementation="reference")
      outs.append(_out(params, m, o))
    out = jnp.concatenate(outs, axis=1)
    z_outs.append(out[:, :F])
    ys.append(out[:, F:])
  return sum(z_outs) / len(z_outs), ys


def _one_call(params, z_BFD, xs, fuse, implementation):
  B, F, _ = z_BFD.shape
  M = len(xs)
  qs, ks, vs, groups = [], [], [], []
  for m, x_m in enumerate(xs):
    q, k, v = _project(params, m, jnp.concatenate([z_BFD, x_m], axis=1))
    qs.append(q)
    ks.append(k)
    vs.append(v)
    groups += [2 * m] * F + [2 * m + 1] * x_m.shape[1]
  q, k, v = (jnp.concatenate(a, axis=1) for a in (qs, ks, vs))
  table = jnp.eye(2 * M, dtype=bool)
  if fuse:
    pair = jnp.arange(2 * M) // 2
    table = pair[:, None] == pair[None, :]
  group_ids = jnp.broadcast_to(jnp.asarray(groups, jnp.int32), (B, len(groups)))
  mask = masks_lib.GroupMask(group_ids, table=table)
  o = api_lib.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
  z_outs, ys, start = [], [], 0
  for m, x_m in enumerate(xs):
    n = F + x_m.shape[1]
    out = _out(params, m, o[:, start : start + n])
    z_outs.append(out[:, :F])
    ys.append(out[:, F:])
    start += n
  return sum(z_outs) / M, ys


def param_specs(
  *,
  d_model: int,
  num_heads: int,
  num_kv_heads: int | None = None,
  head_dim: int | None = None,
  v_head_dim: int | None = None,
  num_modalities: int = 2,
) -> dict:
  """``{name: (shape, init, logical_axes)}``: the GQA projections (K default N) with a
  leading axis of ``num_modalities``."""
  M = heads_lib._int("num_modalities", num_modalities, 1)
  specs = heads_lib.param_specs(
    "head_dims",
    d_model=d_model,
    num_heads=num_heads,
    num_kv_heads=num_kv_heads,
    head_dim=head_dim,
    v_head_dim=v_head_dim,
  )
  # The initialisers draw i.i.d. entries with the per-modality fan-in: any leading axis works.
  return {name: ((M, *shape), init, (None, *axes)) for name, (shape, init, axes) in specs.items()}


init_mbt_bottleneck = heads_lib.make_init(
  "mbt_bottleneck",
  ("v_head_dim", "num_modalities", "num_fusion", "modality_lengths", "fuse"),
  param_specs,
  ("num_fusion", "modality_lengths", "fuse"),
)


registry.register(
  registry.Mechanism(
    id="mbt_bottleneck",
    family="a",
    paper=PAPER,
    entry_point="attn_jax.attention.bottleneck:mbt_bottleneck",
    implementations=registry.KERNEL_IMPLEMENTATIONS,
    patterns=frozenset({registry.SELF}),
    decode=False,
    tier=2,
    check="With L_f above the top layer, the model equals independent per-modality encoders. "
    "The gradient of modality A's output with respect to modality B's input vanishes except "
    "through the fusion tokens.",
    build=registry.build_nothing,
    module="attn_jax.nn.bottleneck:MBTAttention",
    interface="layer",
    init="attn_jax.attention.bottleneck:init_mbt_bottleneck",
  )
)
