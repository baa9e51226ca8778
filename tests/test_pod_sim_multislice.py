"""`make pod-sim NUM_SLICES=2,1`: pod-run of a two-slice job (2 x v4-16, 2 workers x 4 fake
devices each, one jax.distributed job over both), one slice preempted, no capacity for two
slices after it: the run comes back on one slice and finishes, with the losses of an
uninterrupted run of the same global batch.

Not part of `make test`: CI runs it as its own serial step (`make test-pod-sim-multislice`).
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REHEARSAL_FLAGS, ROOT, read_losses, uninterrupted_losses

FLAGS = REHEARSAL_FLAGS
pytestmark = pytest.mark.podsim


def test_two_slices_lose_one_come_back_on_one_and_match_an_uninterrupted_run(tmp_path):
    digits = ROOT / "data" / "digits"
    assert (digits / "train").is_dir(), "make test-pod-sim-multislice prepares data/digits first"
    sim_dir = tmp_path / "sim"
    # Capacity for 3 slices in all: 2 at first, then 1 (two would wait past QUEUE_TIMEOUT).
    env = {**os.environ, "SIM_DIR": str(sim_dir), "TPU_TYPE": "v4-16", "NUM_SLICES": "2,1",
           "QUEUE_TIMEOUT": "5", "SIM_CAPACITY": "v4-16=3", "CONFIG": "configs/demo.py",
           "TRAIN_FLAGS": " ".join(FLAGS), "PREEMPT_AT_STEP": "25",
           "SIM_CACHE_DIR": str(ROOT / "runs" / "pod-sim" / "cache")}
    sim = subprocess.run([sys.executable, "-m", "deploy.sim.podsim"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1500)
    out, cloud = sim.stdout, (sim_dir / "cloud.log").read_text()
    assert sim.returncode == 0, (out + sim.stderr)[-5000:] + cloud
    for stage in ("asking for vitpod-sim: 2 x v4-16", "vitpod-sim: 4 worker(s) of 2 x v4-16",
                  "pod-check: slice 1: workers 2-3 ok", "all 4 worker(s) ready",
                  "slice lost (node vitpod-sim-1 of 2 slices PREEMPTED)",
                  "stopping the trainers of the slices still there",
                  "vitpod-sim: 2 worker(s) of v4-16", "all 2 worker(s) ready"):
        assert stage in out, stage + "\n" + out[-3000:]
    assert ("2 x v4-16 waited 5 s for capacity; asking for v4-16 instead" in out
            or "2 x v4-16 FAILED: the request expired" in out), out[-3000:]
    assert re.search(r"vitpod-sim-1: preempted at step \d+: SIGTERM", cloud), cloud
    assert "[pod-sim] DONE: 60 steps, 1 preemption(s) survived, on 2 x v4-16 (2 workers " \
        "each) then v4-16 (2 workers)" in out, out[-2000:]

    workdir = sim_dir / "workdir"
    records = [json.loads((p / "record.json").read_text())
               for p in sorted((workdir / "launches").iterdir())]
    assert [(r["slice"], r["hosts"], r["devices"]) for r in records] == [
        ("2xv4-16", 4, 16), ("v4-16", 2, 8)]
    # Every slice stopped at the step the preempted one's trainers agreed on, and saved it.
    first = sorted((workdir / "logs").iterdir())[0]
    stops = {re.search(r"preempted at step (\d+), checkpoint saved", (first / f"worker-{i}.log")
                       .read_text()).group(1) for i in range(4)}
    assert len(stops) == 1 and records[1]["start_step"] == int(stops.pop())
    # 2 x v4-16 on the hybrid mesh: hosts 0,1 alternate in slice 0, 2,3 in slice 1.
    assert "host 0 of 4 holds batch rows 0-7,16-23,32-39,48-55" in (
        first / "worker-0.log").read_text()
    assert "host 3 of 4 holds batch rows 72-79,88-95,104-111,120-127" in (
        first / "worker-3.log").read_text()

    simulated, uninterrupted = read_losses(workdir), uninterrupted_losses()
    assert sorted(simulated) == sorted(uninterrupted) == list(range(1, 61))
    # Same global batch on 16 devices of two slices, then on 8 of one: the same losses up to
    # the order of float sums.
    np.testing.assert_allclose([simulated[s] for s in range(1, 61)],
                               [uninterrupted[s] for s in range(1, 61)], rtol=1e-4, atol=1e-5)
