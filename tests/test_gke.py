"""GKE, the trainer's side: joining the job on a GKE pod, the exit code of a preempted run."""

import os
import signal
import subprocess
import sys

import jax
import pytest

from tests.conftest import ROOT
from vitpod import distributed
from vitpod.workdir import protocol


# --- In the pod --------------------------------------------------------------------------------
@pytest.mark.parametrize("hosts, joins", [("h0.js,h1.js,h2.js,h3.js", True),
                                          ("localhost", False), (None, False)])
def test_a_gke_pod_of_a_multi_host_slice_joins_the_job(monkeypatch, hosts, joins):
    calls = []
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.delenv(protocol.SIM_WORKER0_ENV, raising=False)
    monkeypatch.setenv(protocol.INIT_TIMEOUT_ENV, "900")
    if hosts is None:
        monkeypatch.delenv(protocol.WORKER_HOSTNAMES_ENV, raising=False)
    else:
        monkeypatch.setenv(protocol.WORKER_HOSTNAMES_ENV, hosts)
    distributed.initialize()
    assert calls == ([{"initialization_timeout": 900}] if joins else [])


def test_a_preempted_trainer_exits_with_the_code_the_jobset_restarts(colors, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "vitpod.train", "--config=configs/tiny.py",
         f"--workdir={tmp_path}", f"--config.data.train_dir={colors / 'train'}",
         f"--config.data.val_dir={colors / 'val'}", "--config.total_steps=400",
         f"--exit_code_if_preempted={42}"], cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "step 3/400" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 42, out[-3000:]
    assert "preempted at step" in out and not (tmp_path / "DONE").exists()
