"""Orbax checkpoints of the train state: async saves, keep-N, restore into given shardings.

Orbax writes each step into a temporary directory and renames it when complete, so a
process killed mid-save leaves nothing that `all_steps()` lists. A listed checkpoint that
still fails to restore (a damaged disk, a partial copy) is moved aside and the one before
it is used, with a warning naming it.
"""

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils


def manager(directory: str, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                           create=True)
    return ocp.CheckpointManager(directory, options=options)


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
    """Start an async save; training continues while it is written."""
    mngr.save(step, args=ocp.args.StandardSave(state), force=True)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state):
    """(step, state) of the newest readable checkpoint, or (0, None) when there is none."""
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            state = mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except Exception as e:  # noqa: BLE001  any unreadable checkpoint: fall back
            path = epath.Path(mngr.directory) / str(step)
            aside = path.parent / f"{step}.unreadable"
            logging.warning("checkpoint %s is unreadable (%s: %s); moved it to %s and trying "
                            "the one before", path, type(e).__name__, str(e)[:200], aside)
            if jax.process_index() == 0:
                path.rename(aside)
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices(f"moved aside checkpoint {step}")
            mngr.reload()
            continue
        return step, state
    return 0, None
