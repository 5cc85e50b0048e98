"""Persistent memory tokens (catalog family (h), ``persistent_mem``): "Titans: Learning to
Memorize at Test Time".

Dimension key: B batch, T query length, S key/value length, N query heads, K kv heads, H q/k
head dim, Hv value head dim, P persistent tokens, D model dim.

P learned key/value pairs that do not depend on the input, ``persistent_k [P, K, H]`` and
``persistent_v [P, K, Hv]`` (one set per kv head, shared by the batch), are prepended to the
keys and values of every sequence and are visible to every query::

    o_i = Σ_j softmax_j(s_ij) [p_v ‖ v]_j,   s_ij = scale · q_i · [p_k ‖ k]_j,
    visible(i, j) = j < P  or  mask(i, j − P)

They sit before position 0: under a causal (or sliding-window, chunked, segment) mask every
query still sees all of them, so they act as learned, input-independent "sink" entries with
their own values. ``mask`` is given on the T x S grid of the caller's keys, exactly as for
``dot_product_attention``; ``PersistentPrefixMask`` moves it behind the prefix. P = 0 is the
base attention. The tokens carry no position (RoPE, when the caller uses it, rotates q and k
before this call; the persistent keys are learned directly in the rotated space).

The layer (``persistent_mem_layer``, the NNX module ``attn_jax.nn.titans``) owns GQA
projections and the persistent tokens ``p_k [P, K, H]``, ``p_v [P, K, Hv]``.
"""

import typing

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from attn_jax.attention import _checks, registry
from attn_jax.attention import heads as heads_lib
from attn_jax.attention import masks as masks_lib
from attn_jax.attention.api import dot_product_attention

PAPER = "Titans: Learning to Memorize at Test Time"
IMPLEMENTATIONS = registry.SOFTMAX_IMPLEMENTATIONS


@jax.tree_util.register_pytree_node_class
class PersistentPrefixMask(masks_lib.Mask):
  """``base`` (a mask over the caller's S keys) behind ``num_keys`` always-visible keys:
  visible iff ``j < P`` or ``base(i, j − P)`` (with the base's own bottom-right offset).
  ``base`` None means every caller key is visible."""

  # The kernels would need the base's per-token operands re-laid for S + P keys: not built.
  KERNEL_REFUSAL: typing.ClassVar[str] = "the persistent-prefix mask is not lowered for them"

  def __init__(self, base, num_keys: int):
    if base is not None and not isinstance(base, masks_lib.Mask):
      raise ValueError(f"base must be a masks.Mask or None; got {type(base).__name__}")
    masks_lib._check_int("PersistentPrefixMask num_keys", num_keys, minimum=0)
    self.base, self.num_keys = (masks_lib.FullMask() if base is None else base), int(num_keys)

  @property
  def batched(self):
    return self.base.batched

  def _batch_size(self):
    return self.base._batch_size()

  def check_shapes(self, batch, q_len, kv_len):
    if kv_len < self.num_keys:
      raise ValueError(f"kv_len={kv_len} is shorter than the {self.num_keys} persistent keys")
    self.base.check_shapes(batch, q_len, kv_len - self.num_keys)

  def _visible(self, q_idx, kv_idx, q_offset, b):
    P = self.num_keys
    return (kv_idx < P) | self.base._visible(q_idx, kv_idx - P, q_offset - P, b)

  def _any_all(self, q_lo, q_hi, kv_lo, kv_hi, q_offset, xp):
    P = self.num_keys
    prefix_any, prefix_all = kv_lo < P, kv_hi < P  # [1, nK]
    if self.base.holds_arrays:  # array masks read per-block id ranges: stay conservative
      shape = (self._batch_size(),) if self.batched else ()
      shape += xp.broadcast_shapes(q_lo.shape, kv_lo.shape)
      return xp.ones(shape, bool), xp.broadcast_to(prefix_all, shape)
    # The base sees the caller's part of each block (blocks wholly in the prefix give
    # nonsense bounds there, masked by the prefix terms).
    any_, all_ = self.base._any_all(
      q_lo, q_hi, xp.maximum(kv_lo - P, 0), kv_hi - P, q_offset - P, xp
    )
    return prefix_any | any_, prefix_all | all_

  def tree_flatten(self):
    return (self.base,), self.num_keys

  @classmethod
  def tree_unflatten(cls, aux, children):
    obj = object.__new__(cls)
    obj.base, obj.num_keys = children[0], aux
    return obj

  def __eq__(self, other):
    return type(self) is type(other) and self.num_keys == other.num_keys and self.base == other.base

  def __hash__(self):
    return hash(("PersistentPrefixMask", self.base, self.num_keys))

  def __repr__(self):
    return f"PersistentPrefixMask({self.base!r}, num_keys={self.num_keys})"


def _check_persistent(persistent_k, persistent_v, K: int, H: int, Hv: int) -> int:
  for name, x, last in (("persistent_k", persistent_k, H), ("persistent_v", persistent_v, Hv)):
    if not hasattr(x, "shape") or not jnp.issubdtype(getattr(x, "dtype", None), jnp.floating):
      raise ValueError(f"{name} must be a float array [P, K, ·]; got {type(x).__name__}")
    if x.ndim != 3 or x.shape[1:] != (K, last):
      want = "[P, K, H]" if name == "persistent_k" else "[P, K, Hv]"
      raise ValueError(f"{name} must have shape {want} = [P, {K}, {last}]; got {x.shape}")
  if persistent_k.shape[0] != persistent_v.shape[0]:
    raise ValueError(
      f"persistent_k and persistent_v must hold the same number of tokens P; got "
      f"{persistent_k.shape[0]} and {persistent_v.shape[0]}"
    )
  return int(persistent_k.shape[0])


@typing.no_type_check
def persistent_memory_attention(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K Hv"],
  persistent_k: Float[Array, "P K H"],
  persistent_v: Float[Array, "P K Hv"],
  *,
  mask=None,
  scale: float | None = None,
  implementation: str | None = None,
):
  """Softmax attention with P persistent key/value tokens prepended (Titans: Learning to
  Memorize at Test Time); see the module docstring.

  Args:
    q, k, v: ``[B, T, N, H]``, ``[B, S, K, H]``, ``[B, S, K, Hv]``.
    persistent_k, persistent_v: ``[P, K, H]``, ``[P, K, Hv]`` (P >= 0), input-independent.
    mask: a ``masks.Mask`` over the T x S caller keys (e.g. ``CausalMask()``), or None;
      the persistent keys are visible whatever it says.
    scale: logit scale (default H^-1/2).
    implementation: "reference" or "xla" (default on every backend: the prefix mask is not
      lowered for the Pallas kernels, which raise if named).

  Returns:
    ``[B, T, N, Hv]`` in q's dtype.
  """
  dims = _checks.check_qkv(q, k, v)
  _checks.check_options(dims, mask=mask, scale=scale)
  P = _check_persistent(persistent_k, persistent_v, dims.K, dims.H, dims.Hv)
  if P == 0:
    return dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=implementation)
  B = dims.B
  pk = jnp.broadcast_to(persistent_k.astype(k.dtype)[None], (B,) + persistent_k.shape)
  pv = jnp.broadcast_to(persistent_v.astype(v.dtype)[None], (B,) + persistent_v.shape)
  k_all = jnp.concatenate([pk, k], axis=1)
  v_all = jnp.concatenate([pv, v], axis=1)
  return dot_product_attention(
    q,
    k_all,
    v_all,
    mask=PersistentPrefixMask(mask, P),
    scale=scale,
    implementation=implementation or "xla",
  )


# ---------------------------------------------------------------------------------------
# The layer (GQA projections + persistent tokens) behind the NNX module.
# ---------------------------------------------------------------------------------------

_BASE = ("w_q", "w_k", "w_v", "w_o")
_NAMES = _BASE + ("p_k", "p_v")


@typing.no_type_check
def persistent_mem_layer(
  params,
  x_BTD: Float[Array, "B T D"],
  *,
  context_BSD: Float[Array, "B S D"] | None = None,
  causal: bool,
  implementation: str | None = None,
  mask=None,
  positions_BT: Int[Array, "B T"] | None = None,
  rope=None,
):
  """GQA attention with persistent tokens: ``y = W_O · attn(q, [p_k ‖ k], [p_v ‖ v])``
  (params ``w_q, w_k, w_v, w_o, p_k [P, K, H], p_v [P, K, Hv]``). ``mask`` is ANDed with the
  causal mask over the input keys; RoPE rotates q and k only."""
  if not isinstance(params, dict) or set(params) != set(_NAMES):
    got = sorted(params) if isinstance(params, dict) else type(params)
    raise ValueError(f"persistent_mem params must hold {sorted(_NAMES)}; got {got}")
  dims = heads_lib.static_dims({n: params[n] for n in _BASE}, "gqa")
  call = heads_lib._check_call(dims.D, x_BTD, context_BSD, causal, mask, positions_BT, rope)
  q, k, v = heads_lib._static_qkv(params, x_BTD, call.src_BSD, call)
  o = persistent_memory_attention(
    q, k, v, params["p_k"], params["p_v"], mask=call.mask, implementation=implementation
  )
  return heads_lib.output_projection(params, o)


def param_specs(
  *,
  d_model: int,
  num_heads: int,
  num_kv_heads: int | None = None,
  head_dim: int | None = None,
  v_head_dim: int | None = None,
  persistent_tokens: int = 4,
) -> dict:
  """GQA projections (K default N/2) and P = ``persistent_tokens`` >= 1 key/value tokens,
  truncated N(0, 1) (keys on the scale of projected keys)."""
  P = _checks.positive_int("persistent_tokens", persistent_tokens)
  specs = heads_lib.param_specs(
    "gqa",
    d_model=d_model,
    num_heads=num_heads,
    num_kv_heads=num_kv_heads,
    head_dim=head_dim,
    v_head_dim=v_head_dim,
  )
  (_, K, H), (_, _, Hv) = specs["w_k"][0], specs["w_v"][0]
  unit = heads_lib._normal_init(1.0)
  specs["p_k"] = ((P, K, H), unit, (None, "kv_heads", None))
  specs["p_v"] = ((P, K, Hv), unit, (None, "kv_heads", None))
  return specs


init_persistent_mem = heads_lib.make_init(
  "persistent_mem", ("v_head_dim", "persistent_tokens"), param_specs
)


# ---------------------------------------------------------------------------------------
# Registry entry.
# ---------------------------------------------------------------------------------------

BUILD_TOKENS = 3


def _build(key, dims, causal):
  # Drawn from the key alone (not T or S): a decode step sees the same tokens as the full run.
  kk, kv = jax.random.split(key)
  return {
    "persistent_k": jax.random.normal(kk, (BUILD_TOKENS, dims.K, dims.H), jnp.float32),
    "persistent_v": jax.random.normal(kv, (BUILD_TOKENS, dims.K, dims.Hv), jnp.float32),
    "mask": masks_lib.CausalMask() if causal else None,
  }


registry.register(
  registry.Mechanism(
    id="persistent_mem",
    family="h",
    paper=PAPER + " (persistent memory tokens)",
    entry_point="attn_jax.attention.persistent:persistent_memory_attention",
    implementations=IMPLEMENTATIONS,
    patterns=registry.ALL_PATTERNS,
    decode=True,
    tier=2,
    check="P = 0 equals the base attention. With every other key masked, the output is the "
    "same for any input. (The P tokens sit before position 0: every query sees them under "
    "causal, window, chunked and segment masks.)",
    build=_build,
    module="attn_jax.nn.titans:PersistentMemoryAttention",
  )
)
