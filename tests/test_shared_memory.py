"""Shared memory for grain's decode workers: the start-up check's one line, and the GKE pod's
memory-backed /dev/shm."""

import os

import pytest

from deploy.gke import jobset
from deploy.gke.schema import JOBSET, schema_errors
from deploy.gke.settings import GkeSettings
from deploy.settings import load_settings
from vitpod.data import shared_memory
from vitpod.errors import UserError

MIB = 1 << 20


@pytest.fixture
def shm(tmp_path, monkeypatch):
    """A stand-in /dev/shm: a folder whose statvfs says 64 MiB are free (a container's
    default), whatever the disk under it has."""
    real = os.statvfs

    def statvfs(path):
        if os.fspath(path) != str(tmp_path):
            return real(path)
        return os.statvfs_result((4096, 4096, 16384, 16384, 16384, 0, 0, 0, 0, 255))

    monkeypatch.setattr(shared_memory.os, "statvfs", statvfs)
    return str(tmp_path)


def test_batch_bytes_count_the_images_and_the_small_fields():
    assert shared_memory.batch_bytes(256, 224) == 256 * (224 * 224 * 3 + 12)


def test_workers_that_fit_pass_and_none_or_no_path_is_never_checked(shm):
    batch = shared_memory.batch_bytes(16, 224)  # 2.3 MiB: 4 x 6 + 1 batches fit in 64 MiB
    shared_memory.check(6, batch, shm)
    shared_memory.check(0, 10**12, shm)
    shared_memory.check(64, 10**12, os.path.join(shm, "absent"))


def test_too_many_workers_is_one_line_naming_the_count_that_fits(shm):
    batch = shared_memory.batch_bytes(64, 224)  # 9.2 MiB: 64 MiB holds 1 worker (5 batches)
    with pytest.raises(UserError) as e:
        shared_memory.check(16, batch, shm)
    message = str(e.value)
    assert "\n" not in message
    assert message == (
        f"{shm} has 64 MiB free, but 16 decode worker(s) hold up to 597 MiB of host batches "
        "there (4 x 16 + 1 batches of 9.2 MiB): set data.num_workers=1 or less, or give the "
        f"container a larger {shm}")


def test_a_batch_too_large_for_one_worker_names_the_batch_size(shm):
    with pytest.raises(UserError, match=r"lower batch_size \(or data.eval_batch_size\), or "
                                        r"set data.num_workers=0"):
        shared_memory.check(1, shared_memory.batch_bytes(256, 224), shm)


@pytest.mark.parametrize("tpu_type,slices", [("v4-8", 1), ("v5litepod-16", 2)])
def test_the_jobset_mounts_a_memory_backed_dev_shm(tpu_type, slices):
    doc = jobset.build(load_settings(os.devnull, {
        "NAME": "vit-run", "TPU_TYPE": tpu_type, "NUM_SLICES": str(slices),
        "WORKDIR": "gs://bkt/runs/a", "CONFIG": "configs/demo.py", "IMAGE": "img"},
        GkeSettings))
    assert schema_errors(doc, JOBSET) == []
    pod = doc["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"] == {"medium": "Memory"}
