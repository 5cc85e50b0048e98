"""Score-bias functions: additive logit biases computed from (head, q_pos, kv_pos) in-tile.

A dense bias tensor costs B·N·T·S memory; a bias that is a function of positions costs
nothing. Fast paths call ``bias(heads, q_pos, kv_pos)`` on each tile, so a ``ScoreBias``
must be a pure function of its arguments and its pytree leaves (its parameters, which
receive gradients like any other input).

Dimension key: N query heads, n a subset of heads, tq / tk tile lengths.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int


class ScoreBias:
  """Base class: ``__call__(heads [n], q_pos [tq], kv_pos [tk]) -> [n, tq, tk]`` float."""

  num_heads: int

  def __call__(
    self, heads: Int[Array, " n"], q_pos: Int[Array, " tq"], kv_pos: Int[Array, " tk"]
  ) -> Float[Array, "n tq tk"]:
    raise NotImplementedError


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi head slopes: 2^(-8n/N) for n = 1..N, with the paper's recipe for N not a power of 2.

  For N not a power of two, the slopes of the nearest lower power of two P are followed by
  every other slope of 2P (from "Train Short, Test Long: Attention with Linear Biases
  Enables Input Length Extrapolation").
  """
  if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
    raise ValueError(f"num_heads must be an int >= 1; got {num_heads!r}")

  def geometric(n):
    return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

  p = 2 ** int(math.floor(math.log2(num_heads)))
  slopes = geometric(p)
  if p < num_heads:
    slopes += geometric(2 * p)[0::2][: num_heads - p]
  return np.asarray(slopes, np.float32)


@jax.tree_util.register_pytree_node_class
class AlibiBias(ScoreBias):
  """ALiBi bias ``m_n · (j − i)`` (non-positive for the causal keys j <= i).

  From "Train Short, Test Long: Attention with Linear Biases Enables Input Length
  Extrapolation". ``slopes`` is a float array ``[N]`` (a pytree leaf, so it can be learned);
  ``AlibiBias.default(N)`` uses the paper's geometric slopes. Meant for causal attention:
  for keys after the query the bias is positive (use a causal mask).
  """

  def __init__(self, slopes):
    dtype = getattr(slopes, "dtype", None)
    if dtype is None or jnp.ndim(slopes) != 1 or not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
        "AlibiBias slopes must be a float array of shape [N]; got "
        f"{type(slopes).__name__} shape={jnp.shape(slopes)} dtype={dtype}"
      )
    self.slopes = slopes

  @classmethod
  def default(cls, num_heads: int) -> "AlibiBias":
    return cls(jnp.asarray(alibi_slopes(num_heads)))

  @property
  def num_heads(self) -> int:
    return jnp.shape(self.slopes)[0]

  def __call__(self, heads, q_pos, kv_pos):
    slope = jnp.take(self.slopes, heads)[:, None, None]
    distance = (kv_pos[None, None, :] - q_pos[None, :, None]).astype(slope.dtype)
    return slope * distance

  def tree_flatten(self):
    return (self.slopes,), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    obj = object.__new__(cls)
    obj.slopes = children[0]
    return obj

  def __repr__(self):
    return f"AlibiBias(slopes{jnp.shape(self.slopes)})"


@jax.tree_util.register_pytree_node_class
class PeriodicBias(ScoreBias):
  """FaceFormer's periodic stepped bias ``−⌊(i − j) / p⌋`` for keys j <= i ("FaceFormer:
  Speech-Driven 3D Facial Animation with Transformers"): keys in the same period as the
  query get 0, one period back −1, and so on, for every head. Meant for causal attention
  (keys after the query would get a positive bias: use a causal mask). ``period`` >= the
  sequence length makes it plain causal attention. No parameters."""

  def __init__(self, period: int, num_heads: int):
    for name, value in (("period", period), ("num_heads", num_heads)):
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"PeriodicBias {name} must be an int >= 1; got {value!r}")
    self.period, self._num_heads = period, num_heads

  @property
  def num_heads(self) -> int:
    return self._num_heads

  def __call__(self, heads, q_pos, kv_pos):
    steps = jnp.floor_divide(q_pos[:, None] - kv_pos[None, :], self.period)
    return jnp.broadcast_to(-steps.astype(jnp.float32), (heads.shape[0], *steps.shape))

  def tree_flatten(self):
    return (), (self.period, self._num_heads)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*aux)

  def __repr__(self):
    return f"PeriodicBias(period={self.period}, num_heads={self._num_heads})"


def existence_log_probs(continue_logits_BS, segment_ids_BS=None):
  """``log p_j = Σ_(t <= j) log σ(c_t)`` ``[B, S]`` (float32 or wider): the log of key j's
  existence probability, a cumulative product of per-position continue probabilities σ(c_t)
  ("Zonkey: A Hierarchical Diffusion Language Model with Differentiable Tokenization and
  Probabilistic Attention"; our reading). With ``segment_ids_BS`` the product restarts at
  each packed document. p_j depends on positions <= j only, so it is causal-safe."""
  c = jnp.asarray(continue_logits_BS)
  if c.ndim != 2 or not jnp.issubdtype(c.dtype, jnp.floating):
    raise ValueError(f"continue_logits must be a float array [B, S]; got {c.dtype}{c.shape}")
  ls = jax.nn.log_sigmoid(c.astype(jnp.promote_types(c.dtype, jnp.float32)))
  cs = jnp.cumsum(ls, axis=1)
  if segment_ids_BS is None:
    return cs
  if jnp.shape(segment_ids_BS) != c.shape:
    raise ValueError(
      f"segment_ids must have the shape of continue_logits {c.shape}; got "
      f"{jnp.shape(segment_ids_BS)}"
    )
  seg = jnp.asarray(segment_ids_BS)
  start = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  first = jax.lax.cummax(jnp.where(start, jnp.arange(c.shape[1]), 0), axis=1)
  before = jnp.take_along_axis(cs - ls, first, axis=1)  # the sum before the document began
  return cs - before


def existence_bias(continue_logits_BS, segment_ids_BS=None):
  """The additive bias ``[B, 1, 1, S]`` = log p_j of ``existence_log_probs`` for
  ``dot_product_attention(..., bias=...)`` (broadcast over heads and queries, so it costs
  B·S memory and runs on every implementation). p ≡ 1 is plain attention; p_j = 0 masks
  key j."""
  return existence_log_probs(continue_logits_BS, segment_ids_BS)[:, None, None, :]
