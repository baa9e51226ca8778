"""Real multi-process jobs on localhost: jax.distributed, gloo collectives, the launcher."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import (
    ROOT,
    assert_params_close,
    load_config,
    read_losses,
    read_params,
    tiny_run,
)
from vitpod import local_hosts, mesh, train

pytestmark = pytest.mark.slow


# What a v4-16 is (libtpu's v4:2x2x2): 2 hosts of 4 chips, whose rows alternate in its mesh.
V4_16 = "v4:2x2x2"


def _launch(workdir, data, *extra, processes=2, devices=4, timeout=240, env=None, topology=None):
    """A local job; 2 x 4 devices in a v4-16's device order unless `topology` says otherwise."""
    if topology is None:
        topology = V4_16 if (processes, devices) == (2, 4) else ""
    cmd = [sys.executable, "-m", "vitpod.local_hosts", f"--num_processes={processes}",
           f"--devices_per_process={devices}", f"--topology={topology}", "--",
           "--config=configs/tiny.py",
           f"--workdir={workdir}", f"--config.data.train_dir={data / 'train'}",
           f"--config.data.val_dir={data / 'val'}", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def one_by_eight(tmp_path_factory, colors):
    return tiny_run(tmp_path_factory, colors, "1x8")


@pytest.fixture(scope="module")
def two_by_four(tmp_path_factory, colors):
    workdir = tmp_path_factory.mktemp("2x4")
    result = _launch(workdir, colors)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir, json.loads((workdir / "DONE").read_text()), result


def test_two_processes_match_one_process_with_eight_devices(one_by_eight, two_by_four):
    (dir_1, _), (dir_2, _, _) = one_by_eight, two_by_four
    losses_1, losses_2 = read_losses(dir_1), read_losses(dir_2)
    assert sorted(losses_2) == sorted(losses_1) == list(range(1, 7))
    np.testing.assert_allclose([losses_2[s] for s in range(1, 7)],
                               [losses_1[s] for s in range(1, 7)], rtol=1e-5)
    assert_params_close(read_params(dir_1, 6), read_params(dir_2, 6))


def test_a_v4_16s_interleaved_hosts_compute_the_steps_of_one_process(two_by_four):
    """In a v4-16's device order each host holds every other block of the batch."""
    log = two_by_four[2].stdout
    assert "host 0 of 2 holds batch rows 0-1,4-5,8-9,12-13" in log, log[-3000:]
    assert "host 1 of 2 holds batch rows 2-3,6-7,10-11,14-15" in log


def test_two_slices_compute_the_steps_of_one(one_by_eight, colors, tmp_path):
    """4 processes x 2 devices as 2 slices of 2 hosts (MEGASCALE_NUM_SLICES=2, as the TPU
    runtime sets it): data = 2 slices x 2, FSDP over 2 within a slice; the same losses and
    params as one process with 8 devices."""
    result = _launch(tmp_path, colors, "--config.mesh.fsdp=2", processes=4, devices=2,
                     env={mesh.NUM_SLICES_ENV: "2"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "mesh data=4 x fsdp=2 over 2 slice(s)" in result.stdout + result.stderr
    losses, reference = read_losses(tmp_path), read_losses(one_by_eight[0])
    np.testing.assert_allclose([losses[s] for s in range(1, 7)],
                               [reference[s] for s in range(1, 7)], rtol=1e-5)
    assert_params_close(read_params(one_by_eight[0], 6), read_params(tmp_path, 6))


def test_eval_across_hosts_counts_every_image_once(one_by_eight, two_by_four):
    (_, final_1), (_, final_2, _) = one_by_eight, two_by_four
    assert final_2["eval/count"] == final_1["eval/count"] == 37  # odd: no even host split
    assert final_2["eval/accuracy"] == pytest.approx(final_1["eval/accuracy"], abs=1e-6)


def test_only_process_0_writes_the_run_files(two_by_four):
    workdir, _, result = two_by_four
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 7))  # not twice
    assert result.stdout.count("final validation accuracy") == 1


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_hosts_continues_the_same_batches(
        first, then, one_by_eight, colors, tmp_path):
    for processes, extra in ((first, ["--stop_after=3"]), (then, [])):
        if processes == 1:
            config = load_config("tiny", data__train_dir=str(colors / "train"),
                                 data__val_dir=str(colors / "val"))
            train.run(config, str(tmp_path), stop_after=3 if extra else 0)
        else:
            result = _launch(tmp_path, colors, *extra)
            assert result.returncode == 0, result.stderr[-3000:]
    losses, reference = read_losses(tmp_path), read_losses(one_by_eight[0])
    np.testing.assert_allclose([losses[s] for s in range(1, 7)],
                               [reference[s] for s in range(1, 7)], rtol=1e-5)
    assert_params_close(read_params(one_by_eight[0], 6), read_params(tmp_path, 6))


def test_launcher_stops_the_job_when_a_process_dies(colors, tmp_path):
    cmd = [sys.executable, "-m", "vitpod.local_hosts", "--num_processes=2",
           "--devices_per_process=4", "--", "--config=configs/tiny.py",
           f"--workdir={tmp_path}", f"--config.data.train_dir={colors / 'train'}",
           "--config.total_steps=100000", "--config.save_every=100000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    pids, deadline = [], time.monotonic() + 180
    for line in proc.stdout:
        if line.startswith("[launch] process"):
            pids.append(int(line.split("pid")[1]))
        if "step 2/" in line:  # both processes are training
            break
        assert time.monotonic() < deadline, "the job never started training"
    os.kill(pids[1], signal.SIGKILL)
    killed_at = time.monotonic()
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode != 0
    assert time.monotonic() - killed_at < 60
    assert "process 1 exited with code -9; stopped the others" in output
    assert proc.returncode != 0 and all(_gone(pid) for pid in pids)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_hosts_launched_with_different_configs_refuse_to_start(colors, tmp_path):
    port = local_hosts.free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "vitpod.train", "--config=configs/tiny.py",
         f"--workdir={tmp_path}", f"--config.data.train_dir={colors / 'train'}",
         f"--config.seed={i}", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
         f"--process_id={i}"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    for err in errors:
        assert "error: process(es) [1] run a different config or workdir than process 0" in err


def test_resume_on_other_layouts_and_slices_continues_the_same_run(colors, tmp_path):
    """data=8 on 1x8 devices -> data=2 x fsdp=4 on 2x4 -> fsdp over all (-1) on 1x4: params,
    AdamW state and the EMA restored into each new layout's shardings, the same batches."""
    ema = "--config.optim.ema_decay=0.9"
    reference = load_config("tiny", data__train_dir=str(colors / "train"),
                            data__val_dir=str(colors / "val"), optim__ema_decay=0.9)
    train.run(reference, str(tmp_path / "reference"))
    switched = tmp_path / "switched"
    stages = [(1, 8, ["--config.mesh.data=8", "--stop_after=2"]),
              (2, 4, ["--config.mesh.data=2", "--config.mesh.fsdp=4", "--stop_after=4"]),
              (1, 4, ["--config.mesh.fsdp=-1"])]
    for processes, devices, extra in stages:
        result = _launch(switched, colors, ema, *extra, processes=processes, devices=devices)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resuming from the checkpoint of step 4" in result.stdout + result.stderr
    losses, expected = read_losses(switched), read_losses(tmp_path / "reference")
    np.testing.assert_allclose([losses[s] for s in range(1, 7)],
                               [expected[s] for s in range(1, 7)], rtol=1e-5)
    assert_params_close(read_params(tmp_path / "reference", 6), read_params(switched, 6))
