"""Checkpoints: train state + data-iterator state + config, through orbax.

The train state is saved as a flat ``{path: array}`` dict named by pytree paths
(``params/stack/blocks/0/attn/wq``), so a checkpoint is readable without the code and a
mismatch names the exact arrays. Orbax writes each step into a temporary directory and
renames it when complete, so a kill during a save leaves the previous step loadable.
"""

import os

import jax
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  """A checkpoint cannot be restored into this run (corrupt, or a different model)."""


def flatten_state(tree) -> dict:
  """``{"a/b/0/c": leaf}`` from a pytree (NNX Variables contribute their value)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  out = {}
  for path, leaf in flat:
    names = []
    for key in path:
      name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", None)))
      if name is None:  # a Variable's value slot
        continue
      names.append(str(name))
    out["/".join(names) or "value"] = leaf
  if len(out) != len(flat):
    raise ValueError("state paths are not unique; cannot name the checkpoint arrays")
  return out


def unflatten_state(template, flat: dict):
  """Puts arrays from ``flat`` back into ``template``'s structure (by path)."""
  treedef = jax.tree_util.tree_structure(template)
  names = list(flatten_state(template))
  return jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names])


class Checkpointer:
  """A thin wrapper over ``ocp.CheckpointManager`` for the trainer.

  Args:
    directory: ``<workdir>/checkpoints``.
    keep: how many recent checkpoints to keep.
    async_save: write in a background thread (the step loop continues).
  """

  def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=async_save, create=True
    )
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
      },
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, config: dict, *, force=False) -> bool:
    return self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(flatten_state(state)),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config),
      ),
      force=force,
    )

  def restore(self, step: int, abstract_state):
    """Returns ``(state, data_state, config)`` for ``step`` laid out like ``abstract_state``.

    Raises:
      CheckpointError: the checkpoint is unreadable or holds different arrays or shapes.
    """
    target = flatten_state(abstract_state)
    try:
      saved = self.manager.item_metadata(step)["state"]
      saved_shapes = {k: tuple(v.shape) for k, v in saved.items()}
    except Exception as e:  # noqa: BLE001 - any failure here means an unreadable checkpoint
      raise CheckpointError(f"checkpoint {self.directory}/{step} is unreadable: {e}") from e
    want = {k: tuple(v.shape) for k, v in target.items()}
    if saved_shapes != want:
      missing = sorted(set(want) - set(saved_shapes))[:5]
      extra = sorted(set(saved_shapes) - set(want))[:5]
      shapes = sorted(
        f"{k}: saved {saved_shapes[k]} vs model {want[k]}"
        for k in set(want) & set(saved_shapes)
        if saved_shapes[k] != want[k]
      )[:5]
      raise CheckpointError(
        f"checkpoint {self.directory}/{step} does not match this model: missing {missing}, "
        f"unexpected {extra}, shape mismatches {shapes}"
      )
    try:
      restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target),
          data=ocp.args.JsonRestore(),
          config=ocp.args.JsonRestore(),
        ),
      )
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"checkpoint {self.directory}/{step} cannot be restored: {e}") from e
    state = unflatten_state(abstract_state, dict(restored["state"]))
    return state, restored["data"], restored["config"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
