"""NNX layers that are thin wrappers of one pure layer function.

Many mechanisms own their projections and are fully described by a ``param_specs`` (name ->
shape, initializer, logical axes) and a layer function ``fn(params, x, *, causal,
implementation, mask, positions_BT, rope)``. ``functional_layer`` builds their NNX module:
the constructor takes the keyword arguments every attention module of the stacks takes,
validates the kind, positions and options, declares the parameters, and the call hands the
parameter pytree to the function (packed-document ids become a mask).
"""

from collections.abc import Callable

from attn_jax.nn import attention as attention_lib
from attn_jax.nn import projected

ALL_POSITIONS = ("rope", "learned", "none")


def functional_layer(
  class_name: str,
  kind: str,
  specs_fn: Callable[..., dict],
  layer_fn: Callable,
  *,
  options: dict | None = None,
  positions: tuple[str, ...] = ALL_POSITIONS,
  causal_only: bool = False,
  call_options: tuple[str, ...] = (),
  doc: str = "",
  module: str = __name__,
) -> type:
  """The NNX class for registry id ``kind``.

  Args:
    class_name: the class's name (the registry's ``module`` field points at it).
    kind: the registry id it serves.
    specs_fn: ``specs_fn(d_model=, num_heads=, num_kv_heads=, head_dim=, v_head_dim=,
      **options)`` -> ``{name: (shape, init, logical_axes)}``.
    layer_fn: the pure layer function.
    options: the layer's own option keys with their defaults (passed to ``specs_fn`` with
      the defaults' types); the generic keys of ``attn_jax.nn.attention`` are declared too
      and ignored.
    positions: the ``positions`` values it accepts ("rope" rotates q and k in the function).
    causal_only: refuse ``causal=False``.
    call_options: keys of ``options`` passed to ``layer_fn`` at call time (not to
      ``specs_fn``: they do not change the parameters).
    doc: the class docstring.
    module: the module the class is reached from (its ``__module__``).
  """
  own = dict(options or {})
  defaults = {**attention_lib.DEFAULT_OPTIONS, **own}

  def __init__(
    self,
    *,
    d_model: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    v_head_dim: int | None = None,
    kind: str = kind,
    causal: bool = True,
    positions: str = positions[0],
    rope_base: float = 10000.0,
    rotary_dim: int | None = None,
    qk_norm: bool = False,
    options: dict | None = None,
    implementation: str | None = None,
    rngs,
  ):
    if positions == "rope" and "rope" not in type(self).POSITIONS:
      allowed = " or ".join(repr(p) for p in type(self).POSITIONS)
      raise ValueError(
        f"attention kind {kind!r} carries position itself: use positions={allowed}, not 'rope'"
      )
    projected.check_kind(class_name, kind, (type(self).KIND,), positions, type(self).POSITIONS)
    if causal_only and not causal:
      raise ValueError(f"attention kind {kind!r} is causal-only; the model is bidirectional")
    if qk_norm:
      raise ValueError(f"attention kind {kind!r} does not take qk_norm=True; use qk_norm=False")
    merged = projected.merge_options(kind, options, defaults)
    spec_options = {k: type(own[k])(merged[k]) for k in own if k not in call_options}
    self.call_options = {k: type(own[k])(merged[k]) for k in call_options}
    specs = specs_fn(
      d_model=d_model,
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=head_dim,
      v_head_dim=v_head_dim,
      **spec_options,
    )
    self.causal, self.implementation = causal, implementation
    self._declare_params(rngs, specs)
    self.rope = None
    if positions == "rope":
      key_shape = specs["w_k"][0] if "w_k" in specs else specs["w_q"][0]
      self.rope = projected.rope_settings(positions, rope_base, rotary_dim, key_shape[-1])

  def __call__(self, x_BTD, *, positions_BT=None, segment_ids_BT=None):
    kwargs = dict(
      causal=self.causal,
      implementation=self.implementation,
      mask=projected.segment_mask(segment_ids_BT),
      positions_BT=positions_BT,
    )
    if self.rope is not None:
      kwargs["rope"] = self.rope
    return type(self).FUNCTION(self.param_tree(), x_BTD, **kwargs, **self.call_options)

  return type(
    class_name,
    (projected.ProjectedAttention,),
    {
      "__init__": __init__,
      "__call__": __call__,
      "__doc__": doc or f"The NNX layer of ``{kind}``.",
      "__module__": module,
      "__qualname__": class_name,
      "KIND": kind,
      "POSITIONS": positions,
      "DEFAULT_OPTIONS": defaults,
      "FUNCTION": staticmethod(layer_fn),
    },
  )
