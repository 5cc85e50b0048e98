"""Building blocks of the NNX stacks: parameters with logical axes, norms, MLPs, embeddings.

Dimension key: B batch, T length, D model dim, F MLP hidden dim, V vocabulary.

Every parameter carries ``logical_axes`` metadata (names such as ``embed``, ``heads``,
``mlp``, ``vocab``); ``attn_jax.sharding`` maps them to mesh axes with the config's rules.
"""

import jax
import jax.numpy as jnp
from flax import nnx

NORMS = ("layernorm", "rmsnorm")
MLPS = ("none", "gelu", "swiglu")


def param(rngs: nnx.Rngs, init, shape, axes, dtype=jnp.float32) -> nnx.Param:
  """A parameter initialised by ``init(key, shape, dtype)`` with its logical axis names."""
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {axes} do not match parameter shape {shape}")
  return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=tuple(axes))


def fan_in_init(fan_in: int):
  """Truncated normal with std 1/sqrt(fan_in), for projections stored as [in..., out...]."""
  return jax.nn.initializers.truncated_normal(stddev=fan_in**-0.5)


class Norm(nnx.Module):
  """LayerNorm (mean and variance, scale and bias) or RMSNorm (scale only), in float32."""

  def __init__(self, dim: int, *, kind: str = "layernorm", eps: float = 1e-6, rngs: nnx.Rngs):
    if kind not in NORMS:
      raise ValueError(f"norm kind must be one of {NORMS}; got {kind!r}")
    self.kind, self.eps = kind, eps
    self.scale = param(rngs, jax.nn.initializers.ones, (dim,), ("norm",))
    self.bias = (
      param(rngs, jax.nn.initializers.zeros, (dim,), ("norm",)) if kind == "layernorm" else None
    )

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    if self.kind == "layernorm":
      x32 = x32 - x32.mean(-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
    y = y * self.scale[...]
    if self.bias is not None:
      y = y + self.bias[...]
    return y.astype(x.dtype)


class MLP(nnx.Module):
  """Feed-forward layer: GELU (``D -> F -> D``) or SwiGLU (``silu(xW1) * xW3`` then ``W2``)."""

  def __init__(self, d_model: int, hidden: int, *, kind: str = "gelu", rngs: nnx.Rngs):
    if kind not in ("gelu", "swiglu"):
      raise ValueError(
        f"mlp kind must be 'gelu' or 'swiglu' (or 'none' at the block); got {kind!r}"
      )
    self.kind = kind
    self.w_in = param(rngs, fan_in_init(d_model), (d_model, hidden), ("embed", "mlp"))
    self.w_gate = (
      param(rngs, fan_in_init(d_model), (d_model, hidden), ("embed", "mlp"))
      if kind == "swiglu"
      else None
    )
    self.w_out = param(rngs, fan_in_init(hidden), (hidden, d_model), ("mlp", "embed"))

  def __call__(self, x_BTD):
    dtype = x_BTD.dtype
    h_BTF = x_BTD @ self.w_in[...].astype(dtype)
    if self.kind == "swiglu":
      h_BTF = jax.nn.silu(h_BTF) * (x_BTD @ self.w_gate[...].astype(dtype))
    else:
      h_BTF = jax.nn.gelu(h_BTF)
    return h_BTF @ self.w_out[...].astype(dtype)


class Embed(nnx.Module):
  """Token embedding ``[V, D]``; ``attend`` reuses it as the (tied) output projection."""

  def __init__(self, vocab_size: int, d_model: int, *, rngs: nnx.Rngs):
    # std 1/sqrt(D): tied logits start at unit scale against a normalised hidden state.
    self.embedding = param(
      rngs,
      jax.nn.initializers.normal(stddev=d_model**-0.5),
      (vocab_size, d_model),
      ("vocab", "embed"),
    )

  def __call__(self, tokens_BT, dtype=jnp.float32):
    return jnp.take(self.embedding[...], tokens_BT, axis=0).astype(dtype)

  def attend(self, x_BPD):
    return x_BPD @ self.embedding[...].astype(x_BPD.dtype).T
