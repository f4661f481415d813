"""Checkpoints: the only module that imports orbax.

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it when
complete), so a run killed mid-save leaves the last complete checkpoint as the latest one, and
unfinished temporary directories are removed on the next start.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def manager(directory: str, *, max_to_keep: int = 3, read_only: bool = False,
            asynchronous: bool = True) -> ocp.CheckpointManager:
    """A CheckpointManager over `<directory>` keeping the newest `max_to_keep` steps."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only, enable_async_checkpointing=asynchronous)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
    """Starts an asynchronous save of `state` at `step` (replaces one already there)."""
    mngr.save(step, args=ocp.args.StandardSave(state), force=True)


def restore(mngr: ocp.CheckpointManager, abstract_state, step: int | None = None):
    """Restores `step` (default: the latest) onto the shardings of `abstract_state`.

    `abstract_state` is a pytree of jax.ShapeDtypeStruct with `.sharding` set. Each array is
    read onto those shardings whatever the writer's were, so a checkpoint saved on 8 devices
    (replicated or FSDP) restores on 4 or 1, under either mode. Returns None when the
    directory holds no checkpoint.
    """
    step = mngr.latest_step() if step is None else step
    if step is None:
        return None
    if step not in mngr.all_steps():
        raise FileNotFoundError(
            f'no checkpoint for step {step} in {mngr.directory}; available: {mngr.all_steps()}')
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))


def abstract_with_shardings(abstract_state, shardings):
    """Attaches shardings to a pytree of ShapeDtypeStructs (from jax.eval_shape)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract_state, shardings)


def restore_weights(mngr: ocp.CheckpointManager, sharding) -> dict:
    """{'params', 'batch_stats'} of the latest checkpoint of any run, whatever its model,
    optimizer or device layout (read from the checkpoint's own metadata), every array on
    `sharding`; the optimizer state and the rest are not read. None when there is none."""
    step = mngr.latest_step()
    if step is None:
        return None
    path = os.path.join(mngr.directory, str(step), 'default')
    stored = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    target = {key: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                               sharding=sharding), stored[key])
              for key in ('params', 'batch_stats')}
    with ocp.PyTreeCheckpointer() as reader:
        return reader.restore(path, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True))

