"""Bad input to every entrypoint: the exact one-line `error: ...`, exit code 2, no traceback,
nothing written.

Each row runs the entrypoint's real exit path (its flags, `cli.run`, `main`) in this process:
`python -m vitpod.X` would spend seconds importing JAX per row. A few rows also run as
subprocesses, to show the two agree.
"""

import contextlib
import importlib
import io
import os
import pathlib
import shlex
import subprocess
import sys

import pytest
from absl import flags

from tests.conftest import ROOT, make_imagefolder
from vitpod import cli

CONFIGS = ROOT / "configs"
TIMM = ROOT / "tests" / "fixtures" / "timm" / "vit_small_imagenet_norm"  # classes "0".."9"
ON_THE_DEVICES = "is not divisible by the 8 devices of the mesh"
NOT_A_MODEL = ("is neither a vitpod workdir (with checkpoints/), a checkpoint directory "
               "(config.json: Hugging Face ViT or timm save_for_hf) nor a big_vision / "
               "vision_transformer .npz file")
TRAIN = f"--config={CONFIGS}/tiny.py --workdir={{d}}/run --config.data.train_dir={{d}}/colors/train"

# (id, entrypoint, arguments, the whole error line); {d} is the fixture directory, where
# every path a row names lives and where nothing may appear or change.
ROWS = [
    ("train-unknown-key", "train", f"--config={CONFIGS}/demo.py --workdir={{d}}/run "
     "--config.batch_sise=3", "error: --config.batch_sise: unknown config key 'batch_sise'; "
     "did you mean batch_size? (every key a config can set is in vitpod/config.py)"),
    ("train-warmup-over-total", "train", f"--config={CONFIGS}/demo.py --workdir={{d}}/run "
     "--config.total_steps=20", "error: config optim.warmup_steps = 50 is more than "
     "total_steps=20; lower it or raise total_steps"),
    ("train-warmup-cooldown-over-total", "train", f"--config={CONFIGS}/demo.py "
     "--workdir={d}/run --config.optim.schedule=constant --config.optim.cooldown_steps=960",
     "error: config optim.warmup_steps + optim.cooldown_steps = 1010 is more than "
     "total_steps=1000; lower it or raise total_steps"),
    ("train-bad-value", "train", f"{TRAIN} --config.batch_size=abc", "error: flag "
     "--config.batch_size=abc: invalid literal for int() with base 10: 'abc' (see --helpfull)"),
    ("train-unknown-flag", "train", f"--config={CONFIGS}/tiny.py --workdri={{d}}/run",
     "error: Unknown command line flag 'workdri'. Did you mean: workdir ? (see --helpfull)"),
    ("train-no-config", "train", "--workdir={d}/run",
     "error: pass --config=configs/NAME.py (see configs/)"),
    ("train-config-missing", "train", "--config={d}/nope.py --workdir={d}/run",
     "error: cannot load the --config file: [Errno 2] No such file or directory: "
     "'{d}/nope.py'"),
    ("train-no-workdir", "train", f"--config={CONFIGS}/tiny.py",
     "error: pass --workdir=DIR (where checkpoints and metrics go)"),
    ("train-positional-argument", "train", f"{TRAIN} extra", "error: unexpected arguments: "
     "extra; train takes only flags (--config=FILE --workdir=DIR --config.KEY=VALUE ...)"),
    ("train-train-dir-missing", "train", f"{TRAIN}/nope", "error: data dir "
     "'{d}/colors/train/nope' (train) does not exist or is not a directory; set "
     "--config.data.train_dir to an ImageFolder (one folder per class)"),
    ("train-no-class-folders", "train", f"{TRAIN.replace('colors/train', 'hidden_only')}",
     "error: data dir '{d}/hidden_only' (train) has no class folders; an ImageFolder holds "
     "one subfolder per class with the images inside"),
    ("train-class-without-images", "train", f"{TRAIN.replace('colors/train', 'noimages')}",
     "error: data dir '{d}/noimages' (train): class folder(s) a hold no images "
     "(.jpg/.jpeg/.png/.ppm/.bmp/.pgm/.tif/.tiff/.webp); add images or remove them"),
    ("train-val-classes-differ", "train", f"{TRAIN} --config.data.val_dir={{d}}/other/val",
     "error: val classes in '{d}/other/val' differ from train classes in '{d}/colors/train': "
     "only in train ['b'], only in val ['c']; both splits need the same class folders"),
    ("train-batch-vs-devices", "train", f"{TRAIN} --config.batch_size=12",
     f"error: config batch_size=12 {ON_THE_DEVICES}; use a multiple of 8"),
    ("train-eval-batch-vs-devices", "train", f"{TRAIN} --config.data.eval_batch_size=20",
     f"error: config data.eval_batch_size=20 {ON_THE_DEVICES}; use a multiple of 8"),
    ("train-bad-mesh", "train", f"{TRAIN} --config.mesh.data=3", "error: config mesh.data=3 "
     "x mesh.fsdp=1 does not match the 8 devices; make their product 8 (or set one to -1)"),
    ("train-bad-variant", "train", f"{TRAIN} --config.model.variant=Q/16", "error: config "
     "model.variant='Q/16' is unknown; use NAME/PATCH with NAME one of pico, mu, Ti, S, M, B, "
     "L, H, So400m, g, G, e (e.g. 'S/16'), or any shape as wWIDTH-dDEPTH-hHEADS-mMLP/PATCH "
     "(e.g. 'w48-d3-h4-m96/8')"),
    ("train-init-from-not-a-checkpoint", "train", f"{TRAIN} --config.model.init_from={{d}}/empty",
     "error: {d}/empty: no config.json; vitpod reads Hugging Face ViT and timm save_for_hf "
     "directories (config.json + weights) and big_vision / vision_transformer .npz files"),
    ("evaluate-no-flags", "evaluate", "--workdir={d}/unfinished",
     "error: pass --workdir=DIR and --data_dir=IMAGEFOLDER"),
    ("evaluate-not-a-model", "evaluate", "--workdir={d}/empty --data_dir={d}/colors/train",
     f"error: '{{d}}/empty' {NOT_A_MODEL}"),
    ("evaluate-workdir-without-checkpoints", "evaluate",
     "--workdir={d}/unfinished --data_dir={d}/colors/train",
     "error: no checkpoint in {d}/unfinished/checkpoints; train first (python -m vitpod.train)"),
    ("evaluate-data-dir-missing", "evaluate", "--workdir={d}/unfinished --data_dir={d}/nope",
     "error: --data_dir={d}/nope does not exist or is not a directory; pass an ImageFolder "
     "(one folder per class) or a packed dataset"),
    ("evaluate-other-classes", "evaluate", f"--workdir={TIMM} --data_dir={{d}}/colors/train",
     "error: classes of '{d}/colors/train' ['a', 'b']... differ from the model's ['0', '1', '2', "
     "'3', '4']...; evaluate on the same classes"),
    ("evaluate-batch-size", "evaluate", f"--workdir={TIMM} --data_dir={{d}}/colors/train "
     "--batch_size=0", "error: --batch_size=0 must be >= 1"),
    ("predict-no-images-named", "predict", "--model={d}/unfinished",
     "error: usage: python -m vitpod.predict --model=DIR IMAGE_OR_DIR..."),
    ("predict-image-missing", "predict", "--model={d}/unfinished {d}/nope.png",
     "error: no such file or directory: {d}/nope.png"),
    ("predict-folder-without-images", "predict", "--model={d}/unfinished {d}/noimages",
     "error: no images below {d}/noimages (files ending in "
     ".jpg/.jpeg/.png/.ppm/.bmp/.pgm/.tif/.tiff/.webp, hidden ones skipped)"),
    ("predict-not-a-model", "predict", "--model={d}/empty {d}/colors/train",
     f"error: '{{d}}/empty' {NOT_A_MODEL}"),
    ("predict-npz-missing", "predict", "--model={d}/nope.npz {d}/colors/train",
     "error: {d}/nope.npz does not exist"),
    ("export-no-flags", "export", "--workdir={d}/unfinished",
     "error: pass --workdir=DIR and --out=DIR"),
    ("export-no-checkpoints", "export", "--workdir={d}/unfinished --out={d}/out",
     "error: no checkpoint in {d}/unfinished/checkpoints; train first (python -m vitpod.train)"),
    ("export-not-a-model", "export", "--workdir={d}/empty --out={d}/out",
     f"error: '{{d}}/empty' {NOT_A_MODEL}"),
    ("export-out-is-a-file", "export", f"--workdir={TIMM} --out={{d}}/a_file",
     "error: --out={d}/a_file is a file; pass a directory for the HF model"),
    ("export-out-is-a-workdir", "export", f"--workdir={TIMM} --out={{d}}/unfinished",
     "error: --out={d}/unfinished is a vitpod workdir (its config.json would be replaced); "
     "pass another directory"),
    ("prepare-unknown-source", "prepare", "foo --out={d}/out", "error: unknown source 'foo'; "
     "usage: python -m vitpod.prepare {digits|hf|upload|pack} --out=DIR (upload, pack: "
     "--src=DIR --dst=gs://BUCKET/PATH)"),
    ("prepare-pack-missing-src", "prepare", "pack --src={d}/nowhere --dst={d}/out",
     "error: --src={d}/nowhere does not exist or is not a directory; pass an ImageFolder "
     "(one folder per class)"),
    ("prepare-no-out", "prepare", "digits",
     "error: pass --out=DIR (where the digits ImageFolder is written)"),
    ("prepare-hf-no-dataset", "prepare", "hf --out={d}/out",
     "error: pass --dataset=NAME_OR_DIR (a hub name or a save_to_disk directory)"),
    ("prepare-upload-no-src", "prepare", "upload --dst=gs://bucket/x",
     "error: upload needs --src=DIR and --dst=DIR_OR_gs://BUCKET/PATH"),
    ("prepare-pack-no-dst", "prepare", "pack --src={d}/colors/train",
     "error: pack needs --src=DIR and --dst=DIR_OR_gs://BUCKET/PATH"),
    ("prepare-pack-over-another-dataset", "prepare",
     "pack --src={d}/other/val --dst={d}/packed", "error: {d}/packed holds another packed "
     "dataset (6 images, see {d}/packed/packed.json); choose another --dst or delete it"),
    ("prepare-pack-into-other-files", "prepare", "pack --src={d}/other/val --dst={d}/notes",
     "error: {d}/notes is not empty (it holds readme.txt, ...) and is no packed dataset "
     "of this source; choose an empty or new --dst"),
    ("plan-bad-topology", "plan", f"--config={CONFIGS}/tiny.py --topology=v9:2x2",
     "error: --topology='v9:2x2': write GEN:AxB[xC] with GEN one of v4, v5e, v5, v6e "
     "(v4:2x2x4 is a v4-32, v5e:2x4 a v5e-8)"),
    ("plan-slice-name-as-topology", "plan", f"--config={CONFIGS}/tiny.py --topology=v4-8",
     "error: --topology='v4-8': write GEN:AxB[xC] with GEN one of v4, v5e, v5, v6e "
     "(v4:2x2x4 is a v4-32, v5e:2x4 a v5e-8)"),
    ("plan-no-topology", "plan", f"--config={CONFIGS}/tiny.py",
     "error: pass --topology=GEN:AxB[xC], e.g. v4:2x2x4 (a v4-32)"),
    ("local-hosts-no-train-flags", "local_hosts", "--num_processes=2",
     "error: pass the train flags after --, e.g. -- --config=configs/demo.py --workdir=runs/x"),
    ("local-hosts-no-processes", "local_hosts", f"--num_processes=0 -- {TRAIN}",
     "error: --num_processes=0 must be >= 1"),
    ("local-hosts-no-devices", "local_hosts", f"--devices_per_process=0 -- {TRAIN}",
     "error: --devices_per_process=0 must be >= 1"),
    ("local-hosts-bad-number", "local_hosts", f"--devices_per_process=abc -- {TRAIN}",
     "error: flag --devices_per_process=abc: invalid literal for int() with base 10: 'abc' "
     "(see --helpfull)"),
    ("report-no-records", "report", "--workdir={d}/empty", "error: no launch records in "
     "{d}/empty/launches: is it a vitpod workdir (runs before goodput records have none)?"),
    ("report-workdir-missing", "report", "--workdir={d}/nope",
     "error: --workdir={d}/nope does not exist or is not a directory"),
    ("report-no-workdir", "report", "", "error: pass --workdir=DIR (the run's workdir)"),
    ("preflight-batch-on-a-fallback", "preflight", f"--config={CONFIGS}/tiny.py "
     "--slices=v4-16=8,v4-32=16,v5litepod-4=4 --config.batch_size=24 --config.data.train_dir=x",
     "error: the config does not fit v4-32 (16 devices): config batch_size=24 is not divisible "
     "by the 16 devices of the mesh; use a multiple of 16"),
    ("preflight-no-train-dir", "preflight", f"--config={CONFIGS}/tiny.py --slices=v4-16=8 "
     "--config.data.train_dir=", "error: the config does not fit v4-16 (8 devices): config "
     "data.train_dir is empty; pass --config.data.train_dir=DIR"),
    ("preflight-bad-slices", "preflight", f"--config={CONFIGS}/tiny.py --slices=v4-16",
     "error: --slices='v4-16': write NAME=DEVICES[/SLICES][@TOPOLOGY],... (e.g. "
     "v4-32=16@v4:2x2x4,2xv4-16=16/2@v4:2x2x2)"),
]
IN_SUBPROCESSES = ("train-positional-argument", "predict-folder-without-images",
                   "export-out-is-a-file", "launch-no-processes")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> pathlib.Path:
    """Every path the rows name: data sets, a run with no checkpoint, a packed dataset."""
    from vitpod.data import packing

    d = tmp_path_factory.mktemp("bad_inputs")
    make_imagefolder(d / "colors" / "train", {"a": 3, "b": 3})
    make_imagefolder(d / "other" / "val", {"a": 3, "c": 3}, seed=1)
    (d / "empty").mkdir()
    (d / "hidden_only" / ".ipynb_checkpoints").mkdir(parents=True)
    (d / "noimages" / "a").mkdir(parents=True)
    (d / "noimages" / "a" / "notes.txt").write_text("not an image")
    (d / "noimages" / "a" / ".hidden.png").write_bytes(b"")
    (d / "unfinished").mkdir()  # a run stopped before its first checkpoint
    for name in ("config.json", "manifest.json"):
        (d / "unfinished" / name).write_text("{}")
    (d / "a_file").write_text("a file")
    (d / "notes").mkdir()
    (d / "notes" / "readme.txt").write_text("not a dataset")
    packing.pack(str(d / "colors" / "train"), str(d / "packed"))
    return d


def _snapshot(root: pathlib.Path) -> dict:
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


def _argv(args: str, d: pathlib.Path) -> list[str]:
    return shlex.split(args.replace("{d}", str(d)))


def _run_in_process(entrypoint: str, argv: list[str]) -> tuple[int, str]:
    """(exit code, stderr) of `python -m vitpod.ENTRYPOINT ARGV...`, run here: its flags are
    defined for the call and removed after, as each entrypoint defines them only when run."""
    module = importlib.import_module(f"vitpod.{entrypoint}")
    before = set(flags.FLAGS)
    module.define_flags()
    saved_argv, sys.argv = sys.argv, [f"vitpod.{entrypoint}", *argv]
    err, code = io.StringIO(), 0
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            cli.run(module.main)
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = saved_argv
        for name in set(flags.FLAGS) - before:
            delattr(flags.FLAGS, name)
    return code, err.getvalue()


def _check(code, stderr: str, expected: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert [line for line in lines if line.startswith("error:")] == [expected]
    assert lines[-1] == expected


@pytest.mark.parametrize("entrypoint,args,expected", [r[1:] for r in ROWS],
                         ids=[r[0] for r in ROWS])
def test_bad_input_names_the_cause_in_one_line_and_writes_nothing(inputs, entrypoint, args,
                                                                   expected):
    before = _snapshot(inputs)
    code, stderr = _run_in_process(entrypoint, _argv(args, inputs))
    _check(code, stderr, expected.replace("{d}", str(inputs)))
    assert _snapshot(inputs) == before


def test_the_same_rows_run_as_commands_give_the_same_lines(inputs):
    """The in-process runs above stand for `python -m vitpod.X`: a few rows, as commands."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    rows = [r for r in ROWS if r[0] in IN_SUBPROCESSES]
    before = _snapshot(inputs)
    procs = [subprocess.Popen([sys.executable, "-m", f"vitpod.{entrypoint}",
                               *_argv(args, inputs)], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _, entrypoint, args, _ in rows]
    for proc, (_, _, _, expected) in zip(procs, rows, strict=True):
        _, stderr = proc.communicate(timeout=180)
        _check(proc.returncode, stderr, expected.replace("{d}", str(inputs)))
    assert _snapshot(inputs) == before
