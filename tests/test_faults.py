"""Faults, not bad input: what breaks under a run (storage, checkpoints, a second trainer,
hostile data, damaged workdir files), the one line each gives and the state it leaves.

Beside the bad-input table (tests/test_errors.py). Rows of the table run `train` in this
process with a fault injected into a copy of a run stopped at step 4 of 6 (checkpoints 2 and
4), and check the whole line, the exit code, and that the workdir is exactly as it was: no
checkpoint moved or deleted, no step logged twice, no DONE. The other tests train, kill,
resume and compare; every subprocess has a timeout, so a hang is a failure.
"""

import contextlib
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from tests.conftest import (
    ROOT,
    assert_params_close,
    load_config,
    make_imagefolder,
    read_losses,
    read_params,
    run_entrypoint,
    write_lease,
)
from vitpod import checkpoint, storage, train, upload
from vitpod.data import imagefolder, packed, packing, pipeline

STEPS = 6
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
       "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def _config(data, **overrides):
    return load_config("tiny", data__train_dir=str(data / "train"), save_every=2, **overrides)


def _flags(workdir, data, *extra):
    return [f"--config={ROOT}/configs/tiny.py", f"--workdir={workdir}",
            f"--config.data.train_dir={data / 'train'}", "--config.save_every=2", *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, colors):
    workdir = tmp_path_factory.mktemp("reference")
    train.run(_config(colors), str(workdir))
    return workdir


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, colors):
    """A run stopped at step 4 of 6: checkpoints 2 and 4, steps 1-4 logged."""
    workdir = tmp_path_factory.mktemp("stopped")
    train.run(_config(colors), str(workdir), stop_after=4)
    return workdir


@pytest.fixture
def copy(stopped, tmp_path):
    shutil.copytree(stopped, tmp_path / "run")
    return tmp_path / "run"


def _snapshot(root: pathlib.Path) -> dict:
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


def _logged_steps(workdir) -> list[int]:
    return [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")
            if "train/loss" in line and line.endswith("}\n")]


@contextlib.contextmanager
def _failing_restores(times: int):
    """The first `times` checkpoint restores of this process raise an I/O error."""
    original, calls = ocp.StandardCheckpointHandler.restore, [0]

    def failing(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] <= times:
            raise OSError(5, "injected I/O error")
        return original(self, *args, **kwargs)

    saved_backoff = getattr(checkpoint, "RESTORE_BACKOFF_SECONDS", 0)
    ocp.StandardCheckpointHandler.restore, checkpoint.RESTORE_BACKOFF_SECONDS = failing, 0.01
    try:
        yield calls
    finally:
        ocp.StandardCheckpointHandler.restore = original
        checkpoint.RESTORE_BACKOFF_SECONDS = saved_backoff


def _empty(*names):
    def damage(w):
        for name in names:
            for path in w.glob(name):
                path.write_bytes(b"")
    return damage


def _record(w) -> str:
    return str(next(w.glob("launches/*/record.json")))


JSON = "JSONDecodeError: Expecting value: line 1 column 1 (char 0)"
BROKEN_CONFIG = "from vitpod.config import defaults\n\n\nc = undefined_name\n"

# (id, damage to the stopped run's copy, extra flags, restores that fail, the whole line; {w}
# is the workdir, {record} its launch record, {config} a config file raising NameError)
ROWS = [
    ("empty-config-json", _empty("config.json"), [], 0,
     f"error: {{w}}/config.json is damaged ({JSON}); delete it and relaunch with the run's "
     "own flags: it is written again from them (a different config then goes unnoticed)"),
    ("empty-manifest", _empty("manifest.json"), [], 0,
     f"error: {{w}}/manifest.json is damaged ({JSON}); delete it and relaunch to scan the "
     "data again (files added or removed since then change the batches)"),
    ("empty-launch-record", _empty("launches/*/record.json"), [], 0,
     f"error: {{record}} is damaged ({JSON}); delete that launch's folder (the goodput "
     "report then leaves it out) and relaunch"),
    ("empty-done", lambda w: (w / "DONE").write_bytes(b""), [], 0,
     f"error: {{w}}/DONE is damaged ({JSON}); delete it and relaunch: the run resumes from "
     "its last checkpoint and writes DONE again"),
    ("every-restore-fails", None, [], 99,
     "error: checkpoint {w}/checkpoints/4 did not restore on process(es) [0] after 3 tries "
     "(OSError: [Errno 5] injected I/O error); no checkpoint was moved or deleted: relaunch "
     "once the cause is fixed"),
    ("every-checkpoint-damaged", _empty("checkpoints/*/default/_METADATA"), [], 0,
     f"error: no checkpoint in {{w}}/checkpoints restores: 4, 2 damaged ({JSON}); none was "
     "moved or deleted. Put back good copies, or move them out of that folder to train again "
     "from step 0"),
    ("stop-after-below-the-resumed-step", None, ["--stop_after=2"], 0,
     "nothing to train: the run is at step 4 of 6, not before --stop_after=2; drop it or "
     "pass a later step"),
    ("config-raises-name-error", None, ["--config={config}"], 0,
     "error: cannot load the --config file {config}: line 4: NameError: name "
     "'undefined_name' is not defined"),
]


@pytest.mark.parametrize("damage,extra,failing,expected", [r[1:] for r in ROWS],
                         ids=[r[0] for r in ROWS])
def test_a_fault_is_one_line_and_leaves_the_workdir_as_it_was(copy, colors, damage, extra,
                                                               failing, expected):
    (copy.parent / "broken.py").write_text(BROKEN_CONFIG)
    if damage:
        damage(copy)
    values = {"{w}": str(copy), "{record}": _record(copy),
              "{config}": str(copy.parent / "broken.py")}

    def fill(text: str) -> str:
        for key, value in values.items():
            text = text.replace(key, value)
        return text

    argv = [fill(a) for a in _flags(copy, colors, *extra)]
    if sum(a.startswith("--config=") for a in argv) > 1:
        argv = argv[1:]  # the row's own config file instead of tiny.py
    before = _snapshot(copy)
    with _failing_restores(failing):
        code, out, err = run_entrypoint("train", argv)
    expected = fill(expected)
    assert "Traceback" not in err, err[-3000:]
    if expected.startswith("error: "):
        assert code == 2, err[-3000:]
        assert [line for line in err.splitlines() if line.startswith("error:")] == [expected]
    else:
        assert code == 0 and out.strip().splitlines()[-1] == expected, err[-3000:]
    assert _snapshot(copy) == before  # nothing moved, nothing logged, no DONE, no lease left


def test_a_restore_error_is_retried_and_the_run_resumes_from_its_newest_checkpoint(
        copy, colors, reference, caplog):
    with _failing_restores(1) as calls:
        train.run(_config(colors), str(copy))
    assert calls[0] == 2
    assert any(re.fullmatch(r"restoring checkpoint .*/checkpoints/4 failed \(OSError: \[Errno 5"
                            r"\] injected I/O error\); trying again in 0.01 s \(try 2 of 3\)",
                            r.getMessage()) for r in caplog.records)
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["2", "4", "6"]
    assert _logged_steps(copy) == list(range(1, STEPS + 1))  # resumed at 4: none twice
    assert read_losses(copy) == pytest.approx(read_losses(reference), rel=1e-5)
    assert_params_close(read_params(reference, STEPS), read_params(copy, STEPS))


def _launch(workdir, data, fault: str, timeout=200):
    cmd = [sys.executable, "-m", "vitpod.local_hosts", "--num_processes=2",
           "--devices_per_process=4", "--module=tests.faulty_train", "--",
           *_flags(workdir, data)]
    started = time.monotonic()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env={**ENV, "VITPOD_TEST_RESTORE_FAULT": fault})
    return result, time.monotonic() - started


@pytest.mark.parametrize("tries", [1, 99], ids=["once", "always"])
def test_a_restore_error_on_one_process_of_two_is_decided_by_both(copy, colors, reference,
                                                                  tries):
    """Process 1's restores fail (once: its retry passes; always: it gives up); process 0's
    pass. Both learn one verdict: resume together, or stop together with one line each,
    nothing moved aside, within the deadline."""
    before = _snapshot(copy / "checkpoints")
    result, seconds = _launch(copy, colors, f"1:{tries}", timeout=400)
    out = result.stdout + result.stderr
    # Stopping together is quick (no process waits in a collective for one that left);
    # resuming trains on, compiles included, which a loaded machine may take minutes for.
    assert tries == 1 or seconds < 150, out[-3000:]
    if tries == 1:
        assert result.returncode == 0, out[-3000:]
        assert "[p1] " in out and "(try 2 of 3)" in out
        assert _logged_steps(copy) == list(range(1, STEPS + 1))
        assert_params_close(read_params(reference, STEPS), read_params(copy, STEPS))
        return
    assert result.returncode != 0
    why = {0: "the log of process 1 says why", 1: "OSError: [Errno 5] injected I/O error"}
    for p in (0, 1):
        assert (f"[p{p}] error: checkpoint {copy}/checkpoints/4 did not restore on process(es) "
                f"[1] after 3 tries ({why[p]}); no checkpoint was moved or deleted: relaunch "
                "once the cause is fixed") in out, out[-3000:]
    assert "Traceback" not in out and "mismatch" not in out
    assert _snapshot(copy / "checkpoints") == before
    assert _logged_steps(copy) == [1, 2, 3, 4] and not (copy / "DONE").exists()


def test_a_two_process_run_on_a_workdir_in_use_is_refused_on_both(copy, colors):
    """Process 0 finds the lease held (by this live test process) and refuses; process 1
    learns it from the broadcast: both exit with one line, nothing hangs or is written."""
    (copy / "lease.json").write_text(json.dumps({
        "launch": "holder", "host": socket.gethostname(), "pid": os.getpid(),
        "heartbeat": time.time() + 30}))  # fresh for the job's start-up
    before = _snapshot(copy)
    result, seconds = _launch(copy, colors, "0:0")
    out = result.stdout + result.stderr
    assert result.returncode != 0 and seconds < 120 and "Traceback" not in out, out[-3000:]
    assert re.search(rf"\[p0\] error: workdir {re.escape(str(copy))} is in use by launch "
                     rf"holder on host \S+ \(pid {os.getpid()}\), whose heartbeat is \d+ s old",
                     out), out[-3000:]
    assert "[p1] error: process 0 failed to take the workdir's lease; its log says why" in out
    assert _snapshot(copy) == before


def test_a_second_trainer_on_the_workdir_is_refused_and_the_first_keeps_going(colors,
                                                                               tmp_path):
    first = subprocess.Popen(
        [sys.executable, "-m", "vitpod.train",
         *_flags(tmp_path, colors, "--config.total_steps=100000")], cwd=ROOT, text=True,
        env={**ENV, "VITPOD_LAUNCH_ID": "first"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    lines = []
    try:
        deadline = time.monotonic() + 150
        for line in first.stdout:
            if "step 3/" in line:
                break
            assert time.monotonic() < deadline, "the first run never trained"
        drain = threading.Thread(target=lambda: lines.extend(first.stdout), daemon=True)
        drain.start()  # the first run logs every step: never let its pipe fill up
        second = subprocess.run(
            [sys.executable, "-m", "vitpod.train",
             *_flags(tmp_path, colors, "--config.total_steps=100000")], cwd=ROOT, text=True,
            env=ENV, capture_output=True, timeout=150)
        assert second.returncode == 2, second.stderr[-3000:]
        assert re.fullmatch(
            rf"error: workdir {re.escape(str(tmp_path))} is in use by launch first on host "
            rf"{re.escape(socket.gethostname())} \(pid {first.pid}\), whose heartbeat is \d+ s "
            r"old; wait for that run to end or stop it, or use another --workdir \(a lease "
            r"unrefreshed for lease_timeout_minutes is taken over\)",
            second.stderr.strip().splitlines()[-1]), second.stderr[-3000:]
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
        drain.join(timeout=30)
    finally:
        first.kill()
    out = "".join(lines)
    assert first.returncode == 0 and "preempted at step" in out, out[-3000:]
    saved = int(re.search(r"preempted at step (\d+)", out).group(1))
    steps = _logged_steps(tmp_path)
    assert steps == list(range(1, saved + 1))  # one trainer logged each step, once
    assert (tmp_path / "checkpoints" / str(saved)).is_dir()
    assert not (tmp_path / "lease.json").exists()  # released at its clean exit


def _bomb_png(path: pathlib.Path, width: int, height: int) -> None:
    """A valid 1-bit PNG of width x height zeros: a few KB that decode to width*height
    bytes (and 3x that as RGB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))

    rows = b"".join(b"\0" + bytes((width + 7) // 8) for _ in range(height))
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_a_skipped_row_named_once(colors, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(colors / "train", data / "train")
    (data / "train" / "a" / "img000.png").unlink()
    bomb = data / "train" / "a" / "bomb.png"
    _bomb_png(bomb, 10_000, 9_000)  # 90 M pixels: over Pillow's default 89.5 M
    assert bomb.stat().st_size < 20_000 and Image.open(bomb).size == (10_000, 9_000)
    final = train.run(_config(data), str(tmp_path / "run"))
    split = imagefolder.scan(str(data / "train"))
    index = split.files.index("a/bomb.png")
    order = grain.MapDataset.range(64).shuffle(seed=0).repeat(2)  # the run's first 2 epochs
    assert final["train/skipped"] == sum(order[p] == index for p in range(STEPS * 16)) >= 1
    warnings = [r.getMessage() for r in caplog.records if "skipped unreadable image" in
                r.getMessage()]
    assert warnings == [f"skipped unreadable image {bomb} (corrupt, truncated, empty, or over "
                        "data.max_image_pixels)"]
    example = pipeline.TrainExample(split, None, 8, (0.5, 1.0), (0.75, 1.33), False)
    row = example.decode(index, bomb.read_bytes(), np.random.default_rng(0))
    assert row["valid"] == 0 and row["image"].sum() == 0  # masked, the same every time


def _scan(root: pathlib.Path) -> tuple[int, str]:
    """(exit code, stderr) of a scan of `root` in a fresh process, within a deadline."""
    code = ("from absl import logging; logging.set_verbosity('info'); "
            f"from vitpod.data import imagefolder; imagefolder.scan({str(root)!r})")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    return result.returncode, result.stderr


def test_link_loops_and_self_links_list_each_file_once_and_end(tmp_path):
    root = make_imagefolder(tmp_path / "train", {"a": 20})
    os.symlink("..", root / "a" / "up")  # the root again: the loop that gave 821 examples
    os.symlink(".", root / "a" / "here")
    os.symlink("self1", root / "a" / "self1")  # two self-links: a scan that never ended
    os.symlink("self2", root / "a" / "self2")
    (tmp_path / "outside").mkdir()
    shutil.copy(root / "a" / "img000.png", tmp_path / "outside" / "x.png")
    os.symlink(tmp_path / "outside", root / "a" / "linked")  # out of the tree: followed
    os.symlink(tmp_path / "outside", root / "a" / "again")  # the same folder: once
    code, err = _scan(root)
    assert code == 0, err[-3000:]
    assert re.search(rf"listed {root} \(train\): 21 files in 1 classes in [\d.]+ s", err)
    assert (f"data dir {root}: did not follow 5 link(s) leading back into it or above it, to "
            "a folder already listed, or nowhere: a/here, a/linked, a/self1, a/self2, a/up"
            ) in err
    split = imagefolder.scan(str(root))
    assert "a/again/x.png" in split.files and len(split.files) == len(set(split.files)) == 21


def test_upload_leaves_out_hidden_files_and_links_back_into_the_tree(gcs, tmp_path, caplog):
    gcs.create_bucket("vitpod-upload")
    root = make_imagefolder(tmp_path / "data", {"a": 2})
    (root / ".env").write_text("SECRET=1")
    (root / "a" / ".DS_Store").write_text("x")
    os.symlink(tmp_path, root / "a" / "home")  # an ancestor: the whole tree again, and more
    copied, skipped = upload.upload_tree(str(root), "gs://vitpod-upload/data")
    assert (copied, skipped) == (2, 0)
    assert storage.files_below("gs://vitpod-upload/data") == ["a/img000.png", "a/img001.png"]
    assert ("upload: left out 3 hidden file(s) or link(s) back into "
            f"{root} or above it: .env, a/.DS_Store, a/home") in caplog.text


def test_prepare_hf_refuses_class_names_that_are_not_plain_folder_names(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=["cat", ".."])})
    pixels = Image.fromarray(np.zeros((4, 4, 3), np.uint8))
    datasets.Dataset.from_dict({"image": [pixels, pixels], "label": [0, 1]},
                               features=features).save_to_disk(str(tmp_path / "hf"))
    code, _, err = run_entrypoint("prepare", ["hf", f"--dataset={tmp_path / 'hf'}",
                                    f"--out={tmp_path / 'out'}"])
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"error: dataset '{tmp_path / 'hf'}' has class name '..', not a plain folder name "
        "(empty, '.' or '..', leading '.', or a '/' or '\\' in it); rename its classes first "
        "(datasets' ClassLabel names)")
    assert not (tmp_path / "out").exists()


def test_a_cut_short_metrics_line_is_skipped_and_the_run_finishes(copy, colors, reference,
                                                                  caplog):
    with open(copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/lo')  # killed mid-write
    train.run(_config(colors), str(copy))
    assert f"{copy}/metrics.jsonl: skipped 1 unreadable line(s) (cut short by a crash)" in \
        caplog.text
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    assert lines[4] == '{"step": 5, "train/lo'  # kept as it was, the next row on its own line
    assert _logged_steps(copy) == list(range(1, STEPS + 1))
    assert (copy / "DONE").exists()
    assert_params_close(read_params(reference, STEPS), read_params(copy, STEPS))


def test_a_truncated_shard_is_named_and_a_pack_rerun_writes_it_again(colors, tmp_path,
                                                                     caplog):
    dst = tmp_path / "packed"
    packing.pack(str(colors / "train"), str(dst), shard_mb=0.002)  # 2 shards of 32
    shard = dst / "shard-00000-of-00002.arrayrecord"
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])  # a copy cut short
    code, _, err = run_entrypoint("train", _flags(tmp_path / "run", tmp_path / "x")[:2] + [
        f"--config.data.train_dir={dst}"])
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"error: packed shard {shard} holds 0 records, not 32: it was cut short (an "
        "interrupted copy?); rerun the same `python -m vitpod.prepare pack` to write it again")
    counts = packing.pack(str(colors / "train"), str(dst), shard_mb=0.002)
    assert counts == {"images": 64, "shards": 2, "already there": 1}
    assert f"{dst}: 1 shard(s) cut short, written again: {shard.name} (0 of 32)" in caplog.text
    assert packed.count_records(str(shard)) == 32


def test_a_pack_into_a_bucket_leaves_no_temporary_folders(gcs, colors, tmp_path,
                                                         monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp" / "vitpod-pack-999999999-x").mkdir(parents=True)  # a killed pack's
    gcs.create_bucket("vitpod-pack")

    def lost(local_path, path):
        assert os.path.getsize(local_path) > 0  # the shard was written, then
        raise ConnectionError("connection lost mid-upload")

    monkeypatch.setattr(storage, "upload_file", lost)
    with pytest.raises(ConnectionError):
        packing.pack(str(colors / "train"), "gs://vitpod-pack/p", shard_mb=0.002)
    assert os.listdir(tmp_path / "tmp") == []
    monkeypatch.undo()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    assert packing.pack(str(colors / "train"), "gs://vitpod-pack/p", shard_mb=0.002) == {
        "images": 64, "shards": 2, "already there": 0}
    assert os.listdir(tmp_path / "tmp") == []


def _unshare(script: str, timeout=150) -> subprocess.CompletedProcess:
    """`script` in a private mount namespace (mounts seen by nobody else), as any user."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-Urm", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare -Urm (user and mount namespaces)")
    return subprocess.run(["unshare", "-Urm", "sh", "-c", script], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def test_a_read_only_workdir_is_one_line_and_leaves_nothing(copy, colors):
    before = _snapshot(copy)
    command = " ".join([sys.executable, "-m", "vitpod.train", *_flags(copy, colors)])
    result = _unshare(f"mount --bind {copy} {copy} && mount -o remount,ro,bind {copy} && "
                      f"{command}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: cannot write {copy}/lease.json: Read-only file system (EROFS); free space on "
        "that disk or make it writable, then relaunch (a run resumes from its last checkpoint)")
    assert _snapshot(copy) == before


def test_a_full_disk_is_one_line_and_leaves_no_temporary_files(colors, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    command = " ".join([sys.executable, "-m", "vitpod.train", *_flags(disk / "run", colors)])
    result = _unshare(f"mount -t tmpfs -o size=200k tmpfs {disk} && {command}; code=$?; "
                      f"find {disk} -name '*.tmp[0-9]*'; exit $code")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.fullmatch(rf"error: cannot write (a file in )?{disk}/run\S*: No space left on device "
                        r"\(ENOSPC\); free space on that disk or make it writable, then "
                        r"relaunch \(a run resumes from its last checkpoint\)", lines[-1])
    assert len(result.stderr.splitlines()) < 40 and result.stdout == ""  # no temporaries


# Nothing lost, round two: checkpoints, restarts, the lease

KEEP = ("error: config keep_checkpoints must be >= 1 (the newest checkpoint is always kept: 1 "
        "keeps only it)")

ROUND_TWO = [
    ("keep-no-checkpoint", None, ["--config.keep_checkpoints=0"], 0, KEEP),
    ("keep-minus-one", None, ["--config.keep_checkpoints=-1"], 0, KEEP),
    ("checkpoints-deleted", lambda w: shutil.rmtree(w / "checkpoints"), [], 0,
     "error: {w}/checkpoints holds no checkpoint, but the launch records in {w}/launches show "
     "this run saved one at step 4: it was deleted or moved. Put it back to continue from "
     "step 4, or pass --start_over to train again from step 0"),
    ("done-not-a-record", lambda w: (w / "DONE").write_text("{}"), [], 0,
     'error: {w}/DONE is damaged (not what vitpod writes there: "step" is missing); delete it '
     "and relaunch: the run resumes from its last checkpoint and writes DONE again"),
]


@pytest.mark.parametrize("damage,extra,failing,expected", [r[1:] for r in ROUND_TWO],
                         ids=[r[0] for r in ROUND_TWO])
def test_round_two_faults_are_one_line_and_leave_the_workdir_as_it_was(copy, colors, damage,
                                                                      extra, failing, expected):
    test_a_fault_is_one_line_and_leaves_the_workdir_as_it_was(copy, colors, damage, extra,
                                                              failing, expected)


def test_start_over_trains_again_from_step_0_when_the_checkpoints_are_gone(copy, colors,
                                                                          reference):
    shutil.rmtree(copy / "checkpoints")
    code, out, err = run_entrypoint("train", _flags(copy, colors, "--start_over"))
    assert code == 0 and "Traceback" not in err, err[-3000:]
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["2", "4", "6"]
    assert (copy / "DONE").exists()
    assert read_losses(copy) == pytest.approx(read_losses(reference), rel=1e-5)
    assert_params_close(read_params(reference, STEPS), read_params(copy, STEPS))


def _file_permissions_apply() -> list[str]:
    """A command prefix under which file permissions hold for this user: root reads any file,
    so as root the capabilities that let it are dropped."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv to drop root's file capabilities")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def test_an_unreadable_checkpoint_is_not_damaged_it_stops_in_one_line(copy, colors):
    """orbax reads a folder it may not open as a missing one: that must not count as damage
    (moved aside, the run resumed from the one before)."""
    prefix = _file_permissions_apply()
    before = _snapshot(copy)
    (copy / "checkpoints" / "4").chmod(0)
    try:
        result = subprocess.run([*prefix, sys.executable, "-m", "vitpod.train",
                                 *_flags(copy, colors)], cwd=ROOT, env=ENV, text=True,
                                capture_output=True, timeout=300)
    finally:
        (copy / "checkpoints" / "4").chmod(0o755)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: checkpoint {copy}/checkpoints/4 did not restore on process(es) [0] after 3 "
        f"tries (PermissionError: [Errno 13] Permission denied: '{copy}/checkpoints/4'); no "
        "checkpoint was moved or deleted: relaunch once the cause is fixed")
    assert _snapshot(copy) == before


def test_a_heartbeat_ahead_of_the_clock_goes_stale_from_when_it_was_first_seen(
        copy, colors, reference, caplog):
    write_lease(copy, time.time() + 3600)  # written by a host whose clock was an hour ahead
    started = time.monotonic()
    train.run(_config(colors, lease_timeout_minutes=0.05), str(copy))
    assert time.monotonic() - started > 3
    assert re.search(rf"taking over the lease on {re.escape(str(copy))} from launch skewed on "
                     r"elsewhere: its heartbeat is 3\d\d\d s ahead of this host's clock, "
                     r"unchanged for 3 s", caplog.text), caplog.text[-3000:]
    assert _logged_steps(copy) == list(range(1, STEPS + 1)) and (copy / "DONE").exists()
    assert_params_close(read_params(reference, STEPS), read_params(copy, STEPS))


SIGTERM_AT_RESTORE = """
import os, signal, sys
import orbax.checkpoint as ocp
from vitpod import cli, train

original = ocp.StandardCheckpointHandler.restore

def restore(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # a preemption in the middle of the restore
    return original(self, *args, **kwargs)

ocp.StandardCheckpointHandler.restore = restore
train.define_flags()
cli.run(train.main)
"""


def test_a_sigterm_during_the_restore_stops_in_one_line_and_releases_the_lease(copy, colors):
    before = _snapshot(copy)
    result = subprocess.run([sys.executable, "-c", SIGTERM_AT_RESTORE, *_flags(copy, colors)],
                            cwd=ROOT, env=ENV, text=True, capture_output=True, timeout=200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stdout.strip().splitlines() == [
        "stopped by SIGTERM before the first step: nothing was trained, so nothing to save; "
        "relaunch the same command to continue"]
    assert _snapshot(copy) == before  # no lease left, nothing logged, no checkpoint touched
