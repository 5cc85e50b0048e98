"""Attention under ``shard_map`` for q/k/v sharded over batch and heads.

A Pallas kernel is an opaque custom call: XLA's automatic partitioner cannot split it, so
a kernel fed batch- or head-sharded arrays under ``jit`` would gather them onto every
device. ``sharded_attention`` runs ``dot_product_attention`` on each device's own slice
instead: attention is independent per example and per kv-head group, so no communication
is needed.

What it takes: the batch dim split over ``batch_axes`` and the head dims (N and K) over
``head_axes``. What it cannot take, with a ValueError saying so: a split of the sequence
(T or S; that needs ring/context-parallel attention, not built) or of the head dim H; a
batch or kv-head count the mesh axes do not divide.
"""

import math
from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from attn_jax.attention import _checks, api
from attn_jax.attention import biases as biases_lib
from attn_jax.attention import masks as masks_lib


def _axes(name: str, axes, mesh: Mesh) -> tuple[str, ...]:
  if axes is None:
    return ()
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  for axis in axes:
    if axis not in mesh.shape:
      raise ValueError(f"{name} names mesh axis {axis!r}; the mesh has {tuple(mesh.shape)}")
  return axes


def _size(axes: Sequence[str], mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def _spec_entry(axes: tuple[str, ...]):
  return axes if axes else None


def _check_committed(name: str, x, allowed: dict[int, tuple[str, ...]]):
  """Rejects a concrete input sharded along a dim the helper cannot split."""
  sharding = getattr(x, "sharding", None)
  if not isinstance(sharding, NamedSharding):
    return
  for dim, entry in enumerate(sharding.spec):
    if entry is None:
      continue
    got = (entry,) if isinstance(entry, str) else tuple(entry)
    if dim not in allowed:
      raise ValueError(
        f"{name} is sharded along dim {dim} ({sharding.spec}); sharded_attention splits only "
        "the batch and head dims — a sequence split needs ring attention (not built) and a "
        "head-dim split is not supported: reshard (e.g. jax.device_put) first"
      )
    if got != allowed[dim]:
      raise ValueError(
        f"{name} is sharded as {sharding.spec}; dim {dim} must be split over "
        f"{allowed[dim] or 'nothing'} to match batch_axes/head_axes"
      )


def _onto_mesh(x, spec: PartitionSpec, mesh: Mesh):
  """A concrete array committed to devices other than the mesh's (e.g. one device, as a
  previous computation left it) moved onto the mesh, laid out as ``spec``; anything else
  as it is (jit and shard_map place uncommitted arrays themselves)."""
  if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer) or not x.committed:
    return x
  if x.sharding.device_set == set(mesh.devices.flat):
    return x
  return jax.device_put(x, NamedSharding(mesh, spec))


def _all_onto_mesh(tree, specs, mesh: Mesh):
  """``_onto_mesh`` on every array of ``tree`` with its PartitionSpec from ``specs``."""
  return jax.tree.map(
    lambda spec, x: _onto_mesh(x, spec, mesh),
    specs,
    tree,
    is_leaf=lambda node: isinstance(node, PartitionSpec),
  )


def _mask_specs(mask, batch_spec):
  """A PartitionSpec tree for the mask's arrays: per-example arrays split over the batch."""
  if isinstance(mask, masks_lib.AndMask | masks_lib.OrMask):
    return type(mask).tree_unflatten(
      None, (_mask_specs(mask.left, batch_spec), _mask_specs(mask.right, batch_spec))
    )
  spec = PartitionSpec(batch_spec) if mask.batched else PartitionSpec()
  return jax.tree.map(lambda _: spec, mask)


def sharded_attention(
  q,
  k,
  v,
  *,
  mesh: Mesh,
  batch_axes: str | Sequence[str] | None = ("data", "fsdp"),
  head_axes: str | Sequence[str] | None = "tensor",
  mask=None,
  bias=None,
  sinks=None,
  return_lse: bool = False,
  **kwargs,
):
  """``dot_product_attention`` per shard, with q/k/v split over batch and heads.

  Args:
    q, k, v, mask, bias, sinks, return_lse, **kwargs: as ``dot_product_attention``
      (``implementation``, ``scale``, ``softcap``, ``block_q``, ``block_kv``).
    mesh: the device mesh.
    batch_axes: mesh axes the batch dim B is split over (None: not split).
    head_axes: mesh axes the head dims N and K are split over (None: not split). Query head
      n stays with its kv head n // (N // K), so GQA groups never straddle devices.

  Per-example mask arrays (segment ids, prefix lengths) follow the batch split; a dense
  bias follows the batch / head split on the dims where it is not broadcast; sink logits
  and the arrays of a ``ScoreBias`` (per-head, leading dim N) follow the head split.
  Outside jit, input arrays committed to other devices than the mesh's (one device, as a
  previous computation left them) are moved onto the mesh in that layout first.
  """
  dims = _checks.check_qkv(q, k, v)
  _checks.check_options(dims, mask=mask, bias=bias, sinks=sinks)
  if not isinstance(mesh, Mesh):
    raise ValueError(f"mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}")
  b_axes = _axes("batch_axes", batch_axes, mesh)
  h_axes = _axes("head_axes", head_axes, mesh)
  if set(b_axes) & set(h_axes):
    raise ValueError(f"batch_axes {b_axes} and head_axes {h_axes} must not share a mesh axis")
  if dims.B % _size(b_axes, mesh):
    raise ValueError(
      f"batch size B={dims.B} is not divisible by the {_size(b_axes, mesh)} devices of "
      f"batch_axes {b_axes}"
    )
  if dims.K % _size(h_axes, mesh):
    raise ValueError(
      f"kv heads K={dims.K} are not divisible by the {_size(h_axes, mesh)} devices of "
      f"head_axes {h_axes}; pass head_axes=None to keep heads whole"
    )
  bs, hs = _spec_entry(b_axes), _spec_entry(h_axes)
  for name, x in (("q", q), ("k", k), ("v", v)):
    _check_committed(name, x, {0: b_axes, 2: h_axes})

  qkv_spec = PartitionSpec(bs, None, hs, None)
  mask_spec = None if mask is None else _mask_specs(mask, bs)
  if bias is None:
    bias_spec = None
  elif isinstance(bias, biases_lib.ScoreBias):
    bias_spec = jax.tree.map(lambda _: PartitionSpec(hs), bias)
  else:
    bias_spec = PartitionSpec(
      bs if bias.shape[0] > 1 else None, hs if bias.shape[1] > 1 else None, None, None
    )
  sinks_spec = None if sinks is None else PartitionSpec(hs)
  out_spec = qkv_spec
  if return_lse:
    out_spec = (qkv_spec, PartitionSpec(bs, hs, None))

  def local(q, k, v, mask, bias, sinks):
    return api.dot_product_attention(
      q, k, v, mask=mask, bias=bias, sinks=sinks, return_lse=return_lse, **kwargs
    )

  in_specs = (qkv_spec, qkv_spec, qkv_spec, mask_spec, bias_spec, sinks_spec)
  # Called eagerly on arrays committed elsewhere (one device, say), jit would refuse the
  # mix of devices: such inputs move onto the mesh first.
  args = tuple(
    _all_onto_mesh(x, spec, mesh)
    for x, spec in zip((q, k, v, mask, bias, sinks), in_specs, strict=True)
  )
  fn = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False)
  return fn(*args)
