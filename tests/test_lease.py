"""vitpod/workdir/lease.py: one run per workdir. A stale lease is taken over and a fresh one
refused, on local disk and in a bucket; a heartbeat from a clock ahead of this host's is
judged by whether it moves. (Two trainers on one workdir, end to end: test_faults.)"""

import json
import re
import threading
import time

import pytest

from tests.conftest import write_lease
from vitpod import protocol, storage
from vitpod.workdir import lease


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_a_stale_lease_is_taken_over_and_a_fresh_one_refused(where, tmp_path, request,
                                                             caplog):
    workdir = str(tmp_path)
    if where == "bucket":
        request.getfixturevalue("gcs").create_bucket("vitpod-lease")
        workdir = "gs://vitpod-lease/run"
    path = protocol.lease_path(workdir)
    storage.write_text(path, json.dumps({"launch": "gone", "host": "elsewhere", "pid": 1,
                                         "heartbeat": time.time() - 181}))
    mine = lease.Lease(workdir, 180)
    mine.take()
    # 181 s old when written; a loaded machine may take a few seconds to get here
    assert re.search(r"taking over the lease on \S+ from launch gone on elsewhere: its "
                     r"heartbeat is 18\d s old", caplog.text), caplog.text
    assert json.loads(storage.read_text(path))["token"] == mine.me["token"]
    other = lease.Lease(workdir, 180)
    with pytest.raises(Exception, match=r"is in use by launch .* whose heartbeat is 0 s old"):
        other.take()
    mine.release()
    assert not storage.exists(path)
    other.take()  # free again
    other.release()


def test_a_heartbeat_ahead_of_the_clock_that_moves_on_is_a_live_run(tmp_path):
    stop = threading.Event()

    def beat():  # a live holder whose clock is an hour ahead
        while not stop.wait(0.2):
            write_lease(tmp_path, time.time() + 3600)

    write_lease(tmp_path, time.time() + 3600)
    beating = threading.Thread(target=beat, daemon=True)
    beating.start()
    try:
        with pytest.raises(Exception, match=r"is in use by launch skewed on host elsewhere \(pid "
                           r"1\), whose heartbeat is 3\d\d\d s ahead of this host's clock; "):
            lease.Lease(str(tmp_path), 3).take()
    finally:
        stop.set()
        beating.join()
