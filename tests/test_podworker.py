"""vitpod.podworker, the supervisor around the trainer on each TPU worker: it stops its own
trainer by pid file, and only its own."""

import json
import os
import subprocess
import sys
import time

from tests.conftest import ROOT


def _wait_for(path, seconds=60):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.1)


def test_podworker_stops_its_own_trainer_by_pid_file_and_leaves_other_runs_alone(tmp_path):
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)",
                              "vitpod.train", "--workdir=another-run"])
    env = {**os.environ, "VITPOD_LAUNCH_ID": "L1", "VITPOD_WORKER": "0"}
    workdir = tmp_path / "wd"
    # A trainer that ignores SIGTERM: stopped by SIGKILL after the grace period.
    stubborn = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('training', flush=True); time.sleep(600)")

    def podworker(*args, launch="L1"):
        return subprocess.run([sys.executable, "-m", "vitpod.podworker", *args], cwd=tmp_path,
                              env={**env, "VITPOD_LAUNCH_ID": launch, "PYTHONPATH": str(ROOT)},
                              capture_output=True, text=True, timeout=120)
    try:
        started = podworker("start", f"--workdir={workdir}", "--sync_seconds=0.2", "--",
                            sys.executable, "-c", stubborn)
        assert started.returncode == 0, started.stderr
        assert "worker 0: no earlier trainer running" in started.stdout
        _wait_for(workdir / "launches" / "L1" / "worker-0.started")
        log = workdir / "logs" / "L1" / "worker-0.log"
        _wait_for(log)
        deadline = time.monotonic() + 30
        while "training" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "training" in log.read_text()  # the log is copied to the workdir as it grows
        group = int((tmp_path / "vitpod.pid").read_text().split()[0])
        retried = podworker("start", f"--workdir={workdir}", "--", sys.executable, "-c", "0")
        assert f"launch L1 already running (process group {group})" in retried.stdout
        again = podworker("start", f"--workdir={workdir}", "--grace=1", "--", sys.executable,
                          "-c", "print('second launch')", launch="L2")
        assert f"killed the earlier trainer (process group {group}) after 1 s" in again.stdout
        exited = json.loads((workdir / "launches" / "L1" / "worker-0.exited").read_text())
        assert exited["code"] == -9
        _wait_for(workdir / "launches" / "L2" / "worker-0.exited")
        assert "second launch" in (workdir / "logs" / "L2" / "worker-0.log").read_text()
        stopped = podworker("stop")
        assert "worker 0: no earlier trainer running" in stopped.stdout
        assert decoy.poll() is None  # another run's trainer, by name alone, was not touched
    finally:
        decoy.kill()


def test_podworker_stop_leaves_a_group_that_reused_the_recorded_number_alone(tmp_path):
    """The pid file outlives its supervisor; a later process group under that number, even a
    vitpod one, was started later than the recorded supervisor and is not signalled."""
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)",
                                 "vitpod.train", "--workdir=another-run"], start_new_session=True)
    try:
        (tmp_path / "vitpod.pid").write_text(f"{stranger.pid} L0 1\n")  # started at tick 1
        stopped = subprocess.run([sys.executable, "-m", "vitpod.podworker", "stop"],
                                 cwd=tmp_path, env={**os.environ, "VITPOD_WORKER": "0"},
                                 capture_output=True, text=True, timeout=60)
        assert "worker 0: no earlier trainer running" in stopped.stdout, stopped.stderr
        assert stranger.poll() is None
    finally:
        stranger.kill()
