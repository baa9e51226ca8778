"""`make gke-sim`: gke-run of a two-slice JobSet (2 x v4-16: 2 pods x 4 fake devices per
slice in the order libtpu gives a v4-16's chips, one jax.distributed job over all 4 pods found
by JAX's own GKE detection), every node
pool preempted at step 25, the JobSet restarted once: the run finishes with the losses of an
uninterrupted run of the same global batch, and no pod process is left.

Not part of `make test`: CI runs it as its own serial step (`make test-gke-sim`).
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


def test_a_jobset_of_two_slices_preempted_restarts_and_matches_an_uninterrupted_run(tmp_path):
    digits = ROOT / "data" / "digits"
    assert (digits / "train").is_dir(), "make test-gke-sim prepares data/digits first"
    sim_dir = tmp_path / "sim"
    env = {**os.environ, "SIM_DIR": str(sim_dir), "TPU_TYPE": "v4-16", "NUM_SLICES": "2",
           "CONFIG": "configs/demo.py", "TRAIN_FLAGS": " ".join(FLAGS), "PREEMPT_AT_STEP": "25",
           "SIM_CACHE_DIR": str(ROOT / "runs" / "pod-sim" / "cache")}
    sim = subprocess.run([sys.executable, "-m", "deploy.sim.gkesim"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1200)
    out, cloud = sim.stdout, (sim_dir / "cloud.log").read_text()
    assert sim.returncode == 0, (out + sim.stderr)[-5000:] + cloud[-3000:]
    for stage in ("jobset.jobset.x-k8s.io/vitpod-sim created",
                  "4 pod(s) of vitpod-sim started",
                  "the JobSet restarted its Jobs (1/3 restarts)",
                  "exists: training finished at step 60",
                  "deleted the JobSet vitpod-sim and its pods"):
        assert stage in out, stage + "\n" + out[-3000:]
    assert re.search(r"jobset vitpod-sim: node pools preempted at step \d+", cloud), cloud
    assert "jobset vitpod-sim: attempt 1: 4 pod(s) started" in cloud, cloud
    assert "[gke-sim] DONE: 60 steps, 1 restart(s), 1 preemption(s)" in out, out[-2000:]
    assert "still ran after gke-run" not in sim.stderr

    workdir = sim_dir / "workdir"
    assert json.loads((workdir / "DONE").read_text())["step"] == 60
    logs = "".join(p.read_text() for p in (sim_dir / "pods").glob("*/log"))
    assert "host 0 of 4 holds batch rows 0-7,16-23,32-39,48-55" in logs, logs[-3000:]
    simulated, uninterrupted = read_losses(workdir), uninterrupted_losses()
    assert sorted(simulated) == sorted(uninterrupted) == list(range(1, 61))
    # The same global batch on 16 devices as 2 slices of 2 pods, or on 8 as 2 processes: the same
    # losses up to the order of float sums.
    np.testing.assert_allclose([simulated[s] for s in range(1, 61)],
                               [uninterrupted[s] for s in range(1, 61)], rtol=1e-4, atol=1e-5)
