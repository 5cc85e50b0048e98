"""Linear / full-attention layer schedules (catalog family (g): ``hybrid_schedule``).

A hybrid stack interleaves linear-attention layers (a recurrent state each) with softmax
attention layers (a KV cache each), e.g. three linear layers for every full layer. The
schedule is a list of registry ids, one per layer::

    hybrid_schedule(8, linear="gated_delta", full="mha", linear_per_full=3)
    → [gated_delta, gated_delta, gated_delta, mha, gated_delta, gated_delta, gated_delta, mha]

Layer l (0-based) is full attention when (l + 1) is a multiple of ``linear_per_full + 1``:
``linear_per_full=0`` is the all-full Transformer, ``linear_per_full >= num_layers`` the
pure linear model. ``full_first=True`` puts each group's full layer first instead of last.

Stacks take it three ways: ``--config.model.attention=hybrid_schedule`` with the options
``hybrid_linear``, ``hybrid_full``, ``hybrid_linear_per_full``, ``hybrid_full_first``
(expanded by ``attn_jax.nn.transformer.layer_kinds``); or the expanded list itself
(``--config.model.attention=gated_delta+gated_delta+gated_delta+mha``); or
``Transformer(attention=hybrid_schedule(...))``. Decoding: ``Transformer.init_cache``
makes one cache object (per layer: the recurrent state of a linear layer, the keys and
values of an attention layer, and the shared length), and ``Transformer.step`` runs any
number of new tokens against it (prefill, then one token at a time).

This entry has the registry's ``"schedule"`` interface: its function returns layer ids, the
stack is its module.
"""

from attn_jax.attention import registry

DEFAULTS = {
  "hybrid_linear": "gated_delta",
  "hybrid_full": "mha",
  "hybrid_linear_per_full": 3,
  "hybrid_full_first": False,
}


def hybrid_schedule(
  num_layers: int,
  *,
  linear: str = "gated_delta",
  full: str = "mha",
  linear_per_full: int = 3,
  full_first: bool = False,
) -> list[str]:
  """The per-layer registry ids of the module docstring."""
  if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
    raise ValueError(f"num_layers must be an int >= 1; got {num_layers!r}")
  if isinstance(linear_per_full, bool) or not isinstance(linear_per_full, int):
    raise ValueError(f"linear_per_full must be an int >= 0; got {linear_per_full!r}")
  if linear_per_full < 0:
    raise ValueError(f"linear_per_full must be an int >= 0; got {linear_per_full}")
  for name, kind in (("linear", linear), ("full", full)):
    mech = registry.get(kind)  # unknown ids raise, listing the registered ones
    if mech.interface == "schedule":
      raise ValueError(f"{name}={kind!r} is itself a schedule")
  if registry.get(linear).family != "g":
    raise ValueError(f"linear={linear!r} is not a linear-attention id (catalog family g)")
  group = linear_per_full + 1
  if full_first:
    return [full if l % group == 0 else linear for l in range(num_layers)]
  return [full if (l + 1) % group == 0 else linear for l in range(num_layers)]


def from_options(num_layers: int, options: dict | None) -> list[str]:
  """``hybrid_schedule`` with the ``hybrid_*`` config options (defaults for missing ones)."""
  o = {**DEFAULTS, **{k: v for k, v in (options or {}).items() if k in DEFAULTS}}
  return hybrid_schedule(
    num_layers,
    linear=str(o["hybrid_linear"]),
    full=str(o["hybrid_full"]),
    linear_per_full=int(o["hybrid_linear_per_full"]),
    full_first=bool(o["hybrid_full_first"]),
  )


def _build(key, dims, causal):
  del key, dims, causal
  return {}


registry.register(
  registry.Mechanism(
    id="hybrid_schedule",
    family="g",
    paper="A Systematic Analysis of Hybrid Linear Attention",
    entry_point="attn_jax.attention.hybrid:hybrid_schedule",
    implementations=("reference", "xla"),
    patterns=frozenset((registry.SELF_CAUSAL,)),
    decode=False,
    tier=2,
    check=(
      "All-full equals the Transformer, and all-linear equals the pure linear model. Prefill "
      "followed by token-by-token decoding (one cache object: recurrent states and KV) equals "
      "full-sequence evaluation."
    ),
    build=_build,
    module="attn_jax.nn.hybrid:HybridSchedule",
    interface="schedule",
  )
)
