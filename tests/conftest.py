"""Shared test set-up: 8 fake CPU devices, absl flags marked parsed, small ImageFolders."""

import os
import tempfile

# Before jax is imported anywhere: 8 fake CPU devices, as on the demo.
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
# One persistent compile cache for the session, shared with the subprocesses the tests start:
# the same small programs are compiled by many tests. (train's own default, a cache in the
# workdir, is checked by the CLI test, which unsets this.)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="vitpod-test-jax-"))

import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402
from PIL import Image  # noqa: E402

# grain's options are absl flags (grain/_src/core/config.py) and reading one before absl
# parsed the command line raises UnparsedFlagAccessError: outside app.run, mark them parsed.
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()

ROOT = pathlib.Path(__file__).resolve().parent.parent
PALETTE = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (220, 220, 40), (200, 40, 200)]


def load_config(name: str, **overrides):
    """configs/<name>.py's config with dotted-key overrides, as --config.KEY=VALUE would."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for key, value in overrides.items():
        *parents, leaf = key.split("__")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def write_image(path: pathlib.Path, label: int, rng: np.random.Generator, size: int = 12):
    """A noisy image whose mean colour tells its class (learnable in a few steps)."""
    base = np.array(PALETTE[label % len(PALETTE)], np.float32)
    pixels = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_imagefolder(root: pathlib.Path, counts: dict[str, int], seed: int = 0) -> pathlib.Path:
    rng = np.random.default_rng(seed)
    for label, (name, n) in enumerate(sorted(counts.items())):
        for i in range(n):
            write_image(root / name / f"img{i:03d}.png", label, rng)
    return root


@pytest.fixture(scope="session")
def colors(tmp_path_factory) -> pathlib.Path:
    """4 classes: 64 train images, 37 val images (37 divides neither 16 nor 8)."""
    root = tmp_path_factory.mktemp("colors")
    make_imagefolder(root / "train", {c: 16 for c in "abcd"}, seed=0)
    make_imagefolder(root / "val", {"a": 10, "b": 9, "c": 9, "d": 9}, seed=1)
    return root


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> pathlib.Path:
    from vitpod import prepare

    root = tmp_path_factory.mktemp("digits")
    prepare.digits(str(root))
    return root


@pytest.fixture
def tiny(colors):
    """configs/tiny.py on the colors data; call with overrides (a__b=... for a.b)."""
    def make(**overrides):
        paths = {"data__train_dir": str(colors / "train"), "data__val_dir": str(colors / "val")}
        return load_config("tiny", **{**paths, **overrides})
    return make


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def read_losses(workdir) -> dict[int, float]:
    """Per-step train loss; for a step logged twice (a resumed run) the last row wins."""
    rows = [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def read_params(workdir, step: int) -> dict:
    """The params of a checkpoint, on one local device (whatever topology saved them)."""
    from vitpod import checkpoint, storage

    return checkpoint.load_params(storage.join(str(workdir), "checkpoints"), step)[1]


def key_names(path) -> list[str]:
    return [str(getattr(k, "key", k)) for k in path]


def assert_params_close(reference: dict, other: dict, atol: float = 1e-5) -> None:
    """Equal within atol, leaf by leaf, except attention key biases (see DESIGN.md).

    Key biases get an exactly-zero gradient (softmax ignores a per-query constant), so Adam
    turns float rounding noise into lr-sized steps on any mesh: only their shapes are compared.
    """
    import jax

    for path, a in jax.tree_util.tree_leaves_with_path(reference):
        b = other
        for k in path:
            b = b[k.key]
        if key_names(path)[-2:] == ["key", "bias"]:
            assert np.shape(a) == np.shape(b)
            continue
        np.testing.assert_allclose(b, a, atol=atol, rtol=atol, err_msg="/".join(key_names(path)))


@pytest.fixture(scope="session")
def gcs_server():
    """fake-gcs-server on loopback behind the fault proxy; the clients' env points at it."""
    from testkit import gcs

    emulator = gcs.Emulator()
    saved = {k: os.environ.get(k) for k in emulator.env()}
    os.environ.update(emulator.env())
    yield emulator
    emulator.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def gcs(gcs_server):
    """The emulator with no faults injected and request counts from zero."""
    gcs_server.faults.reset()
    yield gcs_server
    gcs_server.faults.reset()


# The rehearsals' flags: a short demo run that saves and logs every step.
REHEARSAL_FLAGS = ["--config.total_steps=60", "--config.log_every=1", "--config.save_every=20",
                   "--config.eval_every=0"]


def uninterrupted_losses() -> dict[int, float]:
    """Per-step losses of an uninterrupted 2-process x 4-device run of configs/demo.py with
    REHEARSAL_FLAGS on data/digits: what every rehearsal (pod-sim, multislice, gke-sim)
    compares with, since the same global batch gives the same losses on any layout. Trained
    once per version of the code (runs/reference/KEY, KEY a hash of vitpod/, configs/, the
    flags and the data), as CI's rehearsal steps are separate sessions."""
    import hashlib
    import shutil
    import subprocess
    import sys

    digits = ROOT / "data" / "digits"
    digest = hashlib.sha256(" ".join(REHEARSAL_FLAGS).encode())
    for path in sorted([*(ROOT / "vitpod").rglob("*.py"), *(ROOT / "configs").glob("*.py"),
                        *digits.rglob("*.png")]):
        digest.update(str(path.relative_to(ROOT)).encode() + path.read_bytes())
    reference = ROOT / "runs" / "reference" / digest.hexdigest()[:16]
    if not (reference / "DONE").exists():
        scratch = reference.with_name(reference.name + f".{os.getpid()}")
        shutil.rmtree(scratch, ignore_errors=True)
        ran = subprocess.run(
            [sys.executable, "-m", "vitpod.local_hosts", "--num_processes=2",
             "--devices_per_process=4", "--", "--config=configs/demo.py",
             f"--workdir={scratch}", *REHEARSAL_FLAGS,
             f"--config.data.train_dir={digits / 'train'}",
             f"--config.data.val_dir={digits / 'val'}"],
            cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert ran.returncode == 0, ran.stdout[-3000:]
        shutil.rmtree(reference, ignore_errors=True)
        scratch.rename(reference)
    return read_losses(reference)


def run_entrypoint(entrypoint: str, argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python -m vitpod.ENTRYPOINT ARGV`, run in this process
    (its flags defined for the call, removed after)."""
    import contextlib
    import importlib
    import io
    import sys

    from vitpod import cli

    module = importlib.import_module(f"vitpod.{entrypoint}")
    before = set(flags.FLAGS)
    module.define_flags()
    saved_argv, sys.argv = sys.argv, [f"vitpod.{entrypoint}", *argv]
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            cli.run(module.main)
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv = saved_argv
        for name in set(flags.FLAGS) - before:
            delattr(flags.FLAGS, name)
    return code, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def holding_open(device):
    """A process vitpod did not start that holds `device` open, as a stale TPU program would;
    killed at the end whatever happens."""
    holder = subprocess.Popen([sys.executable, "-c", f"import time; f = open({str(device)!r}); "
                               "print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def tiny_run(tmp_path_factory, colors, name: str):
    """The tiny config trained on `colors` in a fresh local workdir: (workdir, final metrics)."""
    from vitpod import train

    workdir = tmp_path_factory.mktemp(name)
    config = load_config("tiny", data__train_dir=str(colors / "train"),
                         data__val_dir=str(colors / "val"))
    return workdir, train.run(config, str(workdir))


def write_lease(workdir, heartbeat: float) -> None:
    """A lease on `workdir` held by launch `skewed` on another host, its heartbeat at
    `heartbeat` (a time.time() value)."""
    from vitpod import protocol, storage

    storage.write_text(protocol.lease_path(str(workdir)), json.dumps(
        {"launch": "skewed", "host": "elsewhere", "pid": 1, "heartbeat": heartbeat}))
