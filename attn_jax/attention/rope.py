"""Rotary position embedding (RoPE) as pure JAX functions, and softmax attention with it.

Paper: "RoFormer: Enhanced Transformer with Rotary Position Embedding" (Su et al., 2021).

Dimension key: B batch, T query length, S key/value length, N query heads, K kv heads,
H q/k head dim, Hv value head dim, r the rotary dims (the first r of H), R = r / 2 pairs.

Equations. With frequencies ``θ_j = base^(−2j/r)`` for ``j = 0 .. R−1``, a vector ``x`` at
integer position ``m`` has each of its R pairs ``(x_a, x_b)`` rotated by angle ``m·θ_j``::

    [y_a]   [cos mθ_j  −sin mθ_j] [x_a]
    [y_b] = [sin mθ_j   cos mθ_j] [x_b]

and its last ``H − r`` dims passed through (partial rotary). Writing ``R_m`` for the block
rotation, ``⟨R_m q, R_n k⟩ = qᵀ R_mᵀ R_n k = qᵀ R_{n−m} k``: the logit of a query at m and a
key at n depends on the positions only through ``m − n``. In complex form, with
``q̃_j = q_a + i·q_b``: ``⟨R_m q, R_n k⟩ = Re Σ_j q̃_j · conj(k̃_j) · e^{i(m−n)θ_j}``.

Pair layouts (``layout=``):
  * ``"half"``: pair j is ``(j, j + R)`` — the rotary dims split in halves (GPT-NeoX, LLaMA).
  * ``"interleaved"``: pair j is ``(2j, 2j + 1)`` — adjacent dims (RoFormer, GPT-J).
  Both compute the same logits up to a fixed permutation of the head dim.

Angles are computed in float32 (float64 for float64 inputs); the result is cast back to the
input dtype. Positions are explicit integers, so prefill, chunked prefill and decoding see
the same rotations. ``rope_attention`` rotates q and k, then calls
``api.dot_product_attention``; by default queries sit bottom-right aligned like every mask of
the library (kv position j, query position ``S − T + i``), so decoding the last query
against a cache equals the last row of the full computation.

The public functions validate by hand (a ``ValueError`` naming the argument, what it got
and what it needs) and are left to that check (``typing.no_type_check``), as the attention
front door is, so a runtime type checker does not pre-empt the message; the rotation core
they call is shape-checked under jaxtyping.
"""

import math
import typing

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from attn_jax.attention import _checks
from attn_jax.attention import api as api_lib

LAYOUTS = ("half", "interleaved")
DEFAULT_BASE = 10000.0


# ---------------------------------------------------------------------------------------
# Validation (ValueError: the argument, what it got, what it needs).
# ---------------------------------------------------------------------------------------


def _check_layout(layout) -> bool:
  """Returns True for the interleaved layout."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
  return layout == "interleaved"


def _check_base(base) -> float:
  if isinstance(base, bool) or not isinstance(base, (int, float, np.integer, np.floating)):
    raise ValueError(f"base must be a Python float > 0; got {type(base).__name__}")
  if not (math.isfinite(base) and base > 0):
    raise ValueError(f"base must be finite and > 0; got {base}")
  return float(base)


def _check_rotary_dim(rotary_dim, head_dim: int | None) -> int:
  """Resolves ``rotary_dim`` (None means all of ``head_dim``) and checks it."""
  if rotary_dim is None:
    if head_dim is None:
      raise ValueError("rotary_dim must be an even int >= 0; got None")
    rotary_dim = head_dim
  if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, (int, np.integer)):
    raise ValueError(f"rotary_dim must be an int or None; got {type(rotary_dim).__name__}")
  rotary_dim = int(rotary_dim)
  if rotary_dim < 0:
    raise ValueError(f"rotary_dim must be >= 0; got {rotary_dim}")
  if rotary_dim % 2:
    raise ValueError(f"rotary_dim must be even (dims are rotated in pairs); got {rotary_dim}")
  if head_dim is not None and rotary_dim > head_dim:
    raise ValueError(f"rotary_dim must be <= the head dim H={head_dim}; got {rotary_dim}")
  return rotary_dim


def _check_positions(positions, name: str, length_name: str, B: int, L: int):
  """Positions ``[B, L]`` or ``[L]`` of an integer dtype, returned as ``[B, L]``."""
  if not hasattr(positions, "shape") or not hasattr(positions, "dtype"):
    positions = np.asarray(positions)
  if not jnp.issubdtype(positions.dtype, jnp.integer):
    raise ValueError(f"{name} must have an integer dtype; got {positions.dtype}")
  if tuple(positions.shape) not in ((B, L), (L,)):
    raise ValueError(
      f"{name} must have shape [B, {length_name}] = ({B}, {L}) or [{length_name}] = "
      f"({L},); got shape {tuple(positions.shape)}"
    )
  return jnp.broadcast_to(jnp.asarray(positions), (B, L))


def _check_x(x) -> None:
  _checks._check_array("x", x, 4, "[B, T, N, H]")


# ---------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------


def rope_frequencies(
  rotary_dim: int, base: float = DEFAULT_BASE, *, dtype=jnp.float32
) -> Float[Array, " R"]:
  """The rotation frequencies ``θ_j = base^(−2j/rotary_dim)``, ``j = 0 .. rotary_dim/2 − 1``.

  Args:
    rotary_dim: the number of rotated dims r, even and >= 0.
    base: the base of the geometric frequency progression, > 0.
    dtype: dtype of the result (computed in float64, then cast).

  Returns:
    ``[rotary_dim // 2]`` frequencies, 1 first, decreasing geometrically.
  """
  rotary_dim = _check_rotary_dim(rotary_dim, None)
  base = _check_base(base)
  j = np.arange(rotary_dim // 2, dtype=np.float64)
  return jnp.asarray(base ** (-2.0 * j / max(rotary_dim, 1)), dtype)


@typing.no_type_check
def apply_rope(
  x: Float[Array, "B T N H"],
  positions: Int[Array, "B T"] | Int[Array, " T"],
  *,
  base: float = DEFAULT_BASE,
  rotary_dim: int | None = None,
  layout: str = "half",
) -> Float[Array, "B T N H"]:
  """Rotates the first ``rotary_dim`` dims of ``x`` in pairs by angles ``positions·θ_j``.

  Args:
    x: queries or keys ``[B, T, N, H]`` (for keys read T as S and N as K).
    positions: integer positions ``[B, T]``, or ``[T]`` shared by the batch.
    base: frequency base of ``θ_j = base^(−2j/rotary_dim)``.
    rotary_dim: the number of leading head dims rotated, even, ``0 <= rotary_dim <= H``;
      None rotates all H. 0 returns ``x`` unchanged.
    layout: ``"half"`` pairs dims ``(j, j + r/2)``; ``"interleaved"`` pairs ``(2j, 2j + 1)``.

  Returns:
    The rotated array, same shape and dtype as ``x``.
  """
  _check_x(x)
  B, T, _, H = x.shape
  interleaved = _check_layout(layout)
  rotary_dim = _check_rotary_dim(rotary_dim, H)
  base = _check_base(base)
  pos_BT = _check_positions(positions, "positions", "T", B, T)
  if rotary_dim == 0:
    return x
  inv_freq_R = rope_frequencies(rotary_dim, base, dtype=_checks.compute_dtype(x.dtype))
  return _rotate(x, pos_BT, inv_freq_R, interleaved)


@typing.no_type_check
def rope_attention(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K Hv"],
  *,
  q_positions: Int[Array, "B T"] | Int[Array, " T"] | None = None,
  kv_positions: Int[Array, "B S"] | Int[Array, " S"] | None = None,
  base: float = DEFAULT_BASE,
  rotary_dim: int | None = None,
  layout: str = "half",
  mask=None,
  bias=None,
  scale: float | None = None,
  softcap: float | None = None,
  sinks: Float[Array, " N"] | None = None,
  implementation: str | None = None,
  return_lse: bool = False,
  block_q: int | None = None,
  block_kv: int | None = None,
):
  """Softmax attention with rotary position embedding on q and k.

  Rotates q at ``q_positions`` and k at ``kv_positions`` (``apply_rope``), then calls
  ``api.dot_product_attention`` with every other argument; v is not rotated.

  Args:
    q, k, v: ``[B, T, N, H]``, ``[B, S, K, H]``, ``[B, S, K, Hv]``.
    q_positions: integer positions of the queries, ``[B, T]`` or ``[T]``; default
      ``S − T + arange(T)`` (bottom-right aligned, as the masks align queries).
    kv_positions: integer positions of the keys, ``[B, S]`` or ``[S]``; default
      ``arange(S)``.
    base, rotary_dim, layout: as in ``apply_rope`` (rotary_dim <= H).
    mask, bias, scale, softcap, sinks, implementation, return_lse, block_q, block_kv: as in
      ``api.dot_product_attention``. The mask (and a ScoreBias) still sees bottom-right
      aligned indices, independent of the positions passed here.

  Returns:
    ``[B, T, N, Hv]`` in q's dtype, and the lse ``[B, N, T]`` when ``return_lse``.
  """
  dims = _checks.check_qkv(q, k, v)
  interleaved = _check_layout(layout)
  rotary_dim = _check_rotary_dim(rotary_dim, dims.H)
  base = _check_base(base)
  if q_positions is None:
    q_positions = jnp.arange(dims.T, dtype=jnp.int32) + (dims.S - dims.T)
  if kv_positions is None:
    kv_positions = jnp.arange(dims.S, dtype=jnp.int32)
  q_pos_BT = _check_positions(q_positions, "q_positions", "T", dims.B, dims.T)
  kv_pos_BS = _check_positions(kv_positions, "kv_positions", "S", dims.B, dims.S)
  if rotary_dim:
    inv_freq_R = rope_frequencies(rotary_dim, base, dtype=_checks.compute_dtype(q.dtype))
    q = _rotate(q, q_pos_BT, inv_freq_R, interleaved)
    k = _rotate(k, kv_pos_BS, inv_freq_R, interleaved)
  return api_lib.dot_product_attention(
    q,
    k,
    v,
    mask=mask,
    bias=bias,
    scale=scale,
    softcap=softcap,
    sinks=sinks,
    implementation=implementation,
    return_lse=return_lse,
    block_q=block_q,
    block_kv=block_kv,
  )


# ---------------------------------------------------------------------------------------
# The rotation (shape-checked under jaxtyping; inputs already validated).
# ---------------------------------------------------------------------------------------


def _rotate(
  x_BTNH: Float[Array, "B T N H"],
  pos_BT: Int[Array, "B T"],
  inv_freq_R: Float[Array, " R"],
  interleaved: bool,
) -> Float[Array, "B T N H"]:
  """Rotates pairs of the first 2R dims of x by ``pos·θ_j`` in ``inv_freq_R``'s dtype."""
  B, T, N, _ = x_BTNH.shape
  R = inv_freq_R.shape[0]
  dtype = inv_freq_R.dtype
  angle_BTR = pos_BT.astype(dtype)[..., None] * inv_freq_R
  cos_BT1R = jnp.cos(angle_BTR)[:, :, None, :]
  sin_BT1R = jnp.sin(angle_BTR)[:, :, None, :]
  rot_BTNr = x_BTNH[..., : 2 * R].astype(dtype)
  if interleaved:
    pairs_BTNR2 = rot_BTNr.reshape(B, T, N, R, 2)
    a_BTNR, b_BTNR = pairs_BTNR2[..., 0], pairs_BTNR2[..., 1]
  else:
    a_BTNR, b_BTNR = rot_BTNr[..., :R], rot_BTNr[..., R:]
  ya_BTNR = a_BTNR * cos_BT1R - b_BTNR * sin_BT1R
  yb_BTNR = b_BTNR * cos_BT1R + a_BTNR * sin_BT1R
  if interleaved:
    y_BTNr = jnp.stack([ya_BTNR, yb_BTNR], axis=-1).reshape(B, T, N, 2 * R)
  else:
    y_BTNr = jnp.concatenate([ya_BTNR, yb_BTNR], axis=-1)
  return jnp.concatenate([y_BTNr.astype(x_BTNH.dtype), x_BTNH[..., 2 * R :]], axis=-1)
