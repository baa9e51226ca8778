"""A launch's start-up on a TPU type's devices as libtpu describes them, run on this CPU
before any slice is paid for: the mesh a launch builds (vitpod/mesh.py), every host's rows of
the train and eval batches, and the shardings of the params, optimizer state and batch. What
fails here would fail on the slice before its first step.
"""

import dataclasses

import jax

from vitpod import config as config_lib
from vitpod import mesh as mesh_lib
from vitpod import optim, steps
from vitpod.errors import UserError


@dataclasses.dataclass(frozen=True)
class Startup:
    mesh: jax.sharding.Mesh
    hosts: int
    host_rows: dict[int, mesh_lib.Runs]  # process -> its rows of the train batch
    state: dict  # the abstract train state, with its shardings


def check(config, devices, num_classes: int) -> Startup:
    """Everything a launch decides before its first step, on `devices`; UserError naming the
    first thing that would stop it."""
    slices = mesh_lib.num_slices(devices)
    hosts = len({d.process_index for d in devices})
    config_lib.validate(config, len(devices), hosts, slices)
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    batch = steps.batch_sharding(mesh)
    rows = mesh_lib.host_rows(batch, config.batch_size)
    mesh_lib.host_rows(batch, config_lib.eval_batch_size(config))
    tx = optim.make(config.optim, config.total_steps)
    state = jax.eval_shape(steps.state_initializer(config, num_classes, tx, mesh), None)
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        try:
            leaf.sharding.shard_shape(leaf.shape)
        except ValueError as e:
            raise UserError(f"state {jax.tree_util.keystr(path)} {leaf.shape} cannot be sharded "
                            f"as {leaf.sharding.spec} over mesh {dict(mesh.shape)}: {e}") from None
    return Startup(mesh, hosts, rows, state)


def rows_json(host_rows: dict[int, mesh_lib.Runs]) -> dict[str, list[list[int]]]:
    """host_rows as plan's JSON gives it: {"0": [[start, stop], ...], ...}."""
    return {str(p): [list(r) for r in runs] for p, runs in host_rows.items()}
