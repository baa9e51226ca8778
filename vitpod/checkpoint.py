"""Orbax checkpoints of the train state: async saves, keep-N, restore into given shardings.

Orbax writes each step into a temporary directory and renames it when complete, so a
process killed mid-save leaves nothing that `all_steps()` lists. A restore that fails is
tried again with backoff (a transient I/O error, a slow bucket, memory). A checkpoint counts
as damaged only for an error that says its files are missing or garbled, and only when
every process says so: each process tries on its own (no collective inside a try), then one
allgather of the verdicts decides for all. A folder this process may not read is not
damaged. Damaged checkpoints newer than the one restored are moved aside; anything else
stops the run with one line and moves nothing.
"""

import json
import os
import re
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from vitpod import localfs, storage
from vitpod.errors import UserError, one_line

RESTORE_TRIES = 3
RESTORE_BACKOFF_SECONDS = 2.0  # doubled after each failed try
_ITEM = "default"  # the item orbax stores a single StandardSave under
OK, DAMAGED, FAILED = 0, 1, 2
# tensorstore puts the status first in its messages; these say the bytes are missing or wrong
# (a truncated or deleted file), not that reading them failed this time (UNAVAILABLE, ...).
_DAMAGE_STATUSES = ("NOT_FOUND:", "DATA_LOSS:", "OUT_OF_RANGE:", "FAILED_PRECONDITION:")


def manager(directory: str, keep: int) -> ocp.CheckpointManager:
    # Temporary folders left by a crash mid-save are removed at start (the workdir's lease
    # makes sure no other run is writing one).
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                           create=True, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory, options=options)


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
    """Start an async save; training continues while it is written."""
    mngr.save(step, args=ocp.args.StandardSave(state), force=True)


def listed(directory: str) -> list[int]:
    """The steps of the checkpoints in `directory` as orbax names them, without creating it."""
    try:
        names = storage.subdirs(directory) if storage.isdir(directory) else []
    except PermissionError as e:
        raise localfs.write_error(directory, e) from None
    return sorted(int(name) for name in names if name.isdigit())


def restore_latest(mngr: ocp.CheckpointManager, abstract_state):
    """(step, state) of the newest checkpoint every process restores, or (0, None) when none
    is listed. UserError, with nothing moved, when a checkpoint fails on some process for
    another reason than damage, or when every listed checkpoint is damaged."""
    directory = epath.Path(mngr.directory)
    damaged = []
    for step in sorted(mngr.all_steps(), reverse=True):
        state, verdict, reason = _try_restore(directory / str(step) / _ITEM, abstract_state)
        verdicts = [verdict]
        if jax.process_count() > 1:
            verdicts = [int(v) for v in np.asarray(
                multihost_utils.process_allgather(np.int32(verdict))).reshape(-1)]
        if all(v == OK for v in verdicts):
            _move_aside(mngr, damaged)
            return step, state
        if all(v == DAMAGED for v in verdicts):
            logging.warning("checkpoint %s is damaged (%s); trying the one before",
                            directory / str(step), reason)
            damaged.append((step, reason))
            continue
        failed = [i for i, v in enumerate(verdicts) if v != OK]
        why = reason or f"the log of process {failed[0]} says why"
        raise UserError(
            f"checkpoint {directory / str(step)} did not restore on process(es) {failed} after "
            f"{RESTORE_TRIES} tries ({why}); no checkpoint was moved or deleted: relaunch once "
            "the cause is fixed")
    if damaged:
        raise UserError(
            f"no checkpoint in {directory} restores: {', '.join(str(s) for s, _ in damaged)} "
            f"damaged ({damaged[0][1]}); none was moved or deleted. Put back good copies, or "
            "move them out of that folder to train again from step 0")
    return 0, None


def _try_restore(path: epath.Path, abstract_state):
    """(state or None, verdict, reason) of up to RESTORE_TRIES tries on this process alone:
    orbax's handler, not its manager, whose restore ends in a barrier that a process whose
    try failed would never reach."""
    for attempt in range(1, RESTORE_TRIES + 1):
        handler = ocp.StandardCheckpointHandler()
        try:
            return handler.restore(path, args=ocp.args.StandardRestore(abstract_state)), OK, ""
        except Exception as e:  # noqa: BLE001  judged below; a bug shows in `reason`
            denied = _access_error(path.parent)
            reason = denied or _reason(e)
            if attempt == RESTORE_TRIES:
                return None, DAMAGED if _is_damage(e) and not denied else FAILED, reason
            wait = RESTORE_BACKOFF_SECONDS * 2 ** (attempt - 1)
            logging.warning("restoring checkpoint %s failed (%s); trying again in %g s (try %d "
                            "of %d)", path.parent, reason, wait, attempt + 1, RESTORE_TRIES)
            time.sleep(wait)
        finally:
            handler.close()
    raise AssertionError("unreachable")


def _chain(error: BaseException) -> list[BaseException]:
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _is_damage(error: BaseException) -> bool:
    """Whether the error says the checkpoint's files are missing or garbled (not a timeout,
    not memory, not a restore target that differs from what was saved)."""
    chain = _chain(error)
    if any(isinstance(e, (MemoryError, TimeoutError, ConnectionError)) or (
            isinstance(e, OSError) and not isinstance(e, FileNotFoundError)) for e in chain):
        return False
    return any(isinstance(e, (json.JSONDecodeError, UnicodeDecodeError, FileNotFoundError))
               or (isinstance(e, ValueError) and str(e).startswith(_DAMAGE_STATUSES))
               for e in chain)


def _access_error(folder: epath.Path) -> str:
    """Why this process may not read a checkpoint's folder (a permission, a bucket's 403), or
    "" if it may: orbax reads an unreadable folder as a missing one, and that is no damage."""
    try:
        if storage.is_gcs(str(folder)):
            storage.files_below(str(folder))  # a 403 is a UserError naming the bucket
            return ""
        for root, _, names in os.walk(folder, onerror=_raise):
            for name in names:
                with open(os.path.join(root, name), "rb"):
                    pass
    except PermissionError as e:
        return _reason(e)
    except UserError as e:
        return one_line(e)
    except OSError:  # missing, or another error: the restore's own error decides
        pass
    return ""


def _raise(error: OSError) -> None:
    raise error


def _reason(error: BaseException) -> str:
    """The telling error of a chain in one short line: an I/O or decode error, or a
    tensorstore status, when there is one (orbax's outer errors end in a page of spec)."""
    chain = _chain(error)
    telling = next((e for e in chain if isinstance(e, (OSError, MemoryError, ValueError))
                    and (type(e) is not ValueError or re.match(r"[A-Z_]+: ", str(e)))),
                   chain[0])
    first = next((line for line in str(telling).splitlines() if line.strip()), "")
    return f"{type(telling).__name__}: {one_line(first)[:200]}"


def _move_aside(mngr: ocp.CheckpointManager, damaged: list) -> None:
    """Damaged checkpoints newer than the one restored, renamed STEP.unreadable by process 0
    (every process agreed on them) so that orbax lists and replaces them no more."""
    if not damaged:
        return
    if jax.process_index() == 0:
        for step, _ in damaged:
            path = epath.Path(mngr.directory) / str(step)
            path.rename(path.parent / f"{step}.unreadable")
            logging.warning("moved the damaged checkpoint %s aside to %s.unreadable", path, step)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("vitpod: damaged checkpoints moved aside")
    mngr.reload()


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
