"""The device mesh, and which rows of the global batch each host holds in it.

One slice gets `jax.make_mesh`'s mesh and several the hybrid mesh (slices along 'data'): both
follow the chips' ICI rings, which is what makes the collectives fast, and neither keeps a
host's devices together. On a v4-16 the two hosts alternate row by row; on a v5e-16 each host
holds several runs of rows. So every host reads exactly the rows its devices hold (`host_rows`,
a list of runs), in ascending order, and `jax.make_array_from_process_local_data` places them
(it ranks a host's shards by their start). The global batch of a step never depends on the
order, so losses and resumes do not either.

A CPU rehearsal cannot choose which devices a process owns, and JAX numbers CPU devices
process by process. Where a rehearsal's launcher sets DEVICE_ORDER_ENV (the host and local
device of every mesh position of the TPU type it rehearses, computed from libtpu's description
by `vitpod.device_order`), the CPU devices are placed as that type's chips would be. Nothing
else sets it: production meshes are never permuted.
"""

import json
import os

import jax
import ml_collections
import numpy as np

from vitpod import config as config_lib
from vitpod import protocol  # a leaf: standard library only
from vitpod.errors import UserError

# Batch rows are split over both axes; params are replicated over 'data', sharded over 'fsdp'.
BATCH_AXES = ("data", "fsdp")
# The TPU runtime's slice count on every host of a multislice job; a CPU rehearsal sets it to
# lay its processes out as slices.
NUM_SLICES_ENV = protocol.NUM_SLICES_ENV
DEVICE_ORDER_ENV = protocol.DEVICE_ORDER_ENV

Runs = tuple[tuple[int, int], ...]  # [start, stop) runs of batch rows, ascending


def num_slices(devices=None) -> int:
    """The job's slices: the distinct `slice_index`es of the devices on a multislice TPU job,
    else `MEGASCALE_NUM_SLICES` (a CPU rehearsal: CPU devices carry none, or all 0 under
    jax.distributed), else 1."""
    devices = jax.devices() if devices is None else devices
    if len(_slice_indices(devices)) > 1:
        return len(_slice_indices(devices))
    value = os.environ.get(NUM_SLICES_ENV, "1")
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{NUM_SLICES_ENV}={value!r} in the environment: need a number >= 1")
    return int(value)


def _slice_indices(devices) -> set:
    return {getattr(d, "slice_index", 0) for d in devices}


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
    """Mesh ('data', 'fsdp') over `devices` (all of the job's by default) as a launch builds
    it; with several slices the data axis runs over the slices first, FSDP within one."""
    devices = jax.devices() if devices is None else list(devices)
    grid = device_grid(mesh_cfg, devices, num_slices(devices))
    order = os.environ.get(DEVICE_ORDER_ENV)
    if order and devices[0].platform == "cpu":  # real chips are never reordered
        grid = rehearsed_grid(grid, order)
    return jax.sharding.Mesh(grid, BATCH_AXES,
                             axis_types=(jax.sharding.AxisType.Explicit,) * len(BATCH_AXES))


def device_grid(mesh_cfg: ml_collections.ConfigDict, devices, slices: int) -> np.ndarray:
    """The devices as a (data, fsdp) array. One slice: as `jax.make_mesh` lays it out (on TPU,
    along the ICI rings). Several: each slice's own mesh placed as a block, slice s at data
    rows [s*d, (s+1)*d). Devices without `slice_index` (CPU) are grouped into slices by
    process, `process_index // processes per slice`, as the TPU runtime numbers multislice
    hosts; so are devices whose `slice_index` does not tell the slices apart (CPU under
    jax.distributed: all 0)."""
    from jax.experimental import mesh_utils

    if slices == 1:
        shape = config_lib.mesh_shape(mesh_cfg, len(devices))
        return jax.make_mesh(shape, BATCH_AXES, devices=devices).devices
    dcn, ici = config_lib.hybrid_mesh_shapes(mesh_cfg, len(devices), slices)
    if len(_slice_indices(devices)) == slices:
        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    processes = sorted({d.process_index for d in devices})
    if len(processes) % slices:
        raise UserError(f"{len(processes)} processes cannot form {slices} slices "
                        f"({NUM_SLICES_ENV}): each slice needs the same number of hosts")
    per_slice = len(processes) // slices
    groups = [[d for d in devices if processes.index(d.process_index) // per_slice == s]
              for s in range(slices)]
    blocks = [mesh_utils.create_device_mesh(ici, group) for group in groups]
    return np.block([[b] for b in blocks])  # dcn shape (slices, 1): stacked along data


def rehearsed_grid(grid: np.ndarray, order_json: str) -> np.ndarray:
    """`grid`'s devices placed as the rehearsed TPU type places its chips: position i gets
    the k-th device (by id) of process h, where the TPU's mesh has host h's k-th chip."""
    order = json.loads(order_json)
    key = "x".join(map(str, grid.shape))
    local: dict[int, list] = {}
    for d in sorted(grid.flat, key=lambda d: d.id):
        local.setdefault(d.process_index, []).append(d)
    counts = {len(v) for v in local.values()}
    if len(local) != order["hosts"] or counts != {order["devices_per_host"]} or \
            key not in order["grids"]:
        raise UserError(
            f"{DEVICE_ORDER_ENV} rehearses {order['name']} ({order['hosts']} hosts of "
            f"{order['devices_per_host']} devices, meshes {', '.join(order['grids'])}), but this "
            f"job has {len(local)} processes of {sorted(counts)} devices and mesh {key}; "
            "rehearse a type of this job's shape or unset it")
    return np.array([local[h][k] for h, k in order["grids"][key]],
                    dtype=object).reshape(grid.shape)


def host_rows(sharding: jax.sharding.Sharding, global_batch: int) -> dict[int, Runs]:
    """For every process, the rows of the global batch its devices hold, as ascending
    [start, stop) runs. Each row must be held by one host only, and every host must hold
    global_batch / hosts of them, or the hosts could not read the batch between them."""
    held: dict[int, set[int]] = {}
    for device, index in sharding.devices_indices_map((global_batch,)).items():
        held.setdefault(device.process_index, set()).update(
            range(*index[0].indices(global_batch)))
    per_host = global_batch // len(held)
    owners = sum(len(rows) for rows in held.values())
    if owners != global_batch or any(len(rows) != per_host for rows in held.values()):
        raise UserError(f"the mesh gives the {len(held)} hosts {sorted(map(len, held.values()))} "
                        f"rows of the batch of {global_batch} ({owners} with repeats): each "
                        "row must be on one host and each host hold as many; check mesh.*")
    return {p: runs(sorted(rows)) for p, rows in sorted(held.items())}


def runs(rows: list[int]) -> Runs:
    """Ascending rows as [start, stop) runs: [0, 1, 2, 5] -> ((0, 3), (5, 6))."""
    out: list[list[int]] = []
    for r in rows:
        if out and out[-1][1] == r:
            out[-1][1] = r + 1
        else:
            out.append([r, r + 1])
    return tuple((a, b) for a, b in out)


def runs_text(row_runs: Runs) -> str:
    """Runs as inclusive ranges, as the start-up line prints them: '0-3,8-11'."""
    return ",".join(f"{a}-{b - 1}" for a, b in row_runs)


def this_host_rows(sharding: jax.sharding.Sharding, global_batch: int) -> Runs:
    return host_rows(sharding, global_batch)[jax.process_index()]
