"""Orbax checkpoints of the train state: async saves, keep-N, restore into given shardings.

Orbax writes each step into a temporary directory and renames it when complete, so a
process killed mid-save leaves nothing that `all_steps()` lists. A listed checkpoint that
still fails to restore (a damaged disk, a partial copy) is moved aside and the one before
it is used, with a warning naming it.
"""

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from vitpod import storage
from vitpod.errors import UserError


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


def load_params(directory: str, step: int | None = None) -> tuple[int, dict]:
    """(step, params as numpy) of a checkpoint (the latest by default), on this host alone.

    For tools that read a run's weights (export, predict, evaluate) whatever mesh and
    process count wrote them. A run that keeps an EMA of its params is read as that EMA,
    the params its in-training eval scored.
    """
    with ocp.CheckpointManager(storage.absolute(directory),
                               item_handlers=ocp.StandardCheckpointHandler(),
                               options=ocp.CheckpointManagerOptions(read_only=True)) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise UserError(f"no checkpoint in {directory}; train first (python -m vitpod.train)")
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              mngr.item_metadata(step).tree)
        state = mngr.restore(step, args=ocp.args.StandardRestore(target))
    return step, jax.tree.map(np.asarray, _int_keys(state.get("ema_params", state["params"])))


def _int_keys(tree):
    """Checkpoint metadata spells list indices as strings; the model's params use ints."""
    if not isinstance(tree, dict):
        return tree
    return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v)
            for k, v in tree.items()}
