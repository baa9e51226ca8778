"""Process group start-up, the device mesh, and agreement between hosts.

Every host runs the same program. Whatever the hosts decide (a config, a failure, a
manifest) they decide identically, through the coordinator or a collective.
"""

import glob
import hashlib
import socket
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from vitpod import config as config_lib
from vitpod import storage
from vitpod.errors import UserError

# Batch rows are split over both axes; params are replicated over 'data', sharded over 'fsdp'.
BATCH_AXES = ("data", "fsdp")


def _on_cloud_tpu_vm() -> bool:
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def initialize(coordinator_address: str = "", num_processes: int = 0,
               process_id: int = -1) -> None:
    """Join the job: explicit flags for local multi-process runs, auto-detect on TPU VMs."""
    if coordinator_address:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise UserError(f"--process_id={process_id} --num_processes={num_processes}: "
                            "need num_processes >= 1 and 0 <= process_id < num_processes")
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    elif _on_cloud_tpu_vm():
        jax.distributed.initialize()  # worker list and coordinator from the TPU metadata


def free_port() -> int:
    """A free TCP port on loopback, for a local coordinator."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_mesh(mesh_cfg: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """Mesh ('data', 'fsdp') over all devices of all processes."""
    shape = config_lib.mesh_shape(mesh_cfg, jax.device_count())
    return jax.make_mesh(shape, BATCH_AXES)


def host_block(sharding: jax.sharding.Sharding, global_batch: int) -> tuple[int, int]:
    """(i, n): this process's devices hold rows [i*b, (i+1)*b) of the global batch, b = B/n.

    Read from the sharding itself, so the rows a host loads are always the rows its devices
    hold, whatever order the mesh puts the devices in.
    """
    rows = set()
    for index in sharding.addressable_devices_indices_map((global_batch,)).values():
        rows.update(range(*index[0].indices(global_batch)))
    n = jax.process_count()
    local = global_batch // n
    first = min(rows)
    if len(rows) != local or first % local or max(rows) != first + local - 1:
        raise UserError(f"this host's devices hold rows {sorted(rows)[:4]}... of the batch, "
                        "not one contiguous block; use a mesh whose data axes follow the hosts")
    return first // local, n


def check_same_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Fail on every host if any host was launched with another config or workdir."""
    if jax.process_count() == 1:
        return
    text = config_lib.to_json(config) + "\n" + storage.absolute(workdir)
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], np.int64)
    digests = multihost_utils.process_allgather(digest).reshape(-1)
    differ = [i for i, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise UserError(f"process(es) {differ} run a different config or workdir than process 0;"
                        " launch every host with the same flags")


def primary_first(fn: Callable[[], None], what: str) -> None:
    """Run `fn` on process 0 only; every process raises if it failed there."""
    failure = None
    if jax.process_index() == 0:
        try:
            fn()
        except UserError as e:
            failure = e
    if jax.process_count() > 1:
        failed = multihost_utils.broadcast_one_to_all(np.int32(failure is not None))
        if failed and failure is None:
            raise UserError(f"process 0 failed to {what}; its log says why")
    if failure is not None:
        raise failure
