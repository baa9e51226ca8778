"""deploy/worker_check.py, pod-check's one line on a worker: who holds the TPU."""

import sys

from tests.conftest import holding_open
from vitpod import protocol


def test_the_tpu_holders_are_found_without_lsof(tmp_path, monkeypatch):
    from deploy import worker_check

    (tmp_path / "dev" / "vfio").mkdir(parents=True)
    (tmp_path / "dev" / "vfio" / "0").write_text("")
    monkeypatch.setenv(protocol.SIM_ROOT_ENV, str(tmp_path))
    monkeypatch.setattr(worker_check.shutil, "which", lambda name: None)
    assert worker_check.tpu_holders() == []
    with holding_open(tmp_path / "dev" / "vfio" / "0") as holder:
        [(pid, command)] = worker_check.tpu_holders()
        assert pid == holder.pid and command.startswith(f"{sys.executable} -c import time")
        assert len(command) <= 80
