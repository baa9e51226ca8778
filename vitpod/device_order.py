"""A TPU type's device order, for a CPU rehearsal to build its mesh in (vitpod/mesh.py).

    python -m vitpod.device_order --topology=v4:2x2x2 [--num_slices=2]

Prints one JSON object: for every mesh shape (data x fsdp) a job of that type can have, the
host and local chip of each mesh position, as vitpod's own mesh places libtpu's description of
the type's chips. A rehearsal's launcher runs it once, in its own process (libtpu is loaded
there only), and passes the result to its trainers in DEVICE_ORDER_ENV.
"""

import json
import os
import subprocess
import sys

from absl import flags

from vitpod import cli
from vitpod.errors import UserError


def define_flags() -> None:
    flags.DEFINE_string("topology", None, "TPU topology, e.g. v4:2x2x2 (a v4-16), v5e:4x4.")
    flags.DEFINE_integer("num_slices", 1, "Slices of the topology (multislice).")


def tpu_order(topology: str, num_slices: int = 1) -> dict:
    """{name, hosts, devices_per_host, grids: {"DxF": [[host, k], ...]}}: where each mesh
    position's chip lives, k counting a host's chips by id."""
    from vitpod import config as config_lib
    from vitpod import mesh
    from vitpod.planning.compile import tpu_devices

    devices = tpu_devices(topology, num_slices)
    local: dict[int, list[int]] = {}
    for d in sorted(devices, key=lambda d: d.id):
        local.setdefault(d.process_index, []).append(d.id)
    per_slice = len(devices) // num_slices
    grids = {}
    for fsdp in (f for f in range(1, per_slice + 1) if per_slice % f == 0):
        mesh_cfg = config_lib.defaults().mesh
        mesh_cfg.fsdp = fsdp
        grid = mesh.device_grid(mesh_cfg, devices, num_slices)
        grids["x".join(map(str, grid.shape))] = [
            [d.process_index, local[d.process_index].index(d.id)] for d in grid.flat]
    name = topology if num_slices == 1 else f"{num_slices}x{topology}"
    return {"name": name, "hosts": len(local), "devices_per_host": len(devices) // len(local),
            "grids": grids}


def computed(topology: str, num_slices: int = 1) -> str:
    """tpu_order's JSON, from a process of its own: a launcher keeps libtpu (and the TPU
    settings it needs to load on a machine without TPUs) out of itself and its trainers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "MEGASCALE_"))}
    done = subprocess.run([sys.executable, "-m", "vitpod.device_order", f"--topology={topology}",
                           f"--num_slices={num_slices}"], capture_output=True, text=True,
                          env={**env, "JAX_PLATFORMS": "cpu"}, timeout=300)
    if done.returncode:
        lines = done.stderr.strip().splitlines() or [f"exit {done.returncode}"]
        raise UserError(f"the device order of {num_slices} x {topology}: {lines[-1]}")
    return done.stdout.strip().splitlines()[-1]


def main(argv) -> None:
    if not flags.FLAGS.topology:
        raise UserError("pass --topology=GEN:AxB[xC], e.g. v4:2x2x2 (a v4-16)")
    print(json.dumps(tpu_order(flags.FLAGS.topology, flags.FLAGS.num_slices)))


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # describe the TPU, run nothing
    define_flags()
    cli.run(main)
