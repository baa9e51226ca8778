"""`make gke-run` against the rehearsal's simulated kubectl and JobSet controller, with pods that
are small scripts instead of trainers: a restart the run resumes from, DONE, a JobSet that
fails with the failing pod's log, a manifest the API server refuses, the pods' environment."""

import json
import os
import signal
import sys
import time

import pytest

from deploy import job
from deploy.gke import jobset
from deploy.gke import run as gke_run
from deploy.gke.settings import GkeSettings
from deploy.settings import load_settings
from deploy.shell import DeployError
from deploy.sim import cloud_state

BUILD = jobset.build  # the real one: the tests patch it in deploy.gke.run
POD = r"""
import json, os, pathlib, signal, sys, time
work = pathlib.Path(os.environ["STUB_WORKDIR"])
worker = int(os.environ["MEGASCALE_SLICE_ID"]) * 2 + int(os.environ["TPU_WORKER_ID"])
env = {k: v for k, v in os.environ.items() if k.startswith(("TPU_", "MEGASCALE_", "JAX_", "XLA"))}
(work / f"env-{worker}.json").write_text(json.dumps(env))
print(f"worker {worker} up", flush=True)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))
plan = os.environ["STUB_PLAN"]
if plan == "restart-then-done":
    if (work / "restarted").exists():
        time.sleep(3)  # gke-run sees the restart before DONE
        if worker == 0:
            (work / "DONE").write_text(json.dumps({"step": 7}))
        sys.exit(0)
    if worker == 0:
        time.sleep(0.5)
        (work / "restarted").write_text("")
        sys.exit(42)
if plan == "crash" and worker == 1:
    print("ValueError: a bad config", flush=True)
    sys.exit(3)
time.sleep(120)
"""


class Bucket:
    """`gcloud storage ls|cat` on a local folder standing for gs://bkt/run."""

    def __init__(self, folder):
        self.folder, self.sleep = folder, time.sleep

    def call(self, verb, what, url, **kw):
        path = self.folder / url.removeprefix("gs://bkt/run/")
        if not path.exists():
            return 1, "", "ERROR: One or more URLs matched no objects."
        return 0, path.read_text() if what == "cat" else url, ""


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    sim = tmp_path / "sim"
    (sim / "bin").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    monkeypatch.setenv("SIM_DIR", str(sim))
    monkeypatch.setenv("PATH", f"{sim / 'bin'}:{os.environ['PATH']}")
    cloud_state.install_shim(str(sim / "bin"), "kubectl", "deploy.sim.kubectl")
    (sim / "scenario.json").write_text(json.dumps({"image_root": str(tmp_path / "image"),
                                                   "worker_env": {}}))
    monkeypatch.setattr(job, "preflight", lambda *a, **kw: None)
    monkeypatch.setattr(gke_run.GkeRun, "report", lambda self: print("report"))
    yield tmp_path
    for pid in cloud_state.node_processes():
        os.kill(pid, signal.SIGKILL)


def make_run(tmp_path, monkeypatch, plan, build=BUILD, **env):
    def stub_build(s):
        doc = build(s)
        (container,) = doc["spec"]["replicatedJobs"][0]["template"]["spec"]["template"][
            "spec"]["containers"]
        container["command"] = [sys.executable, "-c", POD]
        container["env"] += [{"name": "STUB_PLAN", "value": plan},
                             {"name": "STUB_WORKDIR", "value": str(tmp_path / "work")}]
        return doc

    monkeypatch.setattr(gke_run.jobset, "build", stub_build)
    settings = load_settings(os.devnull, {
        "NAME": "vit-run", "TPU_TYPE": "v5litepod-8", "NUM_SLICES": "2", "WORKDIR":
        "gs://bkt/run", "CONFIG": "configs/demo.py", "IMAGE": "img", "POLL_SECONDS": "0.3",
        "GRACE_SECONDS": "5", "MAX_RETRIES": "2", "READY_TIMEOUT": "60", **env},
        GkeSettings)
    return gke_run.GkeRun(settings, gcloud=Bucket(tmp_path / "work"))


def test_a_restarted_jobset_runs_to_done_and_is_deleted(cluster, monkeypatch, capsys):
    make_run(cluster, monkeypatch, "restart-then-done").run()
    out = capsys.readouterr().out
    for line in ("jobset.jobset.x-k8s.io/vit-run created", "4 pod(s) of vit-run started",
                 "the JobSet restarted its Jobs (1/2 restarts)",
                 "training finished at step 7", "report", "deleted the JobSet vit-run"):
        assert line in out, out
    log = (cluster / "sim" / "cloud.log").read_text()
    assert "attempt 1: 4 pod(s) started" in log and "jobset vit-run: deleted" in log
    assert cloud_state.node_processes() == []
    env = json.loads((cluster / "work" / "env-3.json").read_text())
    assert env == {"TPU_WORKER_HOSTNAMES": "127.0.0.1,127.0.0.1", "TPU_WORKER_ID": "1",
                   "MEGASCALE_NUM_SLICES": "2", "MEGASCALE_SLICE_ID": "1",
                   "MEGASCALE_COORDINATOR_ADDRESS": "127.0.0.1", "JAX_FORCE_TPU_INIT": "1",
                   "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_PORT": "8482",
                   "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}


def test_a_crash_fails_the_jobset_in_one_line_with_the_pods_log(cluster, monkeypatch, capsys):
    with pytest.raises(DeployError) as failed:
        make_run(cluster, monkeypatch, "crash").run()
    message = str(failed.value)
    assert message.startswith("the JobSet failed (FailedJobs: applying FailJobSet failure "
                              'policy rule "failOnNonRestartableExit": job vit-run-slice-0: pod '
                              "vit-run-slice-0-1-"), message
    assert "exit code 3 (PodFailurePolicy)" in message and "w1 exit 3" in message
    assert "deleted the JobSet" in message and "\n" not in message
    out = capsys.readouterr().out
    assert "[w1] ValueError: a bad config" in out, out
    assert cloud_state.node_processes() == []


def test_the_simulated_api_server_refuses_a_misspelt_field(cluster, monkeypatch):
    def misspelt(s):
        doc = BUILD(s)
        doc["spec"]["failurePolicy"]["maxRestart"] = 3
        return doc

    with pytest.raises(DeployError, match=r"kubectl apply refused the JobSet: The JobSet "
                                       r"\"vit-run\" is invalid: .*'maxRestart' is not a field"):
        make_run(cluster, monkeypatch, "crash", build=misspelt).run()


def test_gke_logs_prefixes_each_pods_lines_with_its_worker(cluster, monkeypatch, capsys):
    run = make_run(cluster, monkeypatch, "idle", WORKER="all")
    run.apply()
    run.wait_running(4)
    deadline = time.monotonic() + 30
    while len(list((cluster / "work").glob("env-*.json"))) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    capsys.readouterr()
    run.logs()
    assert capsys.readouterr().out.splitlines() == [f"[w{i}] worker {i} up" for i in range(4)]
    run.delete()
    assert cloud_state.node_processes() == []


def test_a_jobset_that_makes_no_progress_is_stopped_as_hung(cluster, monkeypatch, capsys):
    with pytest.raises(DeployError, match=r"no progress for 5 s \(STALL_TIMEOUT\): the newest "
                                       r"launch record was never written; the trainers look "
                                       r"hung \(log tails above\); deleted the JobSet"):
        make_run(cluster, monkeypatch, "idle", STALL_TIMEOUT="5").run()
    assert "[w3] worker 3 up" in capsys.readouterr().out
    assert cloud_state.node_processes() == []


def test_a_spot_run_without_timed_saves_is_warned_in_one_line(monkeypatch, capsys):
    def settings(**env):
        return load_settings(os.devnull, {"NAME": "vit-run", "TPU_TYPE": "v5litepod-8",
                                          "WORKDIR": "gs://bkt/run", "CONFIG": "configs/demo.py",
                                          "IMAGE": "img", "DRY_RUN": "1", **env}, GkeSettings)

    flags = "--config.save_every_minutes"
    assert gke_run.save_every_minutes(settings(TRAIN_FLAGS=f"{flags}=0 {flags}=15")) == 15
    assert gke_run.save_every_minutes(settings(TRAIN_FLAGS=f"{flags} 0")) == 0
    assert gke_run.save_every_minutes(settings(CONFIG="configs/vit_s16_i1k.py")) == 15
    assert gke_run.save_every_minutes(settings()) == 0  # configs/demo.py: the default, off
    monkeypatch.setattr(job, "preflight", lambda *a, **kw: None)

    def warnings(**env):
        gke_run.GkeRun(settings(**env)).run()
        return [line for line in capsys.readouterr().out.splitlines() if "warning:" in line]

    (line,) = warnings(CAPACITY="spot")
    assert line.endswith("warning: CAPACITY=spot: a spot node gives its pods about 15 s, not "
                         "GRACE_SECONDS, so a preemption may lose every step since the last "
                         "save; set save_every_minutes (TRAIN_FLAGS="
                         "--config.save_every_minutes=15) to bound that"), line
    assert warnings(CAPACITY="spot", TRAIN_FLAGS=f"{flags}=10") == []
    assert warnings(CAPACITY="reserved") == []
