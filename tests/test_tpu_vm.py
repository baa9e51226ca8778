"""deploy.tpu_vm against the simulated gcloud (deploy/sim/gcloud.py), which plays the cloud's
control plane and executes what real gcloud would: copies into worker homes, runs commands
there with bash, reads the bucket. The whole pod-run is rehearsed in tests/test_pod_sim.py."""

import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

from deploy.sim import cloud_state, image
from tests.conftest import ROOT, holding_open
from vitpod import protocol
from vitpod.local_hosts import free_port

BASE = {"PROJECT": "proj", "ZONE": "us-central2-b", "NAME": "vp", "TPU_TYPE": "v4-16",
        "CAPACITY": "spot", "WORKDIR": "gs://bkt/run", "CONFIG": "configs/tiny.py",
        "POLL_SECONDS": "0.05", "WAIT_TIMEOUT": "60", "MAX_RETRIES": "3",
        "DESCRIBE_RETRIES": "3", "PLATFORM": "cpu"}


class Cloud:
    """A simulated cloud in a temporary folder: run pod.py verbs or gcloud against it."""

    def __init__(self, root):
        self.dir = root / "sim"
        self.bin = root / "bin"
        self.bin.mkdir(parents=True)
        image_bin, downloads = image.make(str(self.dir), platform.python_version())
        self.scenario = {"image_bin": image_bin, "downloads_bin": downloads,
                         "cache_dir": str(root / "cache")}
        cloud_state.install_shim(str(self.bin), "gcloud", "deploy.sim.gcloud")
        # The machine gcloud runs on has used it before: it has its ssh key.
        self.client = self.dir / "client"
        (self.client / ".ssh").mkdir(parents=True)
        (self.client / protocol.GCLOUD_SSH_KEY).write_text("key\n")
        # Every worker is on loopback: a free port for the job's coordinator, not JAX's default.
        self.port = str(free_port())
        self.set()

    def set(self, **scenario):
        self.scenario.update(scenario)
        (self.dir / "scenario.json").write_text(json.dumps(self.scenario))

    def env(self, **settings):
        return {**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}", "SIM_DIR": str(self.dir),
                "HOME": str(self.client), "POD_ENV": os.devnull, "COORDINATOR_PORT": self.port,
                **BASE, **settings}

    def pod(self, verb, timeout=300, **settings):
        return subprocess.run([sys.executable, "-m", "deploy.tpu_vm", verb], cwd=ROOT,
                              timeout=timeout, env=self.env(**settings), capture_output=True,
                              text=True)

    def gcloud(self, *args):
        return subprocess.run(["gcloud", *args], env=self.env(), capture_output=True, text=True,
                              timeout=120)

    def state(self):
        path = self.dir / "state.json"
        return json.loads(path.read_text()) if path.exists() else {"calls": [], "resources": {}}

    def edit(self, name, **fields):
        state = self.state()
        state["resources"][name].update(fields)
        (self.dir / "state.json").write_text(json.dumps(state))

    def home(self, name, i):
        return self.dir / "nodes" / name / f"w{i}"

    def processes(self):
        tag = f"VITPOD_SIM_NODE={self.dir}:".encode()
        found = []
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            try:
                if tag in open(f"/proc/{pid}/environ", "rb").read():
                    found.append(int(pid))
            except OSError:
                pass
        return found


@pytest.fixture
def cloud(tmp_path):
    sim = Cloud(tmp_path)
    yield sim
    for pid in sim.processes():
        os.kill(pid, 9)


def _verbs(calls):
    return [" ".join(c[2:4]) if c[0] == "compute" else " ".join(c[:2]) for c in calls]


# A venv whose pod-check answers ok at once (the check itself is tested on its own).
QUICK_CHECK = '[[ "$*" == *--platform=* ]] && { echo "ok: checked"; exit 0; }'


def _venv(home, python: str, pre: str = ""):
    """A worker's ~/vitpod-venv/bin/python that runs `python` (skipping the real setup); the
    project's venv gets this checkout's vitpod first on its path, as the wheel pod-setup builds
    from it would be (its own editable install may point at another checkout)."""
    bin_dir = home / "vitpod-venv" / "bin"
    bin_dir.mkdir(parents=True)
    checkout = f"export PYTHONPATH={shlex.quote(str(ROOT))}" if python == str(
        ROOT / ".venv" / "bin" / "python") else ""
    (bin_dir / "python").write_text(f"#!/bin/bash\n{pre}\n{checkout}\n"
                                    f"exec {shlex.quote(python)} \"$@\"\n")
    (bin_dir / "python").chmod(0o755)
    (home / "vitpod-check.py").write_bytes((ROOT / "deploy" / "worker_check.py").read_bytes())
    (home / "vitpod-worker.sh").write_bytes((ROOT / "deploy" / "worker.sh").read_bytes())
    (home / "vitpod-probe.py").write_bytes((ROOT / "deploy" / "worker_probe.py").read_bytes())


@pytest.mark.parametrize("capacity,flags", [("spot", ["--spot"]), ("reserved", ["--reserved"]),
                                            ("on-demand", [])])
def test_create_asks_for_a_queued_resource_and_waits_until_active(cloud, capacity, flags):
    cloud.set(wait_polls=2, provision_polls=1)
    result = cloud.pod("create", CAPACITY=capacity)
    assert result.returncode == 0, result.stderr
    creates = [c for c in cloud.state()["calls"] if c[3:4] == ["create"]]
    assert creates == [["compute", "tpus", "queued-resources", "create", "vp", "--node-id=vp",
                        "--accelerator-type=v4-16", "--runtime-version=tpu-ubuntu2204-base",
                        *flags, "--project=proj", "--zone=us-central2-b"]]
    states = [line.split("] ")[1] for line in result.stdout.splitlines() if "] vp: " in line]
    assert states == ["vp: NOT_FOUND", "vp: WAITING_FOR_RESOURCES", "vp: PROVISIONING",
                      "vp: ACTIVE", "vp: 2 worker(s) of v4-16"]
    assert all(line.startswith("[pod 20") for line in result.stdout.splitlines())


def test_an_active_slice_is_reused(cloud):
    assert cloud.pod("create").returncode == 0
    result = cloud.pod("create")
    assert result.returncode == 0 and "vp: ACTIVE" in result.stdout
    assert _verbs(cloud.state()["calls"]).count("queued-resources create") == 1


def test_failed_creation_is_reported_deleted_and_asked_for_again(cloud):
    reason = "Insufficient capacity for spot v4-16 in us-central2-b"
    cloud.set(fail_creations=[reason])
    result = cloud.pod("create")
    assert result.returncode == 0, result.stderr
    assert f"vp FAILED: {reason}; deleted it, asking again (1/3)" in result.stdout
    verbs = [v for v in _verbs(cloud.state()["calls"]) if "describe" not in v]
    assert verbs == ["queued-resources create", "queued-resources delete",
                     "queued-resources create"]
    delete = [c for c in cloud.state()["calls"] if c[3:4] == ["delete"]][0]
    assert "--force" in delete and "vp: DELETING" in result.stdout


def test_creation_that_keeps_failing_stops_with_its_reason(cloud):
    cloud.set(fail_creations=["quota exceeded"] * 5)
    result = cloud.pod("create", MAX_RETRIES="1")
    assert result.returncode == 1
    assert result.stderr.strip() == "error: vp FAILED 2 times, last: quota exceeded"


def test_waiting_for_capacity_times_out(cloud):
    cloud.set(wait_polls=10**6)
    result = cloud.pod("create", WAIT_TIMEOUT="0.5")
    assert result.returncode == 1
    assert "still WAITING_FOR_RESOURCES after 0.5 s (no capacity yet)" in result.stderr


def test_fallback_types_give_way_when_one_waits_too_long(cloud):
    cloud.set(capacity_limits={"v4-32": 0})  # no v4-32 to be had
    result = cloud.pod("create", TPU_TYPES="v4-32,v4-16@europe-west4-a", QUEUE_TIMEOUT="1",
                       POLL_SECONDS="0.2")
    assert result.returncode == 0, result.stderr
    creates = [c for c in cloud.state()["calls"] if c[3:4] == ["create"]]
    assert [(c[6], c[-1]) for c in creates] == [
        ("--accelerator-type=v4-32", "--zone=us-central2-b"),
        ("--accelerator-type=v4-16", "--zone=europe-west4-a")]
    assert "--valid-until-duration=1s" in creates[0]
    assert ("v4-32 waited 1 s for capacity; asking for v4-16 instead" in result.stdout
            or "v4-32 FAILED: the request expired" in result.stdout)
    assert ("warning: zone europe-west4-a is outside the bucket's region us-central2: reading "
            "the data there costs egress") in result.stdout
    assert "vp: 2 worker(s) of v4-16" in result.stdout


def test_a_failed_describe_is_retried_and_never_read_as_a_preemption(cloud):
    assert cloud.pod("create").returncode == 0
    cloud.set(describe_errors=2)
    result = cloud.pod("status")
    assert result.returncode == 0 and result.stdout.strip().endswith("vp: ACTIVE")
    assert "auth tokens" in result.stdout  # each retry says why
    cloud.set(describe_errors=2 + 10)
    result = cloud.pod("watch")
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot read the state of vp after 3 tries (ERROR:")
    assert "left as it is (not treated as preempted)" in result.stderr
    assert "queued-resources delete" not in _verbs(cloud.state()["calls"])


@pytest.mark.parametrize("change,seen", [
    ({"state": "SUSPENDED"}, "queued resource SUSPENDED"),
    ({"node_gone": True}, "node NOT_FOUND"),
])
def test_watch_notices_a_lost_slice(cloud, change, seen):
    assert cloud.pod("create").returncode == 0
    cloud.edit("vp", **change)
    result = cloud.pod("watch")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].endswith(f"watch: {seen}")


def test_the_image_python_refuses_venv_like_googles_images(cloud):
    assert cloud.pod("create").returncode == 0
    result = cloud.gcloud("compute", "tpus", "tpu-vm", "ssh", "vp", "--worker=all",
                          "--command=python3 --version && python3 -m venv v", "--zone=z")
    assert result.returncode == 1
    assert result.stdout.count("Python 3.10.") == 2
    assert "ensurepip is not\navailable" in result.stderr
    assert "apt install python3.10-venv" in result.stderr
    assert not (cloud.home("vp", 0) / "v" / "bin" / "python").exists()


def test_pod_check_names_each_failing_worker_and_why(cloud):
    cloud.set(chips_per_host=4)
    assert cloud.pod("create", TPU_TYPE="v4-24").returncode == 0  # 12 chips: 3 workers
    project = str(ROOT / ".venv" / "bin" / "python")
    _venv(cloud.home("vp", 0), image.python310())
    _venv(cloud.home("vp", 1), os.path.realpath(os.path.join(sys.base_prefix, "bin", "python3")))
    _venv(cloud.home("vp", 2), project, "export XLA_FLAGS=--xla_force_host_platform_device_count=2")
    result = cloud.pod("check", TPU_TYPE="v4-24", PYTHON_VERSION=platform.python_version())
    assert result.returncode == 1
    lines = {line.split("] ", 1)[0]: line for line in result.stdout.splitlines()}
    assert "Python 3.10" in lines["[w0"] and "not the 3.11" in lines["[w0"]
    assert "cannot import vitpod (ModuleNotFoundError" in lines["[w1"]
    assert "JAX sees 2 local devices, the slice implies 4 per worker" in lines["[w2"]
    assert result.stderr.strip() == ("error: pod-check failed on worker(s) 0, 1, 2 "
                                     "(reasons above)")
    for i in range(3):
        _venv_replace(cloud.home("vp", i), project)
    result = cloud.pod("check", TPU_TYPE="v4-24", PYTHON_VERSION=platform.python_version())
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok: Python") == 3
    assert "pod-check: all 3 worker(s) ok, 4 cpu devices each; worker 0's coordinator port " \
        f"{cloud.port} reachable from every worker" in result.stdout
    assert f"[w0] ok: port {cloud.port} free here, 2 worker(s) connected" in result.stdout


def _venv_replace(home, python):
    import shutil

    shutil.rmtree(home / "vitpod-venv")
    _venv(home, python)


def test_a_first_gcloud_on_a_machine_makes_its_ssh_key_before_the_parallel_calls(cloud):
    """gcloud makes ~/.ssh/google_compute_engine on its first ssh; parallel first calls race
    ("already exists"): one call goes first, alone."""
    assert cloud.pod("create", TPU_TYPE="v4-32").returncode == 0  # 4 workers
    project = str(ROOT / ".venv" / "bin" / "python")
    for i in range(4):
        _venv(cloud.home("vp", i), project, QUICK_CHECK)
    fresh = cloud.dir / "fresh-home"
    fresh.mkdir()
    result = cloud.pod("check", HOME=str(fresh), TPU_TYPE="v4-32")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "already exists" not in result.stdout and "retry" not in result.stdout
    assert "no ~/.ssh/google_compute_engine yet: one ssh to worker 0 first" in result.stdout
    assert (fresh / protocol.GCLOUD_SSH_KEY).exists()
    state = cloud.state()
    assert state["keys_made"] == 1 and "keygen_races" not in state
    first, *others = [c for c in state["calls"] if c[3:4] in (["ssh"], ["scp"])]
    assert first[4:6] == ["vp", "--worker=0"] and "--command=true" in first
    assert sorted(c[5] for c in others) == sorted([f"--worker={i}" for i in range(4)] * 2)


def test_pod_check_names_who_holds_the_tpu_and_free_tpu_stops_them(cloud):
    assert cloud.pod("create").returncode == 0
    project = str(ROOT / ".venv" / "bin" / "python")
    for i in (0, 1):
        _venv(cloud.home("vp", i), project)
    lock = cloud.home("vp", 1) / "tmp" / "libtpu_lockfile"  # the rehearsal's /tmp/libtpu_lockfile
    lock.parent.mkdir()
    lock.write_text("")
    with holding_open(cloud.home("vp", 1) / "dev" / "accel2") as holder:
        held = cloud.pod("check", PYTHON_VERSION=platform.python_version())
        assert held.returncode == 1, held.stdout
        assert f"[w1] FAILED: the TPU is held by pid {holder.pid} ({sys.executable} " in \
            held.stdout
        assert "pass FREE_TPU=1 to stop them, or stop them yourself" in held.stdout
        assert held.stderr.strip() == "error: pod-check failed on worker(s) 1 (reasons above)"
        assert holder.poll() is None and lock.exists()
        freed = cloud.pod("check", PYTHON_VERSION=platform.python_version(), FREE_TPU="1")
        assert freed.returncode == 0, freed.stdout + freed.stderr
        assert holder.wait(timeout=10) == -signal.SIGTERM
        assert f"[w1] ok: Python {platform.python_version()}, vitpod " in freed.stdout
        assert f"stopped pid {holder.pid} (" in freed.stdout
        assert f"removed {lock}" in freed.stdout and not lock.exists()
        assert "[w0] ok: " in freed.stdout and "no other process holds the TPU" in freed.stdout


def test_pod_launch_with_free_tpu_stops_who_holds_the_tpu_first(cloud, gcs, tmp_path):
    assert cloud.pod("create").returncode == 0
    settings = _hung_trainers(cloud, gcs, tmp_path, "free-tpu")
    with holding_open(cloud.home("vp", 0) / "dev" / "accel0") as holder:
        launched = cloud.pod("launch", FREE_TPU="1", **settings)
        assert launched.returncode == 0, launched.stdout + launched.stderr
        assert holder.wait(timeout=10) == -signal.SIGTERM
        assert f"[w0] ok: stopped pid {holder.pid} (" in launched.stdout
        assert "[w1] ok: no other process holds the TPU" in launched.stdout
        lines = launched.stdout.splitlines()
        freed = [n for n, line in enumerate(lines) if "which held the TPU" in line]
        started = [n for n, line in enumerate(lines) if "podworker start" in line or
                   "started, process group" in line]
        assert freed and started and max(freed) < min(started)


def _quickly_checked(cloud, workers=2):
    assert cloud.pod("create", TPU_TYPE=f"v4-{8 * workers}").returncode == 0
    for i in range(workers):
        _venv(cloud.home("vp", i), str(ROOT / ".venv" / "bin" / "python"), QUICK_CHECK)


def test_pod_check_names_the_workers_that_cannot_reach_the_coordinator_port(cloud):
    """A network whose firewall lets JAX's coordinator port through to no one: worker 0's
    address answers nothing (RFC 5737's TEST-NET-1 in the simulated describe)."""
    _quickly_checked(cloud, workers=3)
    cloud.set(unreachable_coordinator=True)
    start = time.monotonic()
    result = cloud.pod("check", TPU_TYPE="v4-24")
    assert result.returncode == 1, result.stdout
    assert result.stderr.strip() == (
        f"error: worker(s) 1, 2 cannot reach worker 0 (192.0.2.1) on the coordinator port "
        f"{cloud.port}: open it (gcloud compute firewall-rules create vitpod-coordinator "
        f"--project=proj --network=default --allow=tcp:{cloud.port} --source-ranges=127.0.0.0/8)"
        ", or set COORDINATOR_PORT to a port the network allows")
    assert f"[w1] FAILED: cannot reach worker 0 at 192.0.2.1:{cloud.port} within 15 s (" in \
        result.stdout
    assert f"[w0] FAILED: listened on port {cloud.port} for 20 s: 0 of 2 worker(s) " \
        "connected" in result.stdout
    assert time.monotonic() - start < 60


def test_pod_check_says_when_the_coordinator_port_is_taken_on_worker_0(cloud):
    _quickly_checked(cloud)
    stranger = socket.create_server(("", int(cloud.port)))  # a listener vitpod did not start
    try:
        result = cloud.pod("check")
    finally:
        stranger.close()
    assert result.returncode == 1, result.stdout
    assert result.stderr.strip() == (
        f"error: port {cloud.port} (COORDINATOR_PORT) is in use on worker 0: a stale process may "
        "hold it (a trainer vitpod did not stop?); stop it, or set COORDINATOR_PORT to a free port")
    assert f"[w0] FAILED: port {cloud.port} is in use here" in result.stdout


def test_a_worker_set_up_before_the_probe_existed_is_told_to_set_up_again(cloud):
    _quickly_checked(cloud)
    for i in (0, 1):
        (cloud.home("vp", i) / "vitpod-probe.py").unlink()
    result = cloud.pod("check")
    assert result.returncode == 1, result.stdout
    assert "[w1] FAILED: no ~/vitpod-probe.py: run make pod-setup" in result.stdout
    assert result.stderr.strip() == ("error: the coordinator probe failed on worker(s) 0, 1 "
                                     "(reasons above)")


def test_pod_logs_of_all_workers_are_prefixed_by_their_index(cloud):
    assert cloud.pod("create").returncode == 0
    for i in range(2):
        (cloud.home("vp", i) / "vitpod.log").write_text(f"step {i}\nlast line of worker {i}\n")
    result = cloud.pod("logs", WORKER="all")
    assert result.returncode == 0, result.stderr
    lines = sorted(result.stdout.splitlines())
    assert lines == ["[w0] last line of worker 0", "[w0] step 0", "[w1] last line of worker 1",
                     "[w1] step 1"]


def test_pod_check_without_setup_says_to_run_it(cloud):
    assert cloud.pod("create").returncode == 0
    result = cloud.pod("check")
    assert result.returncode == 1
    assert "[w1] FAILED: vitpod was never set up here: run make pod-setup" in result.stdout


def test_a_slice_recreated_under_its_name_is_reached_despite_new_host_keys(cloud):
    """A node made anew under the same name has new host keys: a client that checks them (gcloud's
    default once it has connected) refuses every worker, so every ssh and scp passes no."""
    assert cloud.pod("create").returncode == 0
    assert "[w1] FAILED: vitpod was never set up here" in cloud.pod("check").stdout
    assert cloud.pod("delete").returncode == 0
    assert cloud.pod("create").returncode == 0
    plain = cloud.gcloud("compute", "tpus", "tpu-vm", "ssh", "vp", "--worker=1", "--command=true",
                         "--zone=z")
    assert plain.returncode == 255
    assert "@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @" in plain.stderr
    assert plain.stderr.strip().endswith("Host key verification failed.")
    again = cloud.pod("check")
    assert "Host key verification failed" not in again.stdout
    for i in (0, 1):
        assert f"[w{i}] FAILED: vitpod was never set up here" in again.stdout
    calls = [c for c in cloud.state()["calls"] if c[3:4] in (["ssh"], ["scp"])]
    assert all("--strict-host-key-checking=no" in c for c in calls if "--command=true" not in c)


@pytest.mark.parametrize("broken,expected", [
    (None, "starting the trainer failed on worker(s) 1 (reasons above)"),
    ('[[ "$1 $2" == "-m vitpod.train" ]] && exec sleep 600',
     "worker(s) 1 started, but the trainer never got to joining the job within "
     "READY_TIMEOUT=30 s; stopped the others"),
])
def test_a_worker_that_does_not_start_stops_the_others(cloud, gcs, tmp_path, colors, broken,
                                                       expected):
    assert cloud.pod("create").returncode == 0
    project = str(ROOT / ".venv" / "bin" / "python")
    _venv(cloud.home("vp", 0), project)
    if broken:
        _venv(cloud.home("vp", 1), project, broken)
    (cloud.home("vp", 0) / "vitpod-configs").mkdir()
    (cloud.home("vp", 1) / "vitpod-configs").mkdir()
    # Copies fail at first, as right after ACTIVE while ssh keys propagate: retried.
    cloud.set(worker_env=gcs.env(), scp_failures=0 if broken else 2)
    flags = f"--config.data.train_dir={colors / 'train'}"
    bucket = f"launch-{int(time.time() * 1000)}"
    gcs.create_bucket(bucket)
    result = cloud.pod("launch", WORKDIR=f"gs://{bucket}/run",
                       # Long enough for worker 0's trainer to import JAX on a loaded machine.
                       READY_TIMEOUT="30", TRAIN_FLAGS=flags, **gcs.env())
    assert result.returncode == 1, result.stdout
    assert result.stderr.strip() == f"error: {expected}"
    assert "stopping the trainer on every worker (by pid file)" in result.stdout
    if not broken:
        assert "gcloud tpu-vm scp failed (ERROR: (gcloud.compute.tpus.tpu-vm.scp)" in \
            result.stdout and "retry 1/3" in result.stdout
    assert "[w0] worker 0: stopped the earlier trainer" in result.stdout
    assert cloud.processes() == []


@pytest.mark.parametrize("port", ["", "8476"])
def test_the_launch_line_sets_the_coordinator_port_and_init_timeout(cloud, port):
    env = cloud.env(DRY_RUN="1", COORDINATOR_PORT=port, INIT_TIMEOUT="900")
    if not port:  # JAX's default, written out all the same
        del env["COORDINATOR_PORT"]
    result = subprocess.run([sys.executable, "-m", "deploy.tpu_vm", "launch"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "podworker start" in line]
    assert len(lines) == 2  # one per worker of the v4-16
    line = lines[0]
    assert "--strict-host-key-checking=no" in shlex.split(line)
    command = shlex.split(shlex.split(line)[-3].removeprefix("--command="))
    assert f"JAX_COORDINATOR_PORT={port or 8482}" in command
    assert "VITPOD_INIT_TIMEOUT=900" in command


def test_bad_slice_settings_are_named(cloud):
    result = cloud.pod("create", DRY_RUN="1", NUM_SLICES="2,zero", COORDINATOR_PORT="70000",
                       FREE_TPU="yes")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: NUM_SLICES='2,zero': use a number of slices >= 1, or several, most wanted first "
        "(4,2,1)", "error: FREE_TPU='yes': use 1 (stop the processes that hold the TPU) or 0",
        "error: COORDINATOR_PORT='70000': not a TCP port"]


def test_hostile_values_stay_single_arguments(cloud):
    evil = "x; touch /tmp/pwned-$(id -u) `reboot` 'q\" $HOME"
    result = cloud.pod("launch", DRY_RUN="1", WORKDIR=f"gs://b/{evil}",
                       TRAIN_FLAGS=f"--config.note={shlex.quote(evil)}")
    assert result.returncode == 0, result.stderr
    ssh = [shlex.split(line) for line in result.stdout.splitlines() if "podworker start" in line]
    command = ssh[0][-3].removeprefix("--command=")
    train = shlex.split(command)
    assert train[train.index("--") + 1:] == [
        "vitpod-venv/bin/python", "-m", "vitpod.train", "--config=vitpod-configs/tiny.py",
        f"--workdir=gs://b/{evil}", "--expect_platform=cpu", "--expect_devices=8",
        f"--config.note={evil}"]
    assert "JAX_PLATFORMS=cpu" in train and "VITPOD_WORKER=0" in train
    assert cloud.state()["calls"] == []  # dry run: nothing was called


def test_bad_settings_fail_in_one_line(cloud):
    result = cloud.pod("create", CAPACITY="cheap")
    assert result.stderr.strip().startswith("error: CAPACITY='cheap': use one of spot")
    result = cloud.pod("create", TPU_TYPE="v9-8")
    assert "TPU_TYPE='v9-8': set RUNTIME_VERSION too" in result.stderr
    result = cloud.pod("run", WORKDIR="runs/local")
    assert result.stderr.strip() == ("error: WORKDIR='runs/local': use a gs:// path; a worker's "
                                     "disk dies with the slice")


def test_pod_run_checks_the_config_on_every_slice_type_before_creating_any(cloud):
    """A batch that the fallback's device count does not divide would be found only after
    that slice was created, set up and billed: pod-run refuses before calling gcloud."""
    result = cloud.pod("run", TPU_TYPES="v4-16,v4-32", TRAIN_FLAGS="--config.batch_size=24 "
                       "--config.data.train_dir=gs://bkt/data --profile=1:2")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: preflight: the config does not fit v4-32 (16 devices): config batch_size=24 is "
        "not divisible by the 16 devices of the mesh; use a multiple of 16 (nothing created)")
    assert "preflight: v4-16: ok on 8 devices (mesh data=8 x fsdp=1), 3 rows per device per " \
        "step" in result.stdout
    assert cloud.state()["calls"] == []
    fits = cloud.pod("run", DRY_RUN="1", TPU_TYPES="v4-16,v4-32",
                     TRAIN_FLAGS="--config.batch_size=32 --config.data.train_dir=gs://bkt/data")
    assert fits.returncode == 0, fits.stderr
    assert "preflight: v4-32: ok on 16 devices (mesh data=16 x fsdp=1), 2 rows per device " \
        "per step" in fits.stdout


def test_pod_run_checks_the_config_on_every_slice_count_too(cloud):
    """NUM_SLICES=2,1: the batch must divide over two slices' devices as well as one's."""
    result = cloud.pod("run", NUM_SLICES="2,1", TRAIN_FLAGS="--config.batch_size=24 "
                       "--config.data.train_dir=gs://bkt/data")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: preflight: the config does not fit 2xv4-16 (16 devices): config batch_size=24 "
        "is not divisible by the 16 devices of the mesh; use a multiple of 16 (nothing "
        "created)")
    assert cloud.state()["calls"] == []


def test_a_multislice_request_names_its_node_count_and_prefix(cloud):
    result = cloud.pod("create", DRY_RUN="1", NUM_SLICES="2")
    assert result.returncode == 0, result.stderr
    [create] = [shlex.split(line) for line in result.stdout.splitlines()
                if "queued-resources create" in line]
    assert "--node-count=2" in create and "--node-prefix=vp" in create
    assert not [a for a in create if a.startswith("--node-id")]
    launch = cloud.pod("launch", DRY_RUN="1", NUM_SLICES="2")
    assert launch.returncode == 0, launch.stderr
    starts = [shlex.split(line) for line in launch.stdout.splitlines() if "podworker start" in line]
    assert sorted((s[5], s[6]) for s in starts) == [("vp-0", "--worker=0"), ("vp-0", "--worker=1"),
                                                    ("vp-1", "--worker=0"), ("vp-1", "--worker=1")]
    assert all("--expect_devices=16" in s[-3] and "VITPOD_TPU_TYPE=2xv4-16" in s[-3]
               for s in starts)


def test_make_passes_values_as_typed_and_dry_run_prints_the_create_request(tmp_path):
    """`$(shell ...)` in a value given to make is text, not a command (DRY_RUN=1 included),
    and a dry pod-create prints the queued-resources create command it would send."""
    planted = tmp_path / "planted"
    result = subprocess.run(
        ["make", "-s", "pod-create", "DRY_RUN=1", f"POD_ENV={os.devnull}", "PROJECT=p",
         "ZONE=z", "NAME=n", "TPU_TYPE=v4-8", f"WORKDIR=gs://b/$(shell touch {planted})"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert not planted.exists()
    assert ("gcloud compute tpus queued-resources create n --node-id=n --accelerator-type=v4-8 "
            "--runtime-version=tpu-ubuntu2204-base --spot --project=p --zone=z") in result.stdout


def test_make_pod_launch_dry_run_connects_whatever_the_host_keys(tmp_path):
    """Every ssh and scp that `make pod-launch` would send accepts a changed host key."""
    result = subprocess.run(
        ["make", "-s", "pod-launch", "DRY_RUN=1", f"POD_ENV={os.devnull}", "PROJECT=p", "ZONE=z",
         "NAME=n", "TPU_TYPE=v4-8", "WORKDIR=gs://b/run", "CONFIG=configs/tiny.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    lines = [shlex.split(line) for line in result.stdout.splitlines()
             if line.startswith("gcloud compute tpus tpu-vm ")]
    assert {line[4] for line in lines} == {"scp", "ssh"}
    assert all("--strict-host-key-checking=no" in line for line in lines)


def _hung_trainers(cloud, gcs, tmp_path, bucket):
    """Workers whose trainer gets ready at once, then hangs; the launch settings for them."""
    hung = tmp_path / "hung_trainer.py"
    hung.write_text("import sys, time\nfrom vitpod.workdir.markers import mark\n"
                    "workdir = [a for a in sys.argv if a.startswith('--workdir=')][0][10:]\n"
                    "mark(workdir, 'joining')\nmark(workdir, 'ready')\n"
                    "print('step 1, then a collective that never returns', flush=True)\n"
                    "time.sleep(600)\n")
    project = str(ROOT / ".venv" / "bin" / "python")
    for i in (0, 1):
        _venv(cloud.home("vp", i), project,
              f'[[ "$1 $2" == "-m vitpod.train" ]] && exec {project} {hung} "$@"')
        (cloud.home("vp", i) / "vitpod-configs").mkdir()
    cloud.set(worker_env=gcs.env())
    bucket = f"{bucket}-{int(time.time() * 1000)}"
    gcs.create_bucket(bucket)
    return dict(WORKDIR=f"gs://{bucket}/run", **gcs.env())


def test_watch_stops_a_launch_whose_record_stops_moving(cloud, gcs, tmp_path):
    """Trainers that got ready and then hang (a collective waiting forever) would bill the
    slice until someone looks: no change of the launch record for STALL_TIMEOUT is a crash."""
    assert cloud.pod("create").returncode == 0
    settings = dict(_hung_trainers(cloud, gcs, tmp_path, "stall"), STALL_TIMEOUT="3")
    launched = cloud.pod("launch", **settings)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    watched = cloud.pod("watch", **settings)
    assert watched.returncode == 1, watched.stdout
    error = watched.stderr.strip()
    assert error.startswith("error: no progress for 3 s (STALL_TIMEOUT): launch ")
    assert "record.json was never written; the trainers look hung, stopped them" in error
    assert "[w1] step 1, then a collective that never returns" in watched.stdout
    assert cloud.processes() == []
