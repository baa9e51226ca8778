"""Orbax checkpoints of the train state: async saves, keep-N, restore into given shardings."""

import orbax.checkpoint as ocp


def manager(directory: str, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                           create=True)
    return ocp.CheckpointManager(directory, options=options)


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
    """Start an async save; training continues while it is written."""
    mngr.save(step, args=ocp.args.StandardSave(state), force=True)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state):
    """Restore `step` with the shapes, dtypes and shardings of `abstract_state`."""
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))

