"""Meshes, logical axis rules and shardings for params, optimizer state and activations.

Parameters name their axes logically (``embed``, ``heads``, ``kv_heads``, ``mlp``, ``vocab``,
``norm``); activations use ``batch`` and ``length`` too. The config's ``sharding.rules`` map
each logical name to mesh axes (``data``, ``fsdp``, ``tensor``) or to None (replicated).
A mesh axis is dropped from a dimension it does not divide (for example one head over a
2-way ``tensor`` axis) so every model runs on every mesh; that dimension is replicated.
"""

import contextlib
import math
import threading
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES = (
  ("batch", ("data", "fsdp")),
  ("length", None),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("mlp", "tensor"),
  ("vocab", "tensor"),
  ("norm", None),
  ("head_dim", None),
  ("layers", None),
  ("positions", None),
)


def make_mesh(shape: dict | None = None, devices: Sequence | None = None) -> Mesh:
  """A ``(data, fsdp, tensor)`` mesh; one axis may be -1 to take the remaining devices.

  Raises:
    ValueError: sizes are not positive, more than one is -1, or the mesh needs more
      devices than exist (or does not use them all).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = {"data": -1, "fsdp": 1, "tensor": 1, **dict(shape or {})}
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh axes must be among {MESH_AXES}; got {sorted(unknown)}")
  sizes = [int(shape[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes must be positive with at most one -1; got {shape}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {shape} cannot be filled from {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
      f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices; "
      f"there are {len(devices)}"
    )
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(axes: Sequence[str | None], rules=DEFAULT_RULES) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once."""
  table = dict(rules)
  used, out = set(), []
  for name in axes:
    target = table.get(name) if name is not None else None
    if target is None:
      out.append(None)
      continue
    targets = tuple(t for t in ((target,) if isinstance(target, str) else target) if t not in used)
    used.update(targets)
    out.append(targets[0] if len(targets) == 1 else (targets or None))
  return PartitionSpec(*out)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Drops mesh axes that do not divide their dimension (that dimension is replicated)."""
  out = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
    names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
    kept = []
    for name in names:
      if dim % (math.prod(mesh.shape[n] for n in kept) * mesh.shape[name]) == 0:
        kept.append(name)
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*out)


def named_sharding(mesh: Mesh, axes, shape, rules=DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, fit_spec(logical_to_spec(axes, rules), shape, mesh))


def tree_shardings(tree, mesh: Mesh, rules=DEFAULT_RULES):
  """Shardings for a tree whose leaves are NNX Variables (with ``logical_axes``) or arrays.

  Leaves without logical axes (optimizer counters, scalars) are replicated.
  """
  from flax import nnx  # sharding is imported by the data layer, which must not need flax

  def one(x):
    if isinstance(x, nnx.Variable):
      axes = x.get_metadata().get("logical_axes")
      value = x.get_value()
      spec = fit_spec(logical_to_spec(axes, rules), value.shape, mesh) if axes else PartitionSpec()
      return x.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


# Activation constraints: the trainer enters ``activation_sharding(mesh, rules)`` around the
# traced step; outside it (tests, importers) ``constrain`` does nothing.
_STATE = threading.local()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules=DEFAULT_RULES):
  previous = getattr(_STATE, "value", None)
  _STATE.value = (mesh, tuple(rules))
  try:
    yield
  finally:
    _STATE.value = previous


def current():
  """The ``(mesh, rules)`` of the enclosing ``activation_sharding`` block, or None."""
  return getattr(_STATE, "value", None)


def mesh_axes_for(logical: str, rules=DEFAULT_RULES) -> tuple[str, ...]:
  """The mesh axes a logical axis name maps to (empty when replicated)."""
  target = dict(rules).get(logical)
  if target is None:
    return ()
  return (target,) if isinstance(target, str) else tuple(target)


def constrain(x, axes: Sequence[str | None]):
  """``with_sharding_constraint`` by logical names when a mesh is active, else identity."""
  active = getattr(_STATE, "value", None)
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(x, named_sharding(mesh, axes, x.shape, rules))
