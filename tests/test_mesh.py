"""The mesh and each host's rows of the batch on every TPU type deploy knows, as libtpu
describes its chips (not the CPU's process order), and the rehearsal's reordering of CPU
devices into a type's order."""

import json

import jax
import numpy as np
import pytest

from deploy import tpu_types as tpus
from tests.conftest import load_config
from vitpod import device_order, mesh, steps
from vitpod.errors import UserError

pytest.importorskip("libtpu", reason="libtpu describes the chips: install the tpu extra")


def _jobs():
    """(type, slices) for every type of the table, and 2 and 4 slices of the multi-host ones
    (a one-chip v6e-1 is one host: libtpu has no description of it to check)."""
    for name, tpu in tpus.known_types().items():
        if tpu.chips == 1:
            continue
        yield name, 1
        if tpu.vms_per_slice > 1:
            yield name, 2
            yield name, 4


def _check_rows(grid: np.ndarray, batch: int) -> dict:
    """The rows each host reads; asserts every row is read by exactly the host whose device
    holds it, and that each host reads batch / hosts rows."""
    m = jax.sharding.Mesh(grid, mesh.BATCH_AXES)
    sharding = steps.batch_sharding(m)
    rows = mesh.host_rows(sharding, batch)
    reader = np.full(batch, -1)
    for p, runs in rows.items():
        for a, b in runs:
            assert (reader[a:b] == -1).all()  # no row is read by two hosts
            reader[a:b] = p
    for device, index in sharding.devices_indices_map((batch,)).items():
        assert (reader[index[0]] == device.process_index).all()  # its host reads its rows
    assert (reader >= 0).all()
    assert set(np.bincount(reader)) == {batch // len(rows)}
    return rows


def test_every_type_and_slice_count_starts_in_its_chips_order():
    from vitpod.planning.compile import tpu_devices

    refused, interleaved, jobs = [], 0, list(_jobs())
    for name, slices in jobs:
        devices = tpu_devices(tpus.libtpu_topology(name), slices)
        for fsdp in (1, -1) if len(devices) <= 1024 else (1,):  # FSDP: the smaller jobs
            cfg = load_config("tiny", mesh__fsdp=fsdp, mesh__data=-1).mesh
            try:
                grid = mesh.device_grid(cfg, devices, slices)
                rows = _check_rows(grid, 2 * len(devices))
            except (UserError, ValueError) as e:
                refused.append(f"{slices} x {name} fsdp={fsdp}: {e}")
                continue
            interleaved += any(len(runs) > 1 for runs in rows.values())
    assert refused == []
    assert len(jobs) > 150 and interleaved > 100  # rows are not one block per host


@pytest.mark.parametrize("topology,slices,host0", [
    ("v4:2x2x2", 1, "0-1,4-5,8-9,12-13"),  # a v4-16: its hosts alternate
    ("v5e:4x4", 1, "0-3,12-13,30-31"),  # a v5e-16
    ("v4:2x2x2", 2, "0-1,4-5,8-9,12-13"),  # 2 x v4-16 on the hybrid mesh
])
def test_the_rehearsal_orders_cpu_devices_as_the_types_chips(monkeypatch, topology, slices,
                                                             host0):
    """The order computed from libtpu's description, applied to stand-in CPU devices of the
    right number of processes, gives each process the rows the TPU host of its index has."""
    from vitpod.planning.compile import tpu_devices

    order = json.loads(device_order.computed(topology, slices))
    chips = tpu_devices(topology, slices)
    batch = 2 * len(chips)
    tpu_rows = _check_rows(mesh.device_grid(load_config("tiny").mesh, chips, slices), batch)
    hosts, per_host = order["hosts"], order["devices_per_host"]
    cpu = [FakeCpu(p * per_host + k, p) for p in range(hosts) for k in range(per_host)]
    monkeypatch.setenv(mesh.NUM_SLICES_ENV, str(slices))
    grid = mesh.rehearsed_grid(np.array(cpu, dtype=object).reshape(-1, 1), json.dumps(order))
    cpu_rows = {p: _runs_of(grid, p, batch) for p in range(hosts)}
    assert cpu_rows == {p: tuple(r) for p, r in tpu_rows.items()}
    assert mesh.runs_text(cpu_rows[0]) == host0


class FakeCpu:
    """What the rehearsal reads of a CPU device: its id and process."""

    platform = "cpu"

    def __init__(self, id_: int, process_index: int):
        self.id, self.process_index = id_, process_index


def _runs_of(grid, process: int, batch: int):
    per_device = batch // grid.size
    rows = [i * per_device + r for i, d in enumerate(grid.flat) if d.process_index == process
            for r in range(per_device)]
    return mesh.runs(sorted(rows))


def test_an_order_for_another_shape_of_job_is_one_line():
    order = json.dumps({"name": "v4:2x2x2", "hosts": 2, "devices_per_host": 4,
                        "grids": {"8x1": [[0, 0]] * 8}})
    cpu = np.array([FakeCpu(i, 0) for i in range(8)], dtype=object).reshape(8, 1)
    with pytest.raises(UserError, match="rehearses v4:2x2x2 .2 hosts of 4 devices.*this job "
                                        "has 1 processes of .8. devices"):
        mesh.rehearsed_grid(cpu, order)


def test_runs_and_their_text():
    assert mesh.runs([0, 1, 2, 5, 7, 8]) == ((0, 3), (5, 6), (7, 9))
    assert mesh.runs_text(((0, 4), (8, 12))) == "0-3,8-11"


@pytest.mark.parametrize("topology,slices", [("v4:2x2x2", 1), ("v5e:4x4", 1), ("v5:2x2x2", 1),
                                             ("v6e:4x4", 1), ("v4:2x2x2", 2)])
def test_the_tiny_step_compiles_for_one_type_per_generation_and_a_multislice_job(
        topology, slices):
    """The launch's start-up (mesh, rows, state shardings) and the train step, compiled for
    the chips in their order."""
    from vitpod import model, optim
    from vitpod.planning import startup
    from vitpod.planning.compile import tpu_devices

    config = load_config("tiny", batch_size=64, data__train_dir="unread")
    start = startup.check(config, tpu_devices(topology, slices), num_classes=10)
    assert any(len(runs) > 1 for runs in start.host_rows.values())
    tx = optim.make(config.optim, config.total_steps)
    graphdef, _ = model.abstract_model(config.model, config.data.image_size, 10)
    rows = steps.batch_sharding(start.mesh)
    size = config.data.image_size
    batch = {"image": jax.ShapeDtypeStruct((64, size, size, 3), np.uint8, sharding=rows),
             "label": jax.ShapeDtypeStruct((64,), np.int32, sharding=rows),
             "valid": jax.ShapeDtypeStruct((64,), np.float32, sharding=rows)}
    step = steps.make_train_step(graphdef, tx, start.mesh, config, pack=False)
    assert step.lower(start.state, batch).compile().cost_analysis()
