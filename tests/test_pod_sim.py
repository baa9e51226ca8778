"""`make pod-sim`: pod-run rehearsed end to end on a simulated v4-16 (2 workers x 4 fake
devices) with one preemption, against an uninterrupted 2-process run of the same config.

Not part of `make test`: CI runs it as its own serial step (`make test-pod-sim`), since it
installs vitpod on every simulated worker and runs three training jobs.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REHEARSAL_FLAGS, ROOT, read_losses, uninterrupted_losses

FLAGS = REHEARSAL_FLAGS
pytestmark = pytest.mark.podsim


def test_pod_sim_survives_a_preemption_and_matches_an_uninterrupted_run(tmp_path):
    digits = ROOT / "data" / "digits"
    assert (digits / "train").is_dir(), "make test-pod-sim prepares data/digits first"
    # Another run's trainer on this machine: a pattern like `pkill -f vitpod.train` would kill it.
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1200)",
                              "vitpod.train", "--workdir=someone-elses-run"])
    sim_dir = tmp_path / "sim"
    env = {**os.environ, "SIM_DIR": str(sim_dir), "TPU_TYPE": "v4-16",
           "CONFIG": "configs/demo.py", "TRAIN_FLAGS": " ".join(FLAGS), "PREEMPT_AT_STEP": "25",
           # The package caches outlive the test: a rerun installs on the workers from them.
           "SIM_CACHE_DIR": str(ROOT / "runs" / "pod-sim" / "cache")}
    try:
        sim = subprocess.run([sys.executable, "-m", "deploy.sim.podsim"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=1500)
        assert decoy.poll() is None, "the rehearsal killed a process of another run"
    finally:
        decoy.kill()
    log = sim.stdout + sim.stderr
    assert sim.returncode == 0, log[-5000:]
    summary = [line for line in sim.stdout.splitlines() if line.startswith("[pod-sim] DONE")]
    assert summary and summary[0].startswith(
        "[pod-sim] DONE: 60 steps, 1 preemption(s) survived, on v4-16 (2 workers) then v4-16 "
        "(2 workers); workdir copied to "), log[-3000:]
    for stage in ("WAITING_FOR_RESOURCES", "PROVISIONING", "DELETING", "deleted",
                  "all 2 worker(s) ready", "pod-check: all 2 worker(s) ok, 4 cpu devices each"):
        assert stage in sim.stdout, stage
    # Seen during the notice, the node reads PREEMPTED; seen after it, the queued resource
    # reads SUSPENDED. Either is the lost slice, and the trainers' save survives both.
    assert ("slice lost (queued resource SUSPENDED)" in sim.stdout
            or "slice lost (node PREEMPTED)" in sim.stdout), sim.stdout[-3000:]
    assert "2 launch(es) (preempted, done)" in sim.stdout, sim.stdout[-3000:]
    # SUSPENDING lasts only until the trainers have saved and exited: a watcher polling every
    # second may see it or not (a real one, every 60 s, mostly not), so the cloud's side says it.
    cloud = (sim_dir / "cloud.log").read_text()
    assert re.search(r"preempted at step \d+: SIGTERM to \d+ processes, SUSPENDING", cloud), cloud
    assert "SUSPENDED, node gone\n" in cloud, cloud  # every trainer exited within the grace

    workdir = sim_dir / "workdir"
    assert json.loads((workdir / "DONE").read_text())["step"] == 60
    launches = sorted(p.name for p in (workdir / "launches").iterdir())
    assert len(launches) == 2
    first_logs = [(workdir / "logs" / launches[0] / f"worker-{i}.log").read_text()
                  for i in range(2)]
    stops = {re.search(r"preempted at step (\d+), checkpoint saved", t).group(1)
             for t in first_logs}
    assert len(stops) == 1  # both workers agreed on the step they saved
    assert "resuming from the checkpoint of step " + stops.pop() in (
        workdir / "logs" / launches[1] / "worker-0.log").read_text()
    # In a v4-16's device order (libtpu's v4:2x2x2) the two hosts' rows alternate.
    assert "host 0 of 2 holds batch rows 0-15,32-47,64-79,96-111" in first_logs[0]
    assert "host 1 of 2 holds batch rows 16-31,48-63,80-95,112-127" in first_logs[1]

    simulated, uninterrupted = read_losses(workdir), uninterrupted_losses()
    assert sorted(simulated) == sorted(uninterrupted) == list(range(1, 61))
    # The same global batch, its rows on other devices than the reference's process order:
    # the same losses up to the order of float sums.
    for step, loss in uninterrupted.items():
        assert simulated[step] == pytest.approx(loss, rel=1e-4, abs=1e-5), step


def test_pod_sim_comes_back_on_a_smaller_slice_and_reports_its_goodput(tmp_path):
    """A v4-32 (4 workers) preempted, no v4-32 to be had after it: the run goes on on the
    fallback v4-16 (2 workers) and finishes; the report counts both launches."""
    sim_dir = tmp_path / "sim"
    env = {**os.environ, "SIM_DIR": str(sim_dir), "TPU_TYPES": "v4-32,v4-16",
           "QUEUE_TIMEOUT": "5", "SIM_CAPACITY": "v4-32=1", "CONFIG": "configs/demo.py",
           "TRAIN_FLAGS": " ".join(FLAGS), "PREEMPT_AT_STEP": "25",
           "PRICE_PER_CHIP_HOUR": "1.5",
           "SIM_CACHE_DIR": str(ROOT / "runs" / "pod-sim" / "cache")}
    sim = subprocess.run([sys.executable, "-m", "deploy.sim.podsim"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1500)
    assert sim.returncode == 0, (sim.stdout + sim.stderr)[-5000:]
    out = sim.stdout
    assert "vitpod-sim: 4 worker(s) of v4-32" in out
    assert "v4-32 waited 5 s for capacity; asking for v4-16 instead" in out or (
        "v4-32 FAILED: the request expired" in out)
    assert "vitpod-sim: 2 worker(s) of v4-16" in out
    report = [line for line in out.splitlines() if line.startswith("[w0]")]
    # the report, run on worker 0 at the end
    assert any("2 launch(es) (preempted, done)" in line for line in report), (
        "\n".join(report) or out[-3000:]) + "\n" + (sim_dir / "cloud.log").read_text()
    assert "on v4-32 (4 workers) then v4-16 (2 workers)" in out
    records = [json.loads((p / "record.json").read_text())
               for p in sorted((sim_dir / "workdir" / "launches").iterdir())]
    assert [(r["slice"], r["hosts"], r["devices"]) for r in records] == [
        ("v4-32", 4, 16), ("v4-16", 2, 8)]
    assert records[1]["start_step"] == records[0]["end"]["step"] >= 25
    done = json.loads((sim_dir / "workdir" / "DONE").read_text())
    assert done["step"] == 60 and done["goodput"]["launches"] == 2
    assert done["goodput"]["between_launches_seconds"] >= 5  # the wait for the v4-32
    # pod-run's own timeline splits that gap: the 5 s queue, then the v4-16's set-up
    timeline = json.loads((sim_dir / "workdir" / "launches" / sorted(
        p.name for p in (sim_dir / "workdir" / "launches").iterdir())[1] / "pod.json").read_text())
    assert timeline["slice"] == "v4-16" and timeline["new_slice"]
    assert done["goodput"]["waiting_for_slice_seconds"] >= 5
    assert done["goodput"]["setting_up_seconds"] > 0
    assert (done["goodput"]["waiting_for_slice_seconds"] + done["goodput"]["setting_up_seconds"]
            <= done["goodput"]["between_launches_seconds"])
    assert any("of which waiting for a slice" in line for line in report), "\n".join(report)
