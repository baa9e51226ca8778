"""Preemption and crashes lose nothing: real signals to real processes, then relaunch."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.conftest import ROOT, assert_params_close, load_config, read_losses, read_params
from vitpod import train
from vitpod.errors import UserError

STEPS = 16


def _flags(workdir, data, *extra):
    return ["--config=configs/tiny.py", f"--workdir={workdir}",
            f"--config.data.train_dir={data / 'train'}", f"--config.data.val_dir={data / 'val'}",
            f"--config.total_steps={STEPS}", "--config.save_every=4", *extra]


def _config(data, **overrides):
    return load_config("tiny", **{"data__train_dir": str(data / "train"),
                                  "data__val_dir": str(data / "val"), "total_steps": STEPS,
                                  "save_every": 4, **overrides})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, colors):
    workdir = tmp_path_factory.mktemp("reference")
    return workdir, train.run(_config(colors), str(workdir))


def _start(cmd, env_devices=8):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={env_devices}"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(proc, text, timeout=180):
    """Read the process's output until a line contains `text`; returns the lines read."""
    lines, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return lines
        assert time.monotonic() < deadline, f"no {text!r} within {timeout} s"
    raise AssertionError(f"process ended before {text!r}:\n{''.join(lines[-30:])}")


def _assert_matches(workdir, reference_dir):
    losses, expected = read_losses(workdir), read_losses(reference_dir)
    steps = range(1, STEPS + 1)
    np.testing.assert_allclose([losses[s] for s in steps], [expected[s] for s in steps],
                               rtol=1e-5)
    assert_params_close(read_params(reference_dir, STEPS), read_params(workdir, STEPS))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["process 1", "launcher"])
def test_sigterm_to_a_two_process_run_saves_at_an_agreed_step_and_resumes(
        target, colors, tmp_path, reference):
    launch = [sys.executable, "-m", "vitpod.local_hosts", "--num_processes=2",
              "--devices_per_process=4", "--"]
    proc = _start(launch + _flags(tmp_path, colors))
    pids = [int(line.split("pid")[1]) for line in _wait_for(proc, "process 1: pid")
            if "pid" in line]
    _wait_for(proc, f"step {random.Random(target).randint(2, 6)}/{STEPS}")
    os.kill(pids[1] if target == "process 1" else proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]
    saved = [int(m) for m in re.findall(r"\[p\d\].*preempted at step (\d+), checkpoint", out)]
    assert len(saved) >= 2 and len(set(saved)) == 1  # both processes, one agreed step
    assert saved[0] < STEPS and (tmp_path / "checkpoints" / str(saved[0])).is_dir()
    assert not (tmp_path / "DONE").exists()
    relaunch = subprocess.run(launch + _flags(tmp_path, colors), cwd=ROOT, capture_output=True,
                              text=True, timeout=240)
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    _assert_matches(tmp_path, reference[0])


def test_sigterm_to_a_single_process_run_saves_and_exits_0(colors, tmp_path, reference):
    proc = _start([sys.executable, "-m", "vitpod.train", *_flags(tmp_path, colors)])
    _wait_for(proc, f"step 3/{STEPS}")
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "preempted at step" in out and "checkpoint saved" in out
    train.run(_config(colors), str(tmp_path))
    _assert_matches(tmp_path, reference[0])


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_at_most_save_every_steps(colors, tmp_path, reference):
    rng = random.Random(1)
    kills = 0
    while not (tmp_path / "DONE").exists() and kills < 3:
        proc = _start([sys.executable, "-m", "vitpod.train", *_flags(tmp_path, colors)])
        _wait_for(proc, "train: ")  # started; compiling
        time.sleep(rng.uniform(3, 9))  # somewhere in compile, steps or an async save
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.communicate(timeout=60)
    if not (tmp_path / "DONE").exists():
        train.run(_config(colors), str(tmp_path))
    _assert_matches(tmp_path, reference[0])
    rows = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")
            if "train/loss" in line]
    redone = len(rows) - len(set(rows))
    # save_every=4: a kill costs the steps since the last save that finished writing. The
    # async save of step s may still be in flight when step s + 4 is logged (on a loaded
    # machine), and that row is written before the save of s + 4 starts, so the bound per
    # kill is 2 * save_every (orbax waits for one save before starting the next).
    assert redone <= kills * 2 * 4


def test_unreadable_newest_checkpoint_falls_back_to_the_one_before(colors, tmp_path,
                                                                   reference):
    train.run(_config(colors), str(tmp_path), stop_after=10)  # checkpoints 4, 8, 10
    for f in (tmp_path / "checkpoints" / "10").rglob("*"):
        if f.is_file() and "ocdbt" in str(f):
            f.write_bytes(b"garbage")
    train.run(_config(colors), str(tmp_path))
    assert (tmp_path / "checkpoints" / "10.unreadable").is_dir()
    _assert_matches(tmp_path, reference[0])


def test_non_finite_loss_stops_naming_the_step_and_saves_no_nan(colors, tmp_path):
    config = _config(colors, save_every=1, optim__lr=1e38, optim__warmup_steps=0,
                     optim__clip_norm=0.0)
    with pytest.raises(UserError, match=r"not finite at step (\d+)") as error:
        train.run(config, str(tmp_path))
    bad = int(error.value.args[0].split("step ")[1].split(";")[0])
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) < bad
    for step in saved:
        for leaf in jax.tree.leaves(read_params(tmp_path, step)):
            assert np.isfinite(leaf).all()


def test_wall_clock_interval_saves_between_step_intervals(colors, tmp_path):
    config = _config(colors, save_every=1000, save_every_minutes=1e-6, log_every=5)
    train.run(config, str(tmp_path), stop_after=12)
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [5, 10, 12]  # checked at log steps (5, 10); 12 is the stop


@pytest.mark.slow
def test_launch_records_account_for_a_kill_a_preemption_and_the_finish(colors, tmp_path):
    from vitpod.workdir import goodput

    command = [sys.executable, "-m", "vitpod.train", *_flags(tmp_path, colors)]
    killed = _start(command)
    _wait_for(killed, f"step 6/{STEPS}")
    killed.kill()
    killed.communicate(timeout=60)
    preempted = _start(command)
    _wait_for(preempted, f"step {STEPS - 5}/{STEPS}")
    preempted.send_signal(signal.SIGTERM)
    out = preempted.communicate(timeout=120)[0]
    saved = int(re.search(r"preempted at step (\d+)", out).group(1))
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert finished.returncode == 0, finished.stderr[-3000:]

    records = goodput.read_records(str(tmp_path))
    assert [r["end"]["how"] for r in records] == ["killed", "preempted", "done"]
    first, second, third = records
    assert first["end"]["step"] >= 6 and first["start_step"] == 0
    assert second["start_step"] <= first["end"]["step"]  # the last checkpoint that finished
    assert second["steps_redone"] == first["end"]["step"] - second["start_step"]
    assert second["end"]["step"] == third["start_step"] == saved
    assert third["steps_redone"] == 0 and third["end"]["step"] == STEPS
    for r in records:
        assert r["hosts"] == 1 and r["devices"] == 8 and r["platform"] == "cpu"
        assert 0 < r["first_step_seconds"] < r["end"]["time"] - r["start_time"]

    summary = json.loads((tmp_path / "DONE").read_text())["goodput"]
    assert summary == goodput.summarize(records)
    parts = ("productive_seconds", "startup_seconds", "redone_seconds",
             "between_launches_seconds")
    assert sum(summary[k] for k in parts) == pytest.approx(summary["wall_seconds"], abs=0.01)
    assert summary["wall_seconds"] == pytest.approx(
        third["end"]["time"] - first["start_time"], abs=0.01)
    assert summary["redone_seconds"] > 0 and 0 < summary["goodput"] < 1
    assert summary["chip_hours"] == pytest.approx(sum(
        8 * (r["end"]["time"] - r["start_time"]) for r in records) / 3600, abs=1e-3)
    report = subprocess.run([sys.executable, "-m", "vitpod.report", f"--workdir={tmp_path}",
                             "--price_per_chip_hour=2"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    assert "3 launch(es) (killed, preempted, done)" in report.stdout
    assert f"{summary['chip_hours']:.3f} chip-hours" in report.stdout
    cost = goodput.summarize(records, 2)["cost"]
    assert cost == pytest.approx(2 * summary["chip_hours"], abs=2e-4)  # both rounded to 1e-4
    assert f"cost {cost:.2f} at 2 per chip-hour" in report.stdout


def test_pod_timelines_split_the_time_between_launches():
    """pod-run's pod.json says when it asked for the next slice, when that was ACTIVE and set
    up: the gap between two launches splits into those parts, each clipped to the gap."""
    from vitpod.workdir import goodput

    def record(start, end, pod=None):
        return {"launch": str(start), "start_time": start, "start_step": 0, "devices": 8,
                "first_step_seconds": 1, "end": {"how": "preempted", "step": 10, "time": end},
                **({"pod": pod} if pod else {})}

    first = record(0, 100)
    asked_late = record(160, 200, {"asked": 110, "active": 140, "set_up": 150, "launched": 155})
    summary = goodput.summarize([first, asked_late])
    assert summary["between_launches_seconds"] == 60
    assert (summary["waiting_for_slice_seconds"], summary["setting_up_seconds"]) == (30, 10)
    # A request sent before the previous launch ended (pod-create, then pod-launch) counts
    # from that end; a set-up longer than the gap is clipped to what is left of it.
    early = record(160, 200, {"asked": 50, "active": 120, "set_up": 400, "launched": 155})
    summary = goodput.summarize([first, early])
    assert (summary["waiting_for_slice_seconds"], summary["setting_up_seconds"]) == (20, 40)
    assert goodput.summarize([first, record(160, 200)])["waiting_for_slice_seconds"] == 0
