"""Input validation shared by every softmax-attention entry point.

Errors name the argument, what it got and what it needs, and are raised before tracing
reaches XLA (shapes and dtypes are static, so this works on tracers too).
"""

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from attn_jax.attention import biases as biases_lib
from attn_jax.attention import masks as masks_lib


class Dims(NamedTuple):
  B: int
  T: int
  S: int
  N: int
  K: int
  H: int
  Hv: int


def _describe(x) -> str:
  return f"{type(x).__name__} shape={tuple(jnp.shape(x))} dtype={getattr(x, 'dtype', None)}"


def _check_array(name: str, x, rank: int, layout: str):
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise ValueError(f"{name} must be an array of shape {layout}; got {type(x).__name__}")
  if x.ndim != rank:
    raise ValueError(
      f"{name} must have rank {rank} with layout {layout}; got shape {tuple(x.shape)}"
    )
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must have a floating dtype; got {x.dtype}")
  if any(d == 0 for d in x.shape):
    raise ValueError(f"{name} must not have an empty dimension; got shape {tuple(x.shape)}")


def check_qkv(q, k, v) -> Dims:
  """Validates q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv]; returns the sizes."""
  _check_array("q", q, 4, "[B, T, N, H]")
  _check_array("k", k, 4, "[B, S, K, H]")
  _check_array("v", v, 4, "[B, S, K, Hv]")
  B, T, N, H = q.shape
  _, S, K, _ = k.shape
  Hv = v.shape[-1]
  if k.shape[0] != B or v.shape[0] != B:
    raise ValueError(
      f"q, k and v must share the batch size B; got q {tuple(q.shape)}, "
      f"k {tuple(k.shape)}, v {tuple(v.shape)}"
    )
  if v.shape[1] != S or v.shape[2] != K:
    raise ValueError(
      f"v must have shape [B, S, K, Hv] matching k [B, S, K, H] = "
      f"{tuple(k.shape)}; got {tuple(v.shape)}"
    )
  if k.shape[3] != H:
    raise ValueError(f"q and k must share the head dim H; got q H={H}, k H={k.shape[3]}")
  if N % K:
    raise ValueError(
      f"the number of query heads N={N} must be a multiple of the number of "
      f"kv heads K={K} (q {tuple(q.shape)}, k {tuple(k.shape)})"
    )
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k and v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
  return Dims(B, T, S, N, K, H, Hv)


def check_options(dims: Dims, *, mask=None, bias=None, scale=None, softcap=None, sinks=None):
  """Validates the options of softmax attention against the sizes of q, k and v."""
  if mask is not None:
    if not isinstance(mask, masks_lib.Mask):
      raise ValueError(
        f"mask must be a attn_jax.attention.masks.Mask (e.g. CausalMask()); got "
        f"{type(mask).__name__}. Dense boolean masks are not accepted: wrap "
        "block structure in a Mask object."
      )
    mask.check_shapes(dims.B, dims.T, dims.S)
  if bias is not None:
    if isinstance(bias, biases_lib.ScoreBias):
      if bias.num_heads != dims.N:
        raise ValueError(f"bias function {bias!r} has {bias.num_heads} heads; needs N={dims.N}")
    else:
      if not hasattr(bias, "shape") or not jnp.issubdtype(
        getattr(bias, "dtype", None), jnp.floating
      ):
        raise ValueError(
          "bias must be a float array broadcastable to [B, N, T, S] or a "
          f"ScoreBias; got {_describe(bias)}"
        )
      want = (dims.B, dims.N, dims.T, dims.S)
      if bias.ndim != 4 or any(b not in (1, w) for b, w in zip(bias.shape, want, strict=True)):
        raise ValueError(
          f"bias must have rank 4 and be broadcastable to [B, N, T, S] = {want} "
          f"(each dim 1 or full); got shape {tuple(bias.shape)}"
        )
  if scale is not None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
      raise ValueError(f"scale must be a Python float; got {type(scale).__name__}")
    if not math.isfinite(scale) or scale == 0:
      raise ValueError(f"scale must be finite and non-zero; got {scale}")
  if softcap is not None:
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float, np.floating, np.integer)):
      raise ValueError(f"softcap must be a Python float > 0 or None; got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap > 0):
      raise ValueError(f"softcap must be finite and > 0 (or None); got {softcap}")
  if sinks is not None:
    if not hasattr(sinks, "shape") or not jnp.issubdtype(
      getattr(sinks, "dtype", None), jnp.floating
    ):
      raise ValueError(f"sinks must be a float array of shape [N]; got {_describe(sinks)}")
    if tuple(sinks.shape) != (dims.N,):
      raise ValueError(f"sinks must have shape [N] = ({dims.N},); got {tuple(sinks.shape)}")


def positive_int(name: str, value) -> int:
  """``value`` as an int >= 1 (bools and non-ints refused), else ValueError naming it."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be an int >= 1; got {value!r}")
  return value


def check_block_size(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive int; got {value!r}")


def default_scale(head_dim: int, scale) -> float:
  return float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)


def compute_dtype(dtype):
  """float32 for float32/bfloat16/float16 inputs; float64 for float64 inputs."""
  return jnp.promote_types(dtype, jnp.float32)
