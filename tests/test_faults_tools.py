"""Faults of the tools around training: `prepare` (upload, hf, an unfinished pack), `export`,
`predict`, `train --stop_after`, the skipped-image warning, and the pod settings.

Each test gives the input a user gave, checks the whole line the user sees (`error: ...` and
exit code 2 for vitpod, exit code 1 for deploy/), and that nothing was written or uploaded that
should not be: links out of the uploaded tree stay behind unless asked for, a refused export
leaves --out as it was, a refused hf prepare leaves no folder. Entrypoints run in this process
through their real exit path (`cli.run`), as in tests/test_errors.py; deploy.tpu_vm runs as
`python3 -m deploy.tpu_vm` with DRY_RUN=1, as in tests/test_tpu_vm.py.
"""

import logging
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, make_imagefolder, run_entrypoint
from vitpod import storage, upload
from vitpod.data import imagefolder, packing, pipeline
from vitpod.errors import UserError

TIMM = ROOT / "tests" / "fixtures" / "timm" / "vit_small_imagenet_norm"  # a small checkpoint


def _last_line(code: int, err: str) -> str:
    assert code == 2 and "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


# --- prepare upload: links out of the tree ----------------------------------------------------

def test_upload_names_links_out_of_the_tree_and_leaves_them_unless_asked(gcs, tmp_path,
                                                                         caplog):
    gcs.create_bucket("vitpod-links")
    root = make_imagefolder(tmp_path / "data", {"a": 2})
    secrets = tmp_path / "etc"
    secrets.mkdir()
    (secrets / "shadow").write_text("root:x")
    (tmp_path / "passwd").write_text("root:0")
    os.symlink(secrets, root / "etc")  # a folder link out of the tree (the /etc case)
    os.symlink(tmp_path / "passwd", root / "a" / "passwd")  # a file link out of the tree
    copied, _ = upload.upload_tree(str(root), "gs://vitpod-links/data")
    assert copied == 2
    assert storage.files_below("gs://vitpod-links/data") == ["a/img000.png", "a/img001.png"]
    assert (f"upload: did not follow 2 link(s) leading out of {root}: a/passwd -> "
            f"{tmp_path}/passwd, etc -> {tmp_path}/etc; pass --follow_links_out to upload what "
            "they point to") in caplog.text
    code, out, err = run_entrypoint("prepare", ["upload", f"--src={root}", "--dst=gs://vitpod-links/all",
                                      "--follow_links_out"])
    assert code == 0, err[-3000:]
    assert storage.files_below("gs://vitpod-links/all") == [
        "a/img000.png", "a/img001.png", "a/passwd", "etc/shadow"]


# --- prepare hf: a class name too long for a folder -------------------------------------------

def test_prepare_hf_refuses_a_class_name_too_long_for_a_folder_and_writes_nothing(tmp_path):
    datasets = pytest.importorskip("datasets")
    long = "x" * 400
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=["cat", long])})
    pixels = Image.fromarray(np.zeros((4, 4, 3), np.uint8))
    datasets.Dataset.from_dict({"image": [pixels, pixels], "label": [0, 1]},
                               features=features).save_to_disk(str(tmp_path / "hf"))
    code, _, err = run_entrypoint("prepare", ["hf", f"--dataset={tmp_path / 'hf'}",
                                    f"--out={tmp_path / 'out'}"])
    assert _last_line(code, err) == (
        f"error: dataset '{tmp_path / 'hf'}' has a class name of 400 bytes ('{'x' * 40}'...), "
        "more than the 255 a folder name may have; rename its classes first (datasets' "
        "ClassLabel names)")
    assert not (tmp_path / "out").exists()


# --- export ----------------------------------------------------------------------------------

def test_export_to_a_folder_it_cannot_create_is_one_line():
    code, _, err = run_entrypoint("export", [f"--workdir={TIMM}", "--out=/proc/nope"])
    assert _last_line(code, err) == (
        "error: cannot write the model to --out=/proc/nope: No such file or directory (ENOENT); "
        "pass a directory this user can create and write")


def test_export_refuses_a_folder_with_files_unless_overwrite_and_writes_one_mode(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run_entrypoint("export", [f"--workdir={TIMM}", f"--out={out}"])
    assert _last_line(code, err) == (
        f"error: --out={out} is not empty (it holds notes.txt); pass --overwrite to write the "
        "model over it, or choose another directory")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    code, _, err = run_entrypoint("export", [f"--workdir={TIMM}", f"--out={out}", "--overwrite"])
    assert code == 0, err[-3000:]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(modes)
    assert modes["model.safetensors"] == modes["config.json"] == modes[
        "preprocessor_config.json"], modes


# --- predict ---------------------------------------------------------------------------------

def test_predict_with_every_input_unreadable_exits_2(tmp_path):
    (tmp_path / "a.png").write_bytes(b"not an image")
    (tmp_path / "b.jpg").write_bytes(b"")
    code, out, err = run_entrypoint("predict", [f"--model={TIMM}", str(tmp_path)])
    assert _last_line(code, err) == ("error: none of the 2 file(s) could be read as an image "
                                     "(each line above says why); pass image files")
    assert [line.split(": ")[0] for line in out.splitlines()] == [f"{tmp_path}/a.png",
                                                                   f"{tmp_path}/b.jpg"]


def test_predict_refuses_top_k_below_one(colors):
    code, out, err = run_entrypoint("predict",
                                    [f"--model={TIMM}", "--top_k=0", str(colors / "val")])
    assert _last_line(code, err) == "error: --top_k=0 must be >= 1"
    assert out == ""


# --- train --stop_after ----------------------------------------------------------------------

def test_train_refuses_a_negative_stop_after_before_writing(tmp_path, colors):
    code, _, err = run_entrypoint("train", [f"--config={ROOT}/configs/tiny.py",
                                  f"--workdir={tmp_path / 'run'}",
                                  f"--config.data.train_dir={colors / 'train'}",
                                  "--stop_after=-1"])
    assert _last_line(code, err) == "error: --stop_after=-1 must be >= 0 (0: run to the end)"
    assert not (tmp_path / "run").exists()


# --- a missing image is named as missing -----------------------------------------------------

def test_a_missing_image_is_named_missing_and_a_corrupt_one_unreadable(tmp_path, caplog):
    root = make_imagefolder(tmp_path / "train", {"a": 3})
    (root / "a" / "img001.png").write_bytes(b"garbage")
    split = imagefolder.scan(str(root))
    (root / "a" / "img002.png").unlink()  # gone since the scan
    warn = pipeline.SkipWarner(split)
    caplog.set_level(logging.WARNING)
    warn({"index": np.array([1, 2, 2, -1]), "valid": np.array([0, 0, 0, 0], np.float32)})
    warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert warnings == [
        f"skipped unreadable image {root}/a/img001.png (corrupt, truncated, empty, or over "
        "data.max_image_pixels)",
        f"skipped missing image {root}/a/img002.png (deleted or moved since the data was "
        "scanned into the manifest)"]


# --- an unfinished pack ----------------------------------------------------------------------

def test_an_unfinished_pack_says_so_and_how_to_finish_it(colors, tmp_path):
    dst = tmp_path / "packed"
    packing.pack(str(colors / "train"), str(dst), shard_mb=0.002)  # 2 shards
    # What a pack killed outright (SIGKILL) leaves: its plan and some shards, no packed.json,
    # which is written last.
    (dst / "packed.json").unlink()
    (dst / "shard-00001-of-00002.arrayrecord").unlink()
    with pytest.raises(UserError) as refused:
        imagefolder.scan(str(dst))
    assert str(refused.value) == (
        f"data dir '{dst}' (train) is a pack that did not finish (packing.json but no "
        f"packed.json); rerun the same `python -m vitpod.prepare pack` with --dst={dst} to "
        "finish it (it keeps the shards already written)")
    counts = packing.pack(str(colors / "train"), str(dst), shard_mb=0.002)
    assert counts == {"images": 64, "shards": 2, "already there": 1}
    assert len(imagefolder.scan(str(dst)).files) == 64


# --- pod settings ----------------------------------------------------------------------------

def _pod(verb: str, **settings) -> subprocess.CompletedProcess:
    env = {**os.environ, "POD_ENV": os.devnull, "DRY_RUN": "1", "PROJECT": "proj",
           "ZONE": "us-central2-b", "NAME": "vp", "TPU_TYPE": "v4-16", "PLATFORM": "tpu",
           **settings}
    return subprocess.run([sys.executable, "-m", "deploy.tpu_vm", verb], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name,extra", [("my run", {}), ("n;id", {}), ("My_Run", {}),
                                        ("run-", {}), ("9lives", {}), ("v" * 64, {}),
                                        ("v" * 62, {"NUM_SLICES": "2"})])
def test_a_pod_name_that_gcloud_would_refuse_is_named_at_once(name, extra):
    result = _pod("create", NAME=name, **extra)
    suffix = f" with the node suffix ({name}-1)" if extra else ""
    assert result.returncode == 1, result.stdout
    assert result.stderr.splitlines() == [
        f"error: NAME={name!r}: use lowercase letters, digits and hyphens, a letter first and "
        f"no hyphen last, at most 63 characters{suffix} (the rule of TPU and Compute Engine "
        "names)"]
    assert "gcloud" not in result.stdout  # nothing would have been sent


def test_a_pod_name_that_follows_the_rule_is_accepted():
    result = _pod("create", NAME="vit-b16-run2")
    assert result.returncode == 0, result.stderr
    assert "queued-resources create vit-b16-run2" in result.stdout


@pytest.mark.parametrize("tpu_type,workers,devices", [("v4-8", 1, 4), ("v4-16", 2, 4),
                                                      ("v4-32", 4, 4), ("v5litepod-8", 1, 8)])
def test_a_dry_run_check_states_the_workers_the_type_has(tpu_type, workers, devices):
    result = _pod("check", TPU_TYPE=tpu_type)
    assert result.returncode == 0, result.stderr
    assert (f"pod-check: all {workers} worker(s) ok, {devices} tpu devices each;"
            in result.stdout), result.stdout
    # each worker's commands, printed in parallel: lines may interleave
    assert all(f"--worker={i} " in result.stdout for i in range(workers))
    assert f"--worker={workers} " not in result.stdout


def test_a_dry_run_says_when_it_cannot_know_the_worker_count():
    result = _pod("check", TPU_TYPE="v5litepod-16")
    assert result.returncode == 0, result.stderr
    assert ("vp: a dry run does not know how many workers a v5litepod-16 has (a real run "
            "counts them with gcloud's describe); the commands are shown for worker 0"
            ) in result.stdout
