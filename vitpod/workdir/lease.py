"""The workdir's lease: one run at a time trains in a workdir.

Process 0 of a run holds WORKDIR/lease.json (launch id, host, pid, a heartbeat time that a
background thread refreshes) from before the restore until it exits. Another run finds a
fresh heartbeat and is refused. A lease is taken over, with a warning, when its heartbeat is
older than `lease_timeout_minutes` or its process on this host is gone (a run killed
outright); one whose heartbeat merely missed a few beats is waited on until it is either.
Every write is conditional on the lease being as it was read (a bucket object's generation;
locally the holder's token, compared under an flock of the workdir), so two runs racing for
a stale lease cannot both win. Process 0 decides and every process learns the outcome.
"""

import contextlib
import fcntl
import json
import math
import os
import secrets
import socket
import threading
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from vitpod import distributed, gcs, protocol, storage
from vitpod.errors import UserError


class _Conflict(Exception):
    """The lease changed since it was read."""


def _gone_here(holder: dict) -> bool:
    """Whether the holder ran on this host and its process no longer exists (or its pid now
    belongs to a process started later)."""
    if holder.get("host") != socket.gethostname() or not holder.get("pid"):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    ticks = protocol.process_start_ticks(holder["pid"])
    return None not in (ticks, holder.get("pid_start")) and ticks != holder["pid_start"]


class Lease:
    """WORKDIR/lease.json, held by this process (`take`, `release`, a heartbeat thread)."""

    def __init__(self, workdir: str, timeout_seconds: float):
        self.workdir, self.timeout = workdir, timeout_seconds
        self.path = protocol.lease_path(workdir)
        self.interval = min(30.0, timeout_seconds / 4)
        self.version = None  # what a conditional write expects to find
        self.lost = ""  # set when the heartbeat found another run holding the lease
        self.me = {"launch": protocol.this_launch(time.time(), os.getpid()),
                   "host": socket.gethostname(), "pid": os.getpid(),
                   "pid_start": protocol.process_start_ticks(os.getpid()),
                   "token": secrets.token_hex(8)}
        self._stop = threading.Event()
        self._thread = None

    # -- conditional reads and writes: (content or None, version) --
    def _read(self) -> tuple[dict | None, object]:
        if storage.is_gcs(self.path):
            data, generation = gcs.read_versioned(self.path)
            return (None if data is None else self._parse(data)), generation
        try:
            holder = self._parse(storage.read_bytes(self.path))
        except storage.NotFound:
            return None, None
        return holder, holder.get("token")

    @staticmethod
    def _parse(data: bytes) -> dict:
        try:
            holder = json.loads(data)
        except ValueError:
            holder = None
        if protocol.mismatch(holder, protocol.LEASE_SHAPE):
            # cut short by a crash mid-write, or not a lease: one nobody refreshes
            return {"launch": "?", "host": "?", "heartbeat": 0}
        return holder

    def _write(self, content: dict | None, expected) -> object:
        """Replace (None: delete) the lease if it is still as `expected`; its new version."""
        if storage.is_gcs(self.path):
            data = None if content is None else json.dumps(content).encode()
            try:
                return gcs.write_if_unchanged(self.path, data, expected)
            except gcs.Changed:  # a retried request may find its own first try's write
                now, generation = self._read()
                if now == content:
                    return generation
                raise _Conflict() from None
        with _flock(self.workdir):
            if self._read()[1] != expected:
                raise _Conflict()
            if content is None:
                os.remove(self.path)
                return None
            storage.write_text(self.path, json.dumps(content))
            return content["token"]

    # -- the protocol --
    def take(self) -> None:
        """Hold the lease, or UserError naming the run that holds it.

        A heartbeat more than two intervals ahead of this host's clock (a holder whose clock
        was wrong) is aged from when this launch first saw it: unchanged for the timeout, it
        is stale; changing meanwhile, its run is alive. Otherwise it would lock the workdir
        out for as long as the clocks differ."""
        waited, ahead_seen = False, {}  # heartbeat ahead of this clock -> first seen (monotonic)
        while True:
            holder, version = self._read()
            heartbeat = (holder or {}).get("heartbeat", 0)
            ahead = 0.0 if math.isnan(heartbeat) else heartbeat - time.time()
            if ahead > 2 * self.interval:
                age = time.monotonic() - ahead_seen.setdefault(heartbeat, time.monotonic())
                old = f"{ahead:.0f} s ahead of this host's clock, unchanged for {age:.0f} s"
            else:
                age = max(0.0, -ahead)  # clocks differ by a little: a fresh heartbeat
                old = f"{age:.0f} s old"
            if holder is None or age > self.timeout or _gone_here(holder):
                if holder is not None:
                    why = (f"its process {holder.get('pid')} on this host is gone"
                           if _gone_here(holder) else f"its heartbeat is {old}")
                    logging.warning("taking over the lease on %s from launch %s on %s: %s",
                                    self.workdir, holder.get("launch"), holder.get("host"), why)
                try:
                    self.version = self._write(self._content(), version)
                    break
                except _Conflict:
                    continue  # another run moved first: look again
            beating = len(ahead_seen) > 1  # a heartbeat ahead of this clock that moves on
            if beating or (ahead <= 2 * self.interval and age < 2 * self.interval):
                old = f"{ahead:.0f} s ahead of this host's clock" if beating else old
                raise UserError(
                    f"workdir {self.workdir} is in use by launch {holder.get('launch')} on "
                    f"host {holder.get('host')} (pid {holder.get('pid')}), whose heartbeat is "
                    f"{old}; wait for that run to end or stop it, or use another "
                    "--workdir (a lease unrefreshed for lease_timeout_minutes is taken over)")
            if not waited:
                why = (f"has a heartbeat {ahead:.0f} s ahead of this host's clock" if ahead_seen
                       else f"missed its heartbeats for {age:.0f} s")
                logging.warning("the lease on %s (launch %s on %s) %s: waiting up to %.0f s "
                                "more for it to go stale", self.workdir, holder.get("launch"),
                                holder.get("host"), why, self.timeout - age)
                waited = True
            time.sleep(min(self.interval, max(0.5, self.timeout - age)))
        self._thread = threading.Thread(target=self._beat, name="vitpod-lease", daemon=True)
        self._thread.start()

    def _content(self) -> dict:
        return {**self.me, "heartbeat": time.time()}

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.version = self._write(self._content(), self.version)
            except _Conflict:
                holder, _ = self._read()
                self.lost = (f"launch {(holder or {}).get('launch')} on "
                             f"{(holder or {}).get('host')}")
                logging.error("lost the lease on %s to %s; this run stops at its next log row",
                              self.workdir, self.lost)
                return
            except (UserError, OSError) as e:  # a failed heartbeat: the next one may pass
                logging.warning("could not refresh the lease on %s: %s", self.workdir, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost or self.version is None:
            return
        try:
            self._write(None, self.version)
        except (_Conflict, UserError, OSError) as e:
            logging.warning("could not release the lease on %s (%s); the next run takes it "
                            "over once it is stale", self.workdir, type(e).__name__)


@contextlib.contextmanager
def _flock(folder: str):
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def held(workdir: str, timeout_minutes: float):
    """Process 0 holds the workdir's lease inside this block; every process raises the same
    refusal (distributed.primary_first). Yields a check for the training loop's log rows."""
    lease = Lease(workdir, timeout_minutes * 60) if jax.process_index() == 0 else None
    try:  # a SIGTERM at start-up may stop the run right after take(): release then too
        distributed.primary_first(lease.take if lease else lambda: None,
                                  "take the workdir's lease")
        yield lambda: _check(lease)
    finally:
        if lease is not None:
            lease.release()


def _check(lease: Lease | None) -> None:
    """UserError on every process once process 0's heartbeat found the lease taken over."""
    lost = np.int32(bool(lease and lease.lost))
    if jax.process_count() > 1:
        lost = multihost_utils.broadcast_one_to_all(lost)
    if lost:
        raise UserError(f"another run ({lease.lost if lease else 'see process 0'}) took over "
                        "the lease on this workdir after this run's heartbeat failed; "
                        "stopped without saving so that one run writes it")
