"""Pre-norm transformer blocks and stacks whose attention kind is chosen per layer.

Dimension key: B batch, T length, D model dim.

``attention`` is a registry id (every layer) or a list with one id per layer, e.g.
``["sliding_window", "sliding_window", "mha"]``. Each id's NNX module comes from the
registry entry's ``module`` field; every attention module takes the keyword arguments of
``attn_jax.nn.attention.Attention`` and returns ``[B, T, D]``. A schedule id
(``hybrid_schedule``: registry interface ``"schedule"``) expands to one id per layer from
its ``hybrid_*`` options.

Decoding: ``Transformer.init_cache(batch, max_len)`` makes one cache object for the whole
stack — per layer the recurrent state of a linear-attention layer or the keys and values of
an attention layer, plus the number of tokens seen — and ``Transformer.step(x, cache)`` runs
new tokens against it (a prefill of many tokens, then one at a time): equal to running the
full sequence. Layers without ``init_cache`` / ``step`` raise NotImplementedError.
"""

import importlib
from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx

from attn_jax import sharding
from attn_jax.attention import registry
from attn_jax.nn import layers


def attention_module_class(kind: str):
  """The NNX module class of registry id ``kind`` (ValueError if unknown or module-less)."""
  mech = registry.get(kind)
  if mech.module is None or mech.interface == "pool":
    usable = sorted(
      m.id for m in registry.all_mechanisms() if m.module is not None and m.interface != "pool"
    )
    why = (
      "is a pooling head, not a token mixer (an encoder takes it as model.pooling)"
      if mech.interface == "pool"
      else "has no NNX module"
    )
    raise ValueError(
      f"attention mechanism {kind!r} {why}, so it cannot be a layer of the stack; "
      f"ids usable in the stack: {usable}"
    )
  module, name = mech.module.split(":")
  return getattr(importlib.import_module(module), name)


def default_options(attention: str | Sequence[str]) -> dict:
  """The option defaults of every attention module an id (or per-layer ids) selects.

  Configs start ``model.attention_options`` from this, so each option a module reads is a
  known config field (``--config.model.attention_options.<key>=...``). Modules declare their
  options and defaults in a ``DEFAULT_OPTIONS`` class attribute.
  """
  if isinstance(attention, str):
    attention = attention.split("+")
  options: dict = {}
  for kind in attention:
    options.update(getattr(attention_module_class(kind), "DEFAULT_OPTIONS", {}))
  return options


def check_known_options(options: dict, kinds: Sequence[str]) -> None:
  """Raises ValueError for option keys no module of ``kinds`` declares."""
  known = default_options(list(kinds))
  unknown = set(options) - set(known)
  if unknown:
    raise ValueError(
      f"unknown attention options {sorted(unknown)} for {list(kinds)}; known: {sorted(known)}"
    )


def layer_kinds(
  attention: str | Sequence[str], num_layers: int, options: dict | None = None
) -> list[str]:
  """One registry id per layer from an id, a list, or ``"a+b+c"`` (validated, aliases
  resolved); a schedule id (``hybrid_schedule``) expands with its ``options``."""
  if isinstance(attention, str) and "+" in attention:  # "a+b+c": one id per layer
    attention = attention.split("+")
  if isinstance(attention, str) and registry.get(attention).interface == "schedule":
    from attn_jax.attention import hybrid

    attention = hybrid.from_options(num_layers, options)
  kinds = [attention] * num_layers if isinstance(attention, str) else list(attention)
  if len(kinds) != num_layers:
    raise ValueError(
      f"model.attention lists {len(kinds)} kinds for num_layers={num_layers}: {kinds}"
    )
  for kind in kinds:
    attention_module_class(kind)
  return [registry.canonical_id(k) for k in kinds]


class Block(nnx.Module):
  """``x + attn(norm(x))`` then ``x + mlp(norm(x))`` (the MLP may be ``"none"``).

  ``layer_index`` (1-based depth, set by ``Transformer``) reaches attention modules that
  declare ``TAKES_LAYER_INDEX``."""

  def __init__(
    self,
    *,
    kind: str,
    d_model: int,
    mlp: str = "gelu",
    mlp_dim: int | None = None,
    norm: str = "layernorm",
    check_options: bool = True,
    layer_index: int = 1,
    rngs: nnx.Rngs,
    **attention_kwargs,
  ):
    if mlp not in layers.MLPS:
      raise ValueError(f"mlp must be one of {layers.MLPS}; got {mlp!r}")
    self.attn_norm = layers.Norm(d_model, kind=norm, rngs=rngs)
    cls = attention_module_class(kind)
    known = getattr(cls, "DEFAULT_OPTIONS", None)
    options = attention_kwargs.get("options")
    if known is not None and options is not None:
      if check_options:
        check_known_options(options, [kind])
      # Per-layer mixes share one options dict: each module takes the keys it declares.
      attention_kwargs = {
        **attention_kwargs,
        "options": {k: options[k] for k in options if k in known},
      }
    if getattr(cls, "TAKES_LAYER_INDEX", False):  # depth-dependent mechanisms (diff_attn)
      attention_kwargs = {**attention_kwargs, "layer_index": layer_index}
    self.attn = cls(d_model=d_model, kind=kind, rngs=rngs, **attention_kwargs)
    if mlp != "none":
      self.mlp_norm = layers.Norm(d_model, kind=norm, rngs=rngs)
    self.mlp = (
      layers.MLP(d_model, mlp_dim or 4 * d_model, kind=mlp, rngs=rngs) if mlp != "none" else None
    )

  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
    if not hasattr(self.attn, "init_cache"):
      raise NotImplementedError(
        f"{type(self.attn).__name__} layers do not decode against a cache yet"
      )
    return self.attn.init_cache(batch, max_len, dtype)

  def step(self, x_BTD, cache, length):
    y_BTD, cache = self.attn.step(self.attn_norm(x_BTD), cache, length)
    x_BTD = x_BTD + y_BTD
    if self.mlp is not None:
      x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD))
    return x_BTD, cache

  def __call__(self, x_BTD, **kwargs):
    x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), **kwargs)
    x_BTD = sharding.constrain(x_BTD, ("batch", "length", "embed"))
    if self.mlp is not None:
      x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD))
      x_BTD = sharding.constrain(x_BTD, ("batch", "length", "embed"))
    return x_BTD


class Transformer(nnx.Module):
  """A stack of ``Block``s with a per-layer attention kind and a final norm.

  Args:
    num_layers: number of blocks.
    attention: a registry id or one id per layer.
    remat: recompute each block's activations in the backward pass (saves memory).
    Other keyword arguments go to every ``Block`` (and through it to the attention module).
  """

  def __init__(
    self,
    *,
    num_layers: int,
    attention: str | Sequence[str] = "mha",
    d_model: int,
    norm: str = "layernorm",
    remat: bool = False,
    rngs: nnx.Rngs,
    **block_kwargs,
  ):
    self.kinds = layer_kinds(attention, num_layers, block_kwargs.get("options"))
    self.remat = remat
    if block_kwargs.get("options") is not None:
      named = attention.split("+") if isinstance(attention, str) else list(attention)
      check_known_options(block_kwargs["options"], named)
    self.blocks = nnx.List(
      [
        Block(
          kind=k,
          d_model=d_model,
          norm=norm,
          check_options=False,
          layer_index=i + 1,
          rngs=rngs,
          **block_kwargs,
        )
        for i, k in enumerate(self.kinds)
      ]
    )
    self.final_norm = layers.Norm(d_model, kind=norm, rngs=rngs)

  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """The decoding cache of the module docstring (a pytree: jit- and scan-friendly)."""
    return {
      "layers": [block.init_cache(batch, max_len, dtype) for block in self.blocks],
      "length": jnp.zeros((), jnp.int32),
    }

  def step(self, x_BTD, cache: dict):
    """New tokens ``x [B, T, D]`` after the ``cache["length"]`` already seen: returns
    ``(out [B, T, D], updated cache)``, equal to the matching rows of a full-sequence call.
    (Attention layers hold ``max_len`` positions; writing past them is not checked under
    jit.)"""
    length = cache["length"]
    new = []
    for block, layer_cache in zip(self.blocks, cache["layers"], strict=True):
      x_BTD, layer_cache = block.step(x_BTD, layer_cache, length)
      new.append(layer_cache)
    return self.final_norm(x_BTD), {"layers": new, "length": length + x_BTD.shape[1]}

  def __call__(self, x_BTD, **kwargs):
    for block in self.blocks:
      if self.remat:
        x_BTD = nnx.remat(lambda b, x: b(x, **kwargs))(block, x_BTD)
      else:
        x_BTD = block(x_BTD, **kwargs)
    return self.final_norm(x_BTD)
