"""Shared plumbing of the attention layers that own their projections and hand a parameter
pytree to a pure family function (``attn_jax.attention.mla``, ``.heads``, ...).

Such a layer declares its parameters from the family's ``param_specs`` (name -> shape,
initializer, logical axes), validates its options against its ``DEFAULT_OPTIONS``, turns
packed-document ids into a mask, and, for ``capture=True``, sows the probabilities and the
per-head outputs computed by the reference path on its per-head q/k/v.
"""

import jax.numpy as jnp
from flax import nnx

from attn_jax.attention import masks, reference
from attn_jax.attention import rope as rope_lib
from attn_jax.nn import layers


def merge_options(kind: str, options: dict | None, defaults: dict) -> dict:
  """``{**defaults, **options}``, refusing keys ``defaults`` does not declare."""
  options = dict(options or {})
  unknown = set(options) - set(defaults)
  if unknown:
    raise ValueError(
      f"unknown attention options {sorted(unknown)} for {kind!r}; known: {sorted(defaults)}"
    )
  return {**defaults, **options}


def check_kind(layer: str, kind: str, kinds, positions: str, allowed_positions) -> None:
  """Rejects a registry id the layer does not serve and an unknown ``positions``."""
  if kind not in kinds:
    raise ValueError(f"{layer} serves the registry ids {tuple(kinds)}; got kind={kind!r}")
  if positions not in allowed_positions:
    raise ValueError(f"positions must be one of {tuple(allowed_positions)}; got {positions!r}")


def rope_settings(positions: str, rope_base: float, rotary_dim, head_dim: int) -> dict | None:
  """The ``rope`` dict of the layer functions (None unless ``positions == "rope"``); a bad
  ``rotary_dim`` fails here, at construction, rather than at the first call."""
  if positions != "rope":
    return None
  rope = {"base": rope_base, "rotary_dim": rotary_dim}
  rope_lib.apply_rope(jnp.zeros((1, 1, 1, head_dim)), jnp.zeros((1,), jnp.int32), **rope)
  return rope


def segment_mask(segment_ids_BT) -> masks.Mask | None:
  """Tokens attend only within their packed document (None: no packing)."""
  if segment_ids_BT is None:
    return None
  return masks.SegmentMask(segment_ids_BT, segment_ids_BT)


def sow_aux_loss(module: nnx.Module, value) -> None:
  """Sows ``value`` as ``nnx.Intermediate`` "aux_loss" (the trainer's auxiliary losses), only
  under ``nnx.capture``: a plain call inside a jax transform (``jax.grad`` over a closure) may
  not mutate the module, and sowing outside capture is deprecated in flax."""
  if hasattr(module, "__captures__"):
    module.sow(nnx.Intermediate, "aux_loss", value)


class ProjectedAttention(nnx.Module):
  """Base of the layers above: parameters by name, the pytree view, the captured reference."""

  def _declare_params(self, rngs: nnx.Rngs, specs: dict) -> None:
    """One ``nnx.Param`` per ``name: (shape, init, logical_axes)`` entry of ``specs``."""
    self.param_names = tuple(specs)
    for name, (shape, init, axes) in specs.items():
      setattr(self, name, layers.param(rngs, init, shape, axes))

  def param_tree(self) -> dict:
    """The parameters as the pytree the family's pure functions take."""
    return {name: getattr(self, name)[...] for name in self.param_names}

  def _sow_reference(self, q_BTNH, k_BSKH, v_BSKV, mask, *, causal: bool, scale=None):
    """Per-head outputs ``[B, T, N, Hv]`` by the reference path; sows them and the
    probabilities ``[B, N, T, S]`` as ``nnx.Intermediate`` ("heads", "probs")."""
    if causal:
      mask = masks.CausalMask() if mask is None else masks.CausalMask() & mask
    out_BTNV, probs_BNTS = reference.attention_reference(
      q_BTNH, k_BSKH, v_BSKV, mask=mask, scale=scale, return_probs=True
    )
    self.sow(nnx.Intermediate, "probs", probs_BNTS)
    self.sow(nnx.Intermediate, "heads", out_BTNV)
    return out_BTNV
