"""Faults of the data and the workdir's files, and bad settings, that must end in one line
before anything changes: labels a changed train folder would shift, JSON files of the wrong
shape, numeric keys out of range, a --workdir that is a file, config files that give no
config, a refused launch that would have written its config, and a finished run relaunched
with other values.

Like tests/test_faults.py, each runs `train` (or `report`) in this process and checks the whole
line the user sees, the exit code, and that the workdir is as it was (or, where the row says
so, changed only as docs/faults.md says).
"""

import json
import logging
import pathlib
import shutil
import socket
import sys

import ml_collections
import pytest

from tests.conftest import ROOT, load_config, make_imagefolder, run_entrypoint
from vitpod import config_record, train
from vitpod.workdir import lease

TINY = f"--config={ROOT}/configs/tiny.py"


def _config(train_dir, **overrides):
    return load_config("tiny", data__train_dir=str(train_dir), save_every=2, **overrides)


def _flags(workdir, train_dir, *extra):
    return [TINY, f"--workdir={workdir}", f"--config.data.train_dir={train_dir}",
            "--config.save_every=2", *extra]


def _snapshot(root: pathlib.Path) -> dict:
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


def _refused(code: int, err: str, expected: str) -> None:
    assert "Traceback" not in err, err[-3000:]
    assert code == 2, err[-3000:]
    assert [line for line in err.splitlines() if line.startswith("error:")] == [expected]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, colors):
    """A run on the shared colors data stopped at step 4 of 6."""
    workdir = tmp_path_factory.mktemp("stopped")
    train.run(_config(colors / "train"), str(workdir), stop_after=4)
    return workdir


@pytest.fixture
def copy(stopped, tmp_path):
    shutil.copytree(stopped, tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def own(tmp_path):
    """(workdir, train dir): a run stopped at step 4 of 6 on data of its own, classes a-d."""
    data = make_imagefolder(tmp_path / "data", {c: 8 for c in "abcd"})
    train.run(_config(data), str(tmp_path / "run"), stop_after=4)
    return tmp_path / "run", data


# -- labels: a run keeps the class-to-label mapping of its first launch --

def test_a_resume_whose_data_gives_other_labels_is_refused_naming_the_classes(own):
    workdir, data = own
    assert json.loads((workdir / "config.json").read_text())["classes"] == list("abcd")
    (data / "c").rename(data / "z")  # labels of d and z would shift under a new scan
    (workdir / "manifest.json").unlink()  # as docs/faults.md says for a damaged manifest
    before = _snapshot(workdir)
    code, _, err = run_entrypoint("train", _flags(workdir, data))
    _refused(code, err, f"error: the train data gives other labels than this run was trained "
             f"with ({workdir}/config.json): only in the data ['z'], only in the run ['c']; "
             "its checkpoints hold those labels, so put the data's class folders back as they "
             "were, or train on this data with a new --workdir")
    assert _snapshot(workdir) == before


def test_a_class_added_to_a_run_that_keeps_its_manifest_is_named_once_and_left_out(own,
                                                                                    caplog):
    workdir, data = own
    manifest = (workdir / "manifest.json").read_text()
    make_imagefolder(data, {"e": 4, "f": 4}, seed=1)  # beside a-d, which it leaves alone
    with caplog.at_level(logging.WARNING):
        final = train.run(_config(data), str(workdir))
    assert final["step"] == 6 and (workdir / "DONE").exists()
    named = [r.getMessage() for r in caplog.records if "not in this run's manifest" in
             r.getMessage()]
    assert named == [f"data dir {data}: class folder(s) e, f are not in this run's "
                     "manifest and are left out: a run keeps the classes of its first launch "
                     "(train them in a new run, with a new --workdir)"]
    assert (workdir / "manifest.json").read_text() == manifest


def test_a_workdir_from_before_classes_were_recorded_gets_them_from_its_manifest(copy, colors):
    recorded = json.loads((copy / "config.json").read_text())
    del recorded["classes"]
    (copy / "config.json").write_text(json.dumps(recorded))
    (copy / "DONE").write_text(json.dumps({"step": 6}))  # nothing to train: only the check
    code, out, err = run_entrypoint("train", _flags(copy, colors / "train"))
    assert code == 0 and out.strip() == "finished 6 steps (no data.val_dir, so no validation)"
    (copy / "DONE").unlink()
    code, out, err = run_entrypoint("train", _flags(copy, colors / "train", "--stop_after=5"))
    assert code == 0, err[-3000:]
    assert json.loads((copy / "config.json").read_text())["classes"] == list("abcd")


# -- numeric keys out of range: refused before compiling, nothing written --

RANGES = [
    ("save_every=0", "save_every must be >= 1 (steps between checkpoints)"),
    ("log_every=0", "log_every must be >= 1 (steps between log rows)"),
    ("eval_every=-1", "eval_every must be >= 0 (0: only at the end)"),
    ("save_every_minutes=-1", "save_every_minutes must be >= 0 (0: off)"),
    ("data.eval_batch_size=-8", "data.eval_batch_size must be >= 0 (0: batch_size)"),
    ("data.max_skipped_fraction=2", "data.max_skipped_fraction must be in [0, 1]"),
    ("data.crop_ratio=(1.5,1.0)", "data.crop_ratio needs 0<lo<=hi"),
    ("optim.min_lr_ratio=-0.5", "optim.min_lr_ratio must be in [0, 1]"),
    ("optim.weight_decay=-1", "optim.weight_decay must be >= 0"),
    ("optim.b2=1.0", "optim.b1/b2 must be in [0, 1)"),
    ("optim.clip_norm=-1", "optim.clip_norm must be >= 0 (0: off)"),
    ("model.layer_norm_eps=0", "model.layer_norm_eps must be positive"),
]


@pytest.mark.parametrize("setting,expected", RANGES, ids=[r[0].split("=")[0] for r in RANGES])
def test_a_numeric_key_out_of_range_is_one_line_before_compiling(colors, tmp_path, setting,
                                                                 expected):
    code, _, err = run_entrypoint("train", _flags(tmp_path / "run", colors / "train",
                                        f"--config.{setting}"))
    _refused(code, err, f"error: config {expected}")
    assert not (tmp_path / "run").exists()


# -- JSON of the wrong shape in the workdir: one checked reader per file --

CONFIG_REMEDY = ("delete it and relaunch with the run's own flags: it is written again from "
                 "them (a different config then goes unnoticed)")
MANIFEST_REMEDY = ("delete it and relaunch to scan the data again (files added or removed "
                   "since then change the batches)")
RECORD_REMEDY = ("delete that launch's folder (the goodput report then leaves it out) and "
                 "relaunch")
DONE_REMEDY = ("delete it and relaunch: the run resumes from its last checkpoint and writes DONE "
               "again")


def _field(key: str, value):
    return lambda d: {**d, key: value}


def _train_field(key: str, edit):
    return lambda m: {"train": {**m["train"], key: edit(m["train"][key])}}


# (id, the file (a glob), its new content or an edit of it, what is wrong, what to do)
SHAPES = [
    ("config-list", "config.json", [], "a list, not an object", CONFIG_REMEDY),
    ("config-null", "config.json", None, "null, not an object", CONFIG_REMEDY),
    ("config-empty", "config.json", {}, '"batch_size" is missing', CONFIG_REMEDY),
    ("config-model", "config.json", _field("model", "B/16"),
     '"model" is a string, not an object', CONFIG_REMEDY),
    ("manifest-list", "manifest.json", [], "a list, not an object", MANIFEST_REMEDY),
    ("manifest-empty", "manifest.json", {}, '"train" is missing', MANIFEST_REMEDY),
    ("manifest-labels", "manifest.json", _train_field("labels", lambda v: v[:3]),
     "the train labels do not match its files and classes", MANIFEST_REMEDY),
    ("manifest-file", "manifest.json", _train_field("files", lambda v: [7] + v[1:]),
     '"train.files[0]" is an integer, not a string', MANIFEST_REMEDY),
    ("record-list", "launches/*/record.json", [], "a list, not an object", RECORD_REMEDY),
    ("record-end", "launches/*/record.json", _field("end", "yesterday"),
     '"end" is a string, not null or an object', RECORD_REMEDY),
    ("done-list", "DONE", [], "a list, not an object", DONE_REMEDY),
    ("done-null", "DONE", None, "null, not an object", DONE_REMEDY),
    ("done-empty", "DONE", {}, '"step" is missing', DONE_REMEDY),
    ("done-step", "DONE", {"step": "6"}, '"step" is a string, not an integer', DONE_REMEDY),
]


@pytest.mark.parametrize("name,content,why,remedy", [r[1:] for r in SHAPES],
                         ids=[r[0] for r in SHAPES])
def test_json_of_the_wrong_shape_is_one_line_naming_the_file(copy, colors, name, content, why,
                                                             remedy):
    path = next(copy.glob(name), copy / name)
    edit = content if callable(content) else lambda _: content
    path.write_text(json.dumps(edit(json.loads(path.read_text()) if path.exists() else None)))
    before = _snapshot(copy)
    code, _, err = run_entrypoint("train", _flags(copy, colors / "train"))
    _refused(code, err, f"error: {path} is damaged (not what vitpod writes there: {why}); "
             f"{remedy}")
    assert _snapshot(copy) == before


def test_report_on_a_record_of_the_wrong_shape_is_one_line(copy):
    record = next(copy.glob("launches/*/record.json"))
    record.write_text("[]")
    code, _, err = run_entrypoint("report", [f"--workdir={copy}"])
    _refused(code, err, f"error: {record} is damaged (not what vitpod writes there: a list, not "
             f"an object); {RECORD_REMEDY}")


@pytest.mark.parametrize("content", ["[]", "null", "{}", '{"heartbeat": "yesterday"}',
                                     '{"heartbeat": 1, "pid": "x", "host": "HOST"}'])
def test_a_lease_of_the_wrong_shape_is_one_nobody_refreshes(tmp_path, caplog, content):
    (tmp_path / "lease.json").write_text(content.replace("HOST", socket.gethostname()))
    held = lease.Lease(str(tmp_path), 180)
    held.take()
    try:
        assert json.loads((tmp_path / "lease.json").read_text())["token"] == held.me["token"]
    finally:
        held.release()
    assert "taking over the lease on" in caplog.text and not (tmp_path / "lease.json").exists()


# -- a --workdir that is a file --

@pytest.mark.parametrize("below", ["", "/run"], ids=["the-file", "below-a-file"])
def test_a_workdir_that_is_a_file_is_one_line(colors, tmp_path, below):
    (tmp_path / "notes").write_text("not a folder")
    code, _, err = run_entrypoint("train", _flags(f"{tmp_path / 'notes'}{below}", colors / "train"))
    where = f": {tmp_path / 'notes'}" if below else ""
    _refused(code, err, f"error: --workdir={tmp_path / 'notes'}{below}{where} exists and is not "
             "a folder; pass a folder (it is made if missing)")
    assert (tmp_path / "notes").read_text() == "not a folder"


# -- config files that give no config --

# Every default key but batch_size, less the five the line names (not a fixed count: keys
# are added over time).
_BARE = ml_collections.ConfigDict({"batch_size": 16})
UNNAMED = len(config_record.missing_keys(_BARE)) - 5
ADVICE = "start from vitpod.config.defaults() and set your values on it (see configs/)"
CONFIG_FILES = [
    ("no-get-config", "from vitpod.config import defaults\n\nc = defaults()\n", [],
     "error: the --config file {f} defines no get_config(); write `def get_config(arg=None):` "
     "returning vitpod.config.defaults() with your values set (see configs/)"),
    ("returns-a-dict", "def get_config(arg=None):\n    return {'batch_size': 16}\n", [],
     f"error: get_config() of the --config file {{f}} returns a dict, not an ml_collections "
     f"ConfigDict; {ADVICE}"),
    ("returns-a-dict-overridden", "def get_config(arg=None):\n    return {'batch_size': 16}\n",
     ["--config.batch_size=8"], f"error: get_config() of the --config file {{f}} returns a "
     f"dict, not an ml_collections ConfigDict; {ADVICE}"),
    ("returns-none", "def get_config(arg=None):\n    pass\n", [],
     f"error: get_config() of the --config file {{f}} returns None (no return statement?); "
     f"{ADVICE}"),
    ("returns-a-bare-config-dict", "import ml_collections\n\n\ndef get_config(arg=None):\n"
     "    c = ml_collections.ConfigDict()\n    c.batch_size = 16\n    return c\n", [],
     "error: get_config() of the --config file {f} returns a config without compile_cache, "
     f"data.crop_ratio, data.crop_scale, data.eval_batch_size, data.eval_crop_pct and "
     f"{UNNAMED} more key(s); {ADVICE}"),
]


@pytest.mark.parametrize("text,extra,expected", [r[1:] for r in CONFIG_FILES],
                         ids=[r[0] for r in CONFIG_FILES])
def test_a_config_file_that_gives_no_config_is_one_line(colors, tmp_path, text, extra,
                                                         expected):
    config = tmp_path / "mine.py"
    config.write_text(text)
    # config_flags loads each file into the module config_config, keeping an earlier file's
    # names there: a fresh one, as in a new process
    sys.modules.pop("config_config", None)
    code, _, err = run_entrypoint("train", [f"--config={config}", f"--workdir={tmp_path / 'run'}",
                                  f"--config.data.train_dir={colors / 'train'}", *extra])
    _refused(code, err, expected.replace("{f}", str(config)))
    assert not (tmp_path / "run").exists()


# -- a refused launch writes nothing; a finished run relaunched with other values --

@pytest.mark.parametrize("setting,expected", [
    ("data.image_size=10", "config data.image_size=10 is not a multiple of the patch size 4 of "
     "model.variant=pico/4"),
    ("optim.freeze=nothing_matches", "config optim.freeze='nothing_matches' matches no "
     "parameter; names look like blocks.0.attn.key.bias, blocks.0.attn.key.kernel, "
     "blocks.0.attn.out.bias"),
], ids=["image-size", "freeze"])
def test_a_refused_first_launch_writes_nothing_and_the_right_one_then_runs(colors, tmp_path,
                                                                          setting, expected):
    workdir = tmp_path / "run"
    code, _, err = run_entrypoint("train", _flags(workdir, colors / "train", f"--config.{setting}"))
    _refused(code, err, f"error: {expected}")
    assert not workdir.exists()
    code, out, err = run_entrypoint("train", _flags(workdir, colors / "train", "--stop_after=1"))
    assert code == 0, err[-3000:]


def test_a_finished_run_relaunched_with_other_values_says_so_and_how_to_go_on(copy, colors):
    (copy / "DONE").write_text(json.dumps({"step": 6}))
    before = _snapshot(copy)
    code, _, err = run_entrypoint("train", _flags(copy, colors / "train", "--config.total_steps=10",
                                        "--config.optim.lr=0.01"))
    _refused(code, err, f"error: the run in {copy} finished at step 6 with other values than "
             "this command's (optim.lr=0.003, not 0.01; total_steps=6, not 10); a finished run "
             "trains no further, not to a larger total_steps either (its schedule ended): "
             "relaunch with its own values to see its result, or start a new run with a new "
             f"--workdir (from its weights: python -m vitpod.export --workdir={copy} --out=DIR, "
             "then --config.model.init_from=DIR)")
    code, out, _ = run_entrypoint("train", _flags(copy, colors / "train", "--config.log_every=3"))
    assert code == 0 and out.strip() == "finished 6 steps (no data.val_dir, so no validation)"
    assert _snapshot(copy) == before
