"""Entrypoints as users run them: bad input gives one line and exit code 2, no traceback."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _run(module, *args, timeout=120, platforms="cpu"):
    env = {**os.environ, "JAX_PLATFORMS": platforms,
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the workdir's own cache, as for a user
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.mark.parametrize("args,message", [
    (["--config.data.bogus=1"], "--config.data.bogus: unknown config key 'bogus' (every key"),
    (["--config.batch_sise=3"], "--config.batch_sise: unknown config key 'batch_sise'; did you "
     "mean batch_size? (every key a config can set is in vitpod/config.py)"),
    (["--config.optim.warmup_steps=10"], "config optim.warmup_steps = 10 is more than "
     "total_steps=6; lower it or raise total_steps"),
    (["--config.model.variant=Q/16"], "model.variant='Q/16' is unknown"),
    (["--config.batch_size=12"], "batch_size=12 is not divisible by the 8 devices"),
    (["--config.data.train_dir=/no/such/dir"], "data dir '/no/such/dir' (train) does not exist"),
    (["--config=configs/missing.py"], "cannot load the --config file"),
])
def test_bad_input_is_one_line_with_exit_code_2(colors, tmp_path, args, message):
    base = ["--config=configs/tiny.py", f"--workdir={tmp_path}",
            f"--config.data.train_dir={colors / 'train'}"]
    result = _run("vitpod.train", *base, *args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last


def test_train_cli_runs_and_prints_the_accuracy(colors, tmp_path):
    args = ["--config=configs/tiny.py", f"--workdir={tmp_path}",
            f"--config.data.train_dir={colors / 'train'}",
            f"--config.data.val_dir={colors / 'val'}"]
    result = _run("vitpod.train", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "final validation accuracy" in result.stdout and "(37 images)" in result.stdout
    for name in ("config.json", "manifest.json", "metrics.jsonl", "DONE", "checkpoints",
                 "tensorboard", "compile_cache"):
        assert (tmp_path / name).exists(), name
    assert any((tmp_path / "tensorboard").iterdir())
    assert any((tmp_path / "compile_cache").iterdir())  # what a relaunch compiles from
    again = _run("vitpod.train", *args)  # a finished run says so and exits 0
    assert again.returncode == 0 and "already finished" in again.stderr


HELD = ("most likely another process holds the accelerator (a stale trainer: make pod-launch "
        "stops it by its pid file; or see `sudo lsof /dev/accel* /dev/vfio/*`), or the "
        "worker's jax lacks the tpu extra (make pod-setup)")


@pytest.mark.parametrize("platforms,expect,message", [
    ("cpu", ["--expect_platform=tpu", "--expect_devices=8"],
     f"error: expected 8 tpu devices, JAX found 8 cpu devices (8 local): it fell back to cpu; "
     f"{HELD}"),
    ("tpu", ["--expect_platform=tpu"], "error: JAX could not start the tpu backend (Unable to "
     "initialize backend 'tpu': "),
    ("cpu", ["--expect_platform=cpu", "--expect_devices=16"],
     "error: expected 16 cpu devices across the job, found 8 cpu devices (8 local): a worker "
     "did not join, or --expect_devices does not match the slice; check every worker with "
     "make pod-check"),
])
def test_train_on_other_devices_than_expected_stops_at_start_and_writes_nothing(
        colors, tmp_path, platforms, expect, message):
    """No silent CPU training on a TPU slice: JAX's fallback, or a backend that cannot start."""
    workdir = tmp_path / "run"
    result = _run("vitpod.train", "--config=configs/tiny.py", f"--workdir={workdir}",
                  f"--config.data.train_dir={colors / 'train'}", *expect, platforms=platforms)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert not workdir.exists()


def test_prepare_digits_writes_a_stratified_split(digits):
    counts = {split: {c.name: len(list(c.iterdir())) for c in (digits / split).iterdir()}
              for split in ("train", "val")}
    assert sum(counts["train"].values()) == 1437 and sum(counts["val"].values()) == 360
    assert sorted(counts["val"]) == [str(d) for d in range(10)]
    for digit, n in counts["val"].items():  # stratified: each class ~20 % in val
        assert abs(n / (n + counts["train"][digit]) - 0.2) < 0.01


def test_training_does_not_import_torch(tmp_path):
    """tensorboardX imports torch when it is installed (~2 s of every launch's start-up);
    the metrics writer keeps it out and leaves torch importable for whoever needs it."""
    code = ("import sys; from vitpod import metrics, train; "
            f"w = metrics.Writer({str(tmp_path)!r}, True); w.write(1, {{'loss': 1.0}}); "
            "w.close(); assert 'torch' not in sys.modules, 'torch was imported'; "
            "import torch; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.stdout.strip() == "ok", result.stderr[-2000:]
    assert any((tmp_path / "tensorboard").iterdir())
