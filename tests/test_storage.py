"""Data and workdirs on gs://, against a real GCS server (fake-gcs-server) on loopback.

Requests pass through the project's fault proxy (testkit/gcs.py), which can fail a
fraction of them (503s and dropped connections) or answer 403 for a bucket.
"""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.conftest import ROOT, assert_params_close, load_config, read_params, tiny_run
from vitpod import inference, predict, storage, train, upload
from vitpod.data import imagefolder
from vitpod.errors import UserError

pytestmark = pytest.mark.slow
DATA = "gs://vitpod-data/colors"
RUNS = "gs://vitpod-runs"


@pytest.fixture(scope="module")
def bucket_data(gcs_server, colors):
    """The colors ImageFolder copied into a bucket with `prepare upload`'s code."""
    gcs_server.create_bucket("vitpod-data")
    gcs_server.create_bucket("vitpod-runs")
    copied, skipped = upload.upload_tree(str(colors), DATA)
    assert (copied, skipped) == (64 + 37, 0)
    return DATA


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, colors):
    """The same tiny run with data and workdir on local disk: the reference."""
    return tiny_run(tmp_path_factory, colors, "local")


def gcs_config(data: str = DATA, **overrides):
    return load_config("tiny", data__train_dir=f"{data}/train", data__val_dir=f"{data}/val",
                       **overrides)


def read_rows(workdir: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(f"{workdir}/metrics.jsonl").split("\n")
            if line]


def assert_params_equal(a: dict, b: dict) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_storage_on_gcs_behaves_like_local_disk(gcs, tmp_path):
    gcs.create_bucket("vitpod-scratch")
    for root in (str(tmp_path), "gs://vitpod-scratch/t"):
        storage.write_text(storage.join(root, "a/x.txt"), "hello")
        storage.write_bytes(storage.join(root, "a/deeper/y.bin"), b"\x00\x01")
        storage.write_text(storage.join(root, "b/z.txt"), "z")
        log = storage.Appender(storage.join(root, "log.jsonl"))
        log.write("1\n")
        storage.Appender(storage.join(root, "log.jsonl")).write("2\n")  # a resumed run
        assert storage.read_text(storage.join(root, "log.jsonl")) == "1\n2\n"
        assert storage.read_text(storage.join(root, "a/x.txt")) == "hello"
        assert storage.subdirs(root) == ["a", "b"]
        assert storage.files_below(storage.join(root, "a")) == ["deeper/y.bin", "x.txt"]
        assert storage.isdir(storage.join(root, "a")) and not storage.isdir(root + "/nope")
        assert storage.exists(storage.join(root, "b/z.txt"))
        assert not storage.exists(storage.join(root, "b/none.txt"))
        with pytest.raises(storage.NotFound, match="none.txt does not exist"):
            storage.read_bytes(storage.join(root, "b/none.txt"))


def test_scan_of_a_bucket_equals_the_scan_of_the_local_copy(gcs, bucket_data, colors):
    for role in ("train", "val"):
        remote = imagefolder.scan(f"{bucket_data}/{role}", role)
        local = imagefolder.scan(str(colors / role), role)
        assert (remote.classes, remote.files, remote.labels) == (
            local.classes, local.files, local.labels)
    # The root is checked and its folders listed once; then one listing per class.
    assert gcs.faults.listed("colors/val/", exact=True) == 2
    assert all(gcs.faults.listed(f"colors/val/{c}/", exact=True) == 1 for c in "abcd")


def test_upload_copies_only_what_is_missing_or_changed(gcs, tmp_path):
    gcs.create_bucket("vitpod-upload")
    for i in range(5):
        (tmp_path / "cls" / f"{i}.png").parent.mkdir(exist_ok=True)
        (tmp_path / "cls" / f"{i}.png").write_bytes(bytes([i]) * 100)
    assert upload.upload_tree(str(tmp_path), "gs://vitpod-upload/d") == (5, 0)
    (tmp_path / "cls" / "3.png").write_bytes(b"\xff" * 100)  # same size, other bytes
    (tmp_path / "cls" / "5.png").write_bytes(b"new")
    gcs.faults.reset()
    assert upload.upload_tree(str(tmp_path), "gs://vitpod-upload/d") == (2, 4)
    assert gcs.faults.counts["write"] == 2
    assert storage.read_bytes("gs://vitpod-upload/d/cls/3.png") == b"\xff" * 100


def test_prepare_upload_command(gcs, colors):
    gcs.create_bucket("vitpod-cli")
    cmd = [sys.executable, "-m", "vitpod.prepare", "upload", f"--src={colors / 'val'}",
           "--dst=gs://vitpod-cli/val"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "copied 37, already there 0" in first.stdout
    assert "copied 0, already there 37" in again.stdout


def test_train_from_a_bucket_into_a_bucket_resumes_and_matches_local_disk(
        gcs, bucket_data, local_run):
    workdir = f"{RUNS}/one"
    paused = train.run(gcs_config(), workdir, stop_after=3)
    assert paused["stopped"] and not storage.exists(f"{workdir}/DONE")
    assert gcs.faults.listed("colors/train/a/", exact=True) == 1  # the manifest's scan
    gcs.faults.reset()
    final = train.run(gcs_config(), workdir)
    # The resumed run reads the manifest: it lists only the train folder's class folders
    # (to warn of one added since), never a class folder's files.
    assert gcs.faults.listed("colors/") == gcs.faults.listed("colors/train/", exact=True) <= 2
    local_dir, local_final = local_run
    assert final["eval/accuracy"] == local_final["eval/accuracy"]
    assert json.loads(storage.read_text(f"{workdir}/DONE"))["step"] == 6
    assert storage.exists(f"{workdir}/config.json")
    assert storage.files_below(f"{workdir}/tensorboard")  # event files of both launches
    losses = {r["step"]: r["train/loss"] for r in read_rows(workdir) if "train/loss" in r}
    local_losses = {r["step"]: r["train/loss"] for r in map(
        json.loads, open(local_dir / "metrics.jsonl")) if "train/loss" in r}
    assert losses == local_losses
    assert_params_equal(read_params(workdir, 6), read_params(local_dir, 6))
    # The tools read the bucket too: both models predict alike on the bucket's images.
    images = predict.image_files([f"{DATA}/val/a"])
    rows = predict.predict(inference.load(workdir), images, 1)
    assert len(rows) == 10 and rows == predict.predict(inference.load(str(local_dir)), images, 1)


def test_a_run_killed_mid_save_resumes_from_the_bucket(gcs, bucket_data, local_run):
    """SIGKILL right after step 4 was logged (the async save of step 3 may be half written
    in the bucket); the relaunch continues from what is committed and ends equal."""
    workdir = f"{RUNS}/killed"
    cmd = [sys.executable, "-m", "vitpod.train", "--config=configs/tiny.py",
           f"--workdir={workdir}", f"--config.data.train_dir={DATA}/train",
           f"--config.data.val_dir={DATA}/val"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "step 4/6" in line:
            proc.kill()
            break
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not storage.exists(f"{workdir}/DONE")
    resumed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_params_equal(read_params(workdir, 6), read_params(local_run[0], 6))


def test_transient_failures_on_reads_and_writes_do_not_change_the_result(
        gcs, bucket_data, local_run):
    gcs.faults.rate = 0.1  # of every request: 503 or a dropped connection
    workdir = f"{RUNS}/faulty"
    train.run(gcs_config(), workdir)
    injected = gcs.faults.counts["injected"]
    gcs.faults.rate = 0.0
    assert injected > 20, gcs.faults.counts
    assert_params_equal(read_params(workdir, 6), read_params(local_run[0], 6))


def test_two_processes_train_from_the_bucket_and_resume(gcs, bucket_data, local_run):
    workdir = f"{RUNS}/two"
    cmd = [sys.executable, "-m", "vitpod.local_hosts", "--num_processes=2",
           "--devices_per_process=4", "--", "--config=configs/tiny.py", f"--workdir={workdir}",
           f"--config.data.train_dir={DATA}/train", f"--config.data.val_dir={DATA}/val"]
    for extra in (["--stop_after=3"], []):
        result = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=300,
                                cwd=ROOT)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resuming from the checkpoint of step 3" in result.stdout + result.stderr
    assert json.loads(storage.read_text(f"{workdir}/DONE"))["eval/count"] == 37
    assert_params_close(read_params(local_run[0], 6), read_params(workdir, 6))


@pytest.mark.parametrize("where, expected", [
    ("data:gs://no-such-bucket/colors", "bucket gs://no-such-bucket does not exist"),
    ("data:gs://vitpod-data/typo", "data dir 'gs://vitpod-data/typo/train' (train) does not "
                                   "exist"),
    ("data:forbidden", "permission denied on gs://vitpod-data"),
    ("workdir:gs://no-such-bucket/run", "bucket gs://no-such-bucket does not exist"),
    ("workdir:forbidden", "permission denied on gs://vitpod-runs"),
])
def test_permanent_errors_stop_with_one_line_before_compiling(gcs, bucket_data, where,
                                                              expected):
    kind, value = where.split(":", 1)
    data, workdir = DATA, f"{RUNS}/refused"
    if value == "forbidden":
        gcs.faults.forbidden_buckets = {"vitpod-data" if kind == "data" else "vitpod-runs"}
    elif kind == "data":
        data = value
    else:
        workdir = value
    compiles = []
    listener = lambda event, *a, **k: compiles.append(event)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            train.run(gcs_config(data), workdir)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert "/jax/core/compile/backend_compile_duration" not in compiles
    if kind == "data":  # nothing recorded: the corrected command starts cleanly
        assert not storage.exists(f"{workdir}/config.json")


def test_a_missing_bucket_is_one_line_from_the_command(gcs, bucket_data):
    result = subprocess.run(
        [sys.executable, "-m", "vitpod.train", "--config=configs/tiny.py",
         "--workdir=gs://no-such-bucket/run", f"--config.data.train_dir={DATA}/train"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: bucket gs://no-such-bucket does not exist")
    assert "Traceback" not in result.stderr
