"""deploy/pod.py against a fake gcloud that records calls and plays scripted TPU states."""

import json
import os
import shlex
import subprocess
import sys

import pytest

from tests.conftest import ROOT

BASE = {"PROJECT": "proj", "ZONE": "us-central2-b", "NAME": "vp", "TPU_TYPE": "v4-32",
        "CAPACITY": "spot", "WORKDIR": "gs://bkt/run", "CONFIG": "configs/demo.py",
        "POLL_SECONDS": "0", "WAIT_TIMEOUT": "30", "MAX_RETRIES": "3"}


@pytest.fixture
def gcloud(tmp_path):
    """Call pod.py VERB with a fake gcloud first on PATH; returns (result, calls, state)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(
        f"#!/bin/sh\nexec {shlex.quote(sys.executable)} "
        f"{shlex.quote(str(ROOT / 'tests' / 'fake_gcloud.py'))} \"$@\"\n")
    (bin_dir / "gcloud").chmod(0o755)
    wheel = tmp_path / "vitpod-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")

    def run(verb, state=None, build=False, **settings):
        state_file = tmp_path / "state.json"
        state_file.write_text(json.dumps({"calls": [], "exists": False,
                                          "qr_states": ["ACTIVE"], **(state or {})}))
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
               "FAKE_GCLOUD": str(state_file), "POD_ENV": str(tmp_path / "none.env"),
               **BASE, **({} if build else {"WHEEL": str(wheel)}), **settings}
        result = subprocess.run([sys.executable, "deploy/pod.py", verb], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=300)
        final = json.loads(state_file.read_text())
        return result, final["calls"], final
    return run


def _verbs(calls):
    return [" ".join(c[2:4]) if c[0] == "compute" else " ".join(c[:2]) for c in calls]


@pytest.mark.parametrize("capacity,flags", [("spot", ["--spot"]), ("reserved", ["--reserved"]),
                                            ("on-demand", [])])
def test_create_asks_for_a_queued_resource_and_waits_until_active(gcloud, capacity, flags):
    result, calls, _ = gcloud("create", CAPACITY=capacity, state={
        "qr_states": ["ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"]})
    assert result.returncode == 0, result.stderr
    create = [c for c in calls if c[3] == "create"]
    assert create == [["compute", "tpus", "queued-resources", "create", "vp", "--node-id=vp",
                       "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base",
                       *flags, "--project=proj", "--zone=us-central2-b"]]
    assert _verbs(calls).count("queued-resources describe") == 5  # absent, then 4 states
    assert "WAITING_FOR_RESOURCES" in result.stdout and "ACTIVE" in result.stdout


def test_create_reuses_an_active_slice(gcloud):
    result, calls, _ = gcloud("create", state={"exists": True, "qr_states": ["ACTIVE"]})
    assert result.returncode == 0 and "reusing" in result.stdout
    assert _verbs(calls) == ["queued-resources describe"]


def test_failed_creation_stops_with_a_clear_message(gcloud):
    result, _, _ = gcloud("create", state={"qr_states": ["WAITING_FOR_RESOURCES", "FAILED"]})
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: vp became FAILED while waiting for capacity; "
                                     "make pod-delete, then retry (or another zone / capacity)")


def test_waiting_for_capacity_times_out(gcloud):
    result, _, _ = gcloud("create", WAIT_TIMEOUT="0.5", POLL_SECONDS="0.05",
                          state={"qr_states": ["WAITING_FOR_RESOURCES"]})
    assert result.returncode == 1 and "still WAITING_FOR_RESOURCES after 0.5 s" in result.stderr


def test_setup_builds_the_wheel_and_retries_the_copy(gcloud, tmp_path):
    result, calls, _ = gcloud("setup", build=True, state={"fail_scp": 2})
    assert result.returncode == 0, result.stderr
    scps = [c for c in calls if c[3] == "scp"]
    assert len(scps) == 3 and scps[0][4].endswith(".whl") and os.path.exists(scps[0][4])
    assert scps[0][5:] == ["vp:~/", "--worker=all", "--project=proj", "--zone=us-central2-b"]
    install = [c for c in calls if c[3] == "ssh"][0]
    assert "--worker=all" in install
    command = install[-3].removeprefix("--command=")
    assert "vitpod-venv/bin/pip install" in command and "[tpu]" in command


def test_launch_starts_train_detached_on_every_worker(gcloud):
    result, calls, _ = gcloud("launch", TRAIN_FLAGS="--config.batch_size=1024")
    assert result.returncode == 0, result.stderr
    command = [c for c in calls if c[3] == "ssh"][-1][6].removeprefix("--command=")
    assert "pkill -f 'vitpod[.]train'" in command and "nohup" in command
    assert command.endswith("> vitpod.log 2>&1 < /dev/null &")
    train = shlex.split(command.split("nohup ")[1].split(" >")[0])
    assert train == ["vitpod-venv/bin/python", "-m", "vitpod.train",
                     "--config=vitpod-configs/demo.py", "--workdir=gs://bkt/run",
                     "--config.batch_size=1024"]
    assert "tail -f ~/vitpod.log" in result.stdout


def test_hostile_values_stay_single_arguments(gcloud, tmp_path):
    evil = "x; touch /tmp/pwned-$(id -u) `reboot` 'q\" $HOME"
    result, calls, _ = gcloud("launch", WORKDIR=f"gs://b/{evil}",
                              TRAIN_FLAGS=f"--config.note={shlex.quote(evil)}")
    assert result.returncode == 0, result.stderr
    command = [c for c in calls if c[3] == "ssh"][-1][6].removeprefix("--command=")
    train = shlex.split(command.split("nohup ")[1].split(" > vitpod.log")[0])
    assert train[-2:] == [f"--workdir=gs://b/{evil}", f"--config.note={evil}"]
    result, calls, _ = gcloud("delete", NAME=evil)
    assert calls[0][4] == evil  # an argv element, never seen by a local shell


def test_run_recreates_after_preemption_and_deletes_when_done(gcloud):
    result, calls, state = gcloud("run", state={
        "qr_states": ["PROVISIONING", "ACTIVE", "ACTIVE", "ACTIVE", "SUSPENDED"],
        "qr_next_after_delete": 1, "done_after": 4})
    assert result.returncode == 0, result.stderr
    verbs = [v for v in _verbs(calls) if v not in ("queued-resources describe",
                                                    "tpu-vm describe", "storage ls")]
    one_round = ["queued-resources create", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh",
                 "tpu-vm scp", "tpu-vm ssh"]
    assert verbs == one_round + ["queued-resources delete"] + one_round + [
        "queued-resources delete"]
    assert "preempted (queued resource SUSPENDED)" in result.stdout
    assert "DONE exists: training finished" in result.stdout and not state["exists"]


def test_run_gives_up_after_max_retries(gcloud):
    result, calls, _ = gcloud("run", MAX_RETRIES="2", state={
        "qr_states": ["ACTIVE", "SUSPENDED"], "qr_next_after_delete": 0})
    assert result.returncode == 1 and "gave up after 2 recreations" in result.stderr
    assert _verbs(calls).count("queued-resources create") == 3


def test_node_preempted_is_noticed(gcloud):
    result, calls, _ = gcloud("run", MAX_RETRIES="0", state={"node_state": "PREEMPTED"})
    assert result.returncode == 1 and "preempted (node PREEMPTED)" in result.stdout


def test_dry_run_prints_commands_and_calls_nothing(gcloud):
    result, calls, _ = gcloud("run", DRY_RUN="1")
    assert result.returncode == 0 and calls == []
    printed = [shlex.split(line) for line in result.stdout.splitlines()
               if line.startswith("gcloud")]
    assert ["gcloud", "compute", "tpus", "queued-resources", "create"] == printed[1][:5]
    assert any("vitpod.train" in " ".join(p) for p in printed)


def test_bad_settings_fail_in_one_line(gcloud):
    result, _, _ = gcloud("create", CAPACITY="cheap")
    assert result.stderr.strip().startswith("error: CAPACITY='cheap': use one of spot")
    result, _, _ = gcloud("create", TPU_TYPE="v9-8")
    assert "TPU_TYPE='v9-8': set RUNTIME_VERSION too" in result.stderr
