"""The multislice mesh: slices as contiguous blocks of the data axis, FSDP within a slice.
(The steps on it, with real processes: test_multihost; compiled for TPU slices: test_plan.)"""

import dataclasses

import pytest

from tests.conftest import load_config
from vitpod import config as config_lib
from vitpod import distributed, mesh
from vitpod.errors import UserError


@dataclasses.dataclass(frozen=True)
class CpuDevice:  # what device_grid reads of a CPU device: no slice_index
    id: int
    process_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"


def cpu_devices(processes: int, per_process: int) -> list:
    return [CpuDevice(p * per_process + i, p) for p in range(processes)
            for i in range(per_process)]


@pytest.mark.parametrize("data,fsdp", [(-1, 1), (2, 2), (1, -1)])
def test_each_slice_is_a_contiguous_block_of_the_data_axis(data, fsdp):
    """4 processes x 2 devices as 2 slices: processes 0-1 are slice 0, 2-3 slice 1."""
    mesh_cfg = load_config("tiny", mesh__data=data, mesh__fsdp=fsdp).mesh
    grid = mesh.device_grid(mesh_cfg, cpu_devices(4, 2), 2)
    ici = config_lib.hybrid_mesh_shapes(mesh_cfg, 8, 2)[1]
    assert grid.shape == (2 * ici[0], ici[1])
    for s in range(2):
        block = grid[s * ici[0]:(s + 1) * ici[0]]
        assert {d.process_index // 2 for d in block.flat} == {s}
    # CPU devices in process order: each host's devices are consecutive in the batch's order.
    order = [d.process_index for d in grid.flat]
    assert order == sorted(order)


def test_one_slice_mesh_shape_is_unchanged():
    mesh = load_config("tiny", mesh__data=-1, mesh__fsdp=-1).mesh
    assert config_lib.mesh_shape(mesh, 8) == (1, 8)
    assert config_lib.hybrid_mesh_shapes(mesh, 8) == ((1, 1), (1, 8))
    assert config_lib.mesh_shape(mesh, 8, 2) == (2, 4)  # FSDP stays within a slice


def test_mesh_keys_that_do_not_fit_the_slices_are_one_line():
    with pytest.raises(UserError, match=r"mesh.dcn_data=3 does not match the 2 slice\(s\)"):
        config_lib.mesh_shape(load_config("tiny", mesh__dcn_data=3).mesh, 8, 2)
    with pytest.raises(UserError, match="does not match the 4 devices of each of the 2 slices; "
                                        "make their product 4"):
        config_lib.mesh_shape(load_config("tiny", mesh__data=8).mesh, 8, 2)
    with pytest.raises(UserError, match="3 processes cannot form 2 slices"):
        mesh.device_grid(load_config("tiny").mesh, cpu_devices(3, 2), 2)


def test_the_slice_count_comes_from_the_devices_or_the_environment(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class TpuDevice:
        slice_index: int

    monkeypatch.delenv(mesh.NUM_SLICES_ENV, raising=False)
    assert mesh.num_slices([TpuDevice(0), TpuDevice(1), TpuDevice(1)]) == 2
    assert mesh.num_slices([TpuDevice(0), TpuDevice(0)]) == 1
    assert mesh.num_slices(cpu_devices(2, 2)) == 1
    monkeypatch.setenv(mesh.NUM_SLICES_ENV, "2")
    assert mesh.num_slices(cpu_devices(2, 2)) == 2
    # CPU devices under jax.distributed carry slice_index 0: the environment decides.
    assert mesh.num_slices([TpuDevice(0), TpuDevice(0)]) == 2
    monkeypatch.setenv(mesh.NUM_SLICES_ENV, "two")
    with pytest.raises(UserError, match="MEGASCALE_NUM_SLICES='two'"):
        mesh.num_slices(cpu_devices(2, 2))


def test_batch_divisibility_counts_every_slice():
    config = load_config("tiny", batch_size=12, data__train_dir="x")
    with pytest.raises(UserError, match="batch_size=12 is not divisible by the 8 devices"):
        config_lib.validate(config, 8, 4, 2)
    config_lib.validate(load_config("tiny", batch_size=16, data__train_dir="x"), 8, 4, 2)


@pytest.mark.parametrize("slices,slice_id,worker", [(1, 0, 1), (2, 1, 0), (4, 3, 1)])
def test_the_rehearsal_derives_the_job_as_jax_does_from_tpu_metadata(monkeypatch, slices,
                                                                    slice_id, worker):
    """The rehearsal's stand-ins for the metadata server give what JAX's own Cloud TPU
    detection computes from the same values (worker list and index in the slice, MEGASCALE_*,
    JAX_COORDINATOR_PORT)."""
    from jax._src.clusters import cloud_tpu_cluster

    from vitpod import protocol

    env = {**protocol.sim_metadata_env("10.0.0.7", 2, worker),
           protocol.COORDINATOR_PORT_ENV: "8476"}
    # One slice: the runtime sets no MEGASCALE_* value (empty here, so that JAX does not ask
    # the metadata server for them).
    env.update(protocol.slices_env(slices, slice_id, "10.0.0.2") if slices > 1 else
               dict.fromkeys(protocol.slices_env(1, 0, ""), ""))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    jax_tpu = cloud_tpu_cluster.GceTpuCluster
    monkeypatch.setattr(jax_tpu, "_get_process_id_in_slice", staticmethod(lambda: worker))
    monkeypatch.setattr(jax_tpu, "_get_worker_list_in_slice",
                        staticmethod(lambda: ["10.0.0.7", "10.0.0.8"]))
    monkeypatch.setattr(jax_tpu, "wait_for_coordinator", classmethod(lambda *a: None))
    expected = (jax_tpu.get_coordinator_address(None, "8476"), jax_tpu.get_process_count(),
                jax_tpu.get_process_id())
    assert distributed.rehearsed_cluster(env) == expected
    assert expected[2] == worker + 2 * slice_id  # not the same by accident


def test_a_bad_init_timeout_is_one_line():
    assert distributed.init_timeout({}) == 300  # JAX's own default
    assert distributed.init_timeout({"VITPOD_INIT_TIMEOUT": "1800"}) == 1800
    with pytest.raises(UserError, match="VITPOD_INIT_TIMEOUT='soon'.*INIT_TIMEOUT"):
        distributed.init_timeout({"VITPOD_INIT_TIMEOUT": "soon"})
