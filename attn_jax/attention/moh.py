"""Mixture-of-head attention (catalog family (d), ``moh``) as a pure JAX function.

"MoH: Multi-Head Attention as Mixture-of-Head Attention".

Dimension key: B batch, T query length, S key/value length, D model dim, N heads
(= Ns shared + Nr routed), K kv heads, H head dim, Hv value head dim, k routed heads kept.

Heads are Ns shared heads, always on, and Nr routed heads of which each token keeps its
top-k. With the per-token gate scores

    r = softmax(x_t W_r) ∈ R^Nr,  h = softmax(x_t W_s) ∈ R^Ns,  [α1, α2] = softmax(x_t W_h)
    g_t,i = α1 h_i                     for shared head i
    g_t,j = α2 r_j · 1[j ∈ topk(r)]    for routed head j

the output is ``y_t = Σ_n g_t,n o_t,n W_O,n`` with o the per-head softmax attention (the
projections of ``attn_jax.attention.heads``). Our reading where the accounts differ: the
routed scores are not renormalised over the kept heads, and the stage weights are not
scaled by 2. The load-balance loss over routed heads is ``Nr Σ_j f_j P_j`` with f_j the
fraction of (token, kept-slot) pairs routed to head j and P_j its mean router probability
(1 for a uniform router; its coefficient is the trainer's ``aux_loss_weight``, ≈ 0.01).

What is and is not saved: the attention of all N heads is one ``dot_product_attention`` call
(every implementation, flash kernels included) and the gates multiply its output, so the
attention FLOPs are those of MHA on every backend; only heads whose gates are 0 contribute
nothing. Skipping (query block, head) tiles whose gates are all 0 needs a per-tile
predicate inside the kernel, which the flash kernels do not take yet: not built.
"""

import typing

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from attn_jax.attention import heads as heads_lib
from attn_jax.attention import registry

PAPER = "MoH: Multi-Head Attention as Mixture-of-Head Attention"
_BASE = ("w_q", "w_k", "w_v", "w_o")
_GATES = ("w_shared", "w_routed", "w_stage")


class MoHDims(typing.NamedTuple):
  D: int
  N: int
  K: int
  Ns: int
  Nr: int


def moh_dims(params) -> MoHDims:
  """The sizes of ``params``, every array checked against them."""
  if not isinstance(params, dict) or set(params) != set(_BASE + _GATES):
    got = sorted(params) if isinstance(params, dict) else type(params)
    raise ValueError(f"moh params must hold {sorted(_BASE + _GATES)}; got {got}")
  dims = heads_lib.static_dims({k: params[k] for k in _BASE}, "gqa")
  ws, wr, wh = (tuple(np.shape(params[k])) for k in _GATES)
  if len(ws) != 2 or len(wr) != 2 or ws[0] != dims.D or wr[0] != dims.D:
    raise ValueError(
      f"params['w_shared'], ['w_routed'] must be [D={dims.D}, heads]; got {ws}, {wr}"
    )
  if ws[1] + wr[1] != dims.N or ws[1] < 1 or wr[1] < 1:
    raise ValueError(
      f"shared ({ws[1]}) and routed ({wr[1]}) heads must be >= 1 each and sum to N={dims.N}"
    )
  if wh != (dims.D, 2):
    raise ValueError(f"params['w_stage'] must have shape {(dims.D, 2)}; got {wh}")
  return MoHDims(dims.D, dims.N, dims.Kk, ws[1], wr[1])


def _top_k(dims: MoHDims, moh_top_k) -> int:
  k = heads_lib._opt("moh_top_k", moh_top_k, max(1, dims.Nr // 2))
  if k > dims.Nr:
    raise ValueError(f"moh_top_k must be <= the routed heads Nr={dims.Nr}; got {k}")
  return k


def moh_gates(
  params, x_BTD: Float[Array, "B T D"], *, moh_top_k: int | None = None
) -> tuple[Float[Array, "B T N"], Float[Array, ""]]:
  """Per-token head gates ``g [B, T, N]`` (shared heads first) and the load-balance loss."""
  dims = moh_dims(params)
  k = _top_k(dims, moh_top_k)
  dtype = jnp.promote_types(x_BTD.dtype, jnp.float32)
  x = x_BTD.astype(dtype)
  shared_BTS = jax.nn.softmax(x @ params["w_shared"].astype(dtype), -1)
  routed_BTR = jax.nn.softmax(x @ params["w_routed"].astype(dtype), -1)
  stage_BT2 = jax.nn.softmax(x @ params["w_stage"].astype(dtype), -1)
  _, idx_BTk = jax.lax.top_k(routed_BTR, k)
  keep_BTR = jnp.sum(jax.nn.one_hot(idx_BTk, dims.Nr, dtype=dtype), axis=-2)
  gates = jnp.concatenate(
    [stage_BT2[..., :1] * shared_BTS, stage_BT2[..., 1:] * routed_BTR * keep_BTR], axis=-1
  )
  frac_R = keep_BTR.reshape(-1, dims.Nr).mean(0) / k
  prob_R = routed_BTR.reshape(-1, dims.Nr).mean(0)
  return gates, dims.Nr * jnp.sum(frac_R * prob_R)


@typing.no_type_check
def moh_from_gates(
  params,
  x_BTD: Float[Array, "B T D"],
  gates_BTN: Float[Array, "B T N"],
  *,
  context_BSD: Float[Array, "B S D"] | None = None,
  causal: bool,
  implementation: str | None = None,
  mask=None,
  positions_BT: Int[Array, "B T"] | None = None,
  rope=None,
) -> Float[Array, "B T D"]:
  """``y_t = Σ_n g_t,n o_t,n W_O,n`` for given gates (all ones: the MHA/GQA of the
  projections)."""
  dims = moh_dims(params)
  base = {k: params[k] for k in _BASE}
  call = heads_lib._check_call(dims.D, x_BTD, context_BSD, causal, mask, positions_BT, rope)
  B, T, _ = x_BTD.shape
  if tuple(np.shape(gates_BTN)) != (B, T, dims.N):
    raise ValueError(f"gates_BTN must have shape {(B, T, dims.N)}; got {np.shape(gates_BTN)}")
  return heads_lib.gated_heads(base, x_BTD, gates_BTN, call, implementation)


@typing.no_type_check
def moh(
  params,
  x_BTD: Float[Array, "B T D"],
  *,
  context_BSD: Float[Array, "B S D"] | None = None,
  causal: bool,
  implementation: str | None = None,
  mask=None,
  positions_BT: Int[Array, "B T"] | None = None,
  rope=None,
  return_aux: bool = False,
  moh_top_k: int | None = None,
):
  """Mixture-of-head attention (MoH: Multi-Head Attention as Mixture-of-Head Attention).

  See the module docstring for the gates. ``return_aux`` adds ``{"load_balance": scalar,
  "gates": [B, T, N]}``.

  Args:
    params: ``init_moh`` pytree (``w_q``, ``w_k``, ``w_v``, ``w_o`` as in
      ``attn_jax.attention.heads``; ``w_shared [D, Ns]``, ``w_routed [D, Nr]``,
      ``w_stage [D, 2]``).
    x_BTD, context_BSD, causal, implementation, mask, positions_BT, rope: as every layer
      function (``attn_jax.attention.heads``).
    moh_top_k: routed heads kept per token (default -1/None: Nr // 2).
  """
  gates, balance = moh_gates(params, x_BTD, moh_top_k=moh_top_k)
  y = moh_from_gates(
    params,
    x_BTD,
    gates,
    context_BSD=context_BSD,
    causal=causal,
    implementation=implementation,
    mask=mask,
    positions_BT=positions_BT,
    rope=rope,
  )
  return heads_lib._finish(y, {"load_balance": balance, "gates": gates}, return_aux)


def param_specs(
  *,
  d_model: int,
  num_heads: int,
  num_kv_heads: int | None = None,
  head_dim: int | None = None,
  v_head_dim: int | None = None,
  moh_shared_heads: int | None = None,
) -> dict:
  """``{name: (shape, init, logical_axes)}``: the GQA projections (K default N) and the
  three gate projections (Ns default max(1, N // 4); gate weights start at 0, i.e. uniform
  scores)."""
  N = heads_lib._int("num_heads", num_heads, 2)
  Ns = heads_lib._opt("moh_shared_heads", moh_shared_heads, max(1, N // 4))
  if Ns >= N:
    raise ValueError(f"moh_shared_heads must leave >= 1 routed head of N={N}; got {Ns}")
  specs = heads_lib.param_specs(
    "head_dims",
    d_model=d_model,
    num_heads=N,
    num_kv_heads=num_kv_heads,
    head_dim=head_dim,
    v_head_dim=v_head_dim,
  )
  D = specs["w_q"][0][0]
  small = heads_lib._normal_init(D**-0.5)
  specs["w_shared"] = ((D, Ns), small, ("embed", None))
  specs["w_routed"] = ((D, N - Ns), small, ("embed", None))
  specs["w_stage"] = ((D, 2), small, ("embed", None))
  return specs


init_moh = heads_lib.make_init(
  "moh", ("v_head_dim", "moh_shared_heads", "moh_top_k"), param_specs, ("moh_top_k",)
)


registry.register(
  registry.Mechanism(
    id="moh",
    family="d",
    paper=PAPER,
    entry_point="attn_jax.attention.moh:moh",
    implementations=registry.KERNEL_IMPLEMENTATIONS,
    patterns=registry.ALL_PATTERNS,
    decode=False,
    tier=1,
    check="Gates forced to 1 equal MHA. A head whose gates are zero for a whole query block "
    "contributes nothing (its values can change without changing the output). (Tile skipping "
    "inside the kernels not built: every head is computed.)",
    build=registry.build_nothing,
    module="attn_jax.nn.moh:MoHAttention",
    interface="layer",
    init="attn_jax.attention.moh:init_moh",
  )
)
