"""Process group start-up and the device mesh."""

import jax
import ml_collections

from vitpod import config as config_lib

# Batch rows are split over both axes; params are replicated over 'data', sharded over 'fsdp'.
BATCH_AXES = ("data", "fsdp")


def initialize(coordinator_address: str = "", num_processes: int = 0,
               process_id: int = -1) -> None:
    """Join the job: explicit flags for local multi-process runs, auto-detect on TPU pods."""
    if coordinator_address:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)


def make_mesh(mesh_cfg: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """Mesh ('data', 'fsdp') over all devices of all processes."""
    shape = config_lib.mesh_shape(mesh_cfg, jax.device_count())
    return jax.make_mesh(shape, BATCH_AXES)
