"""Agreeing on when to stop and save: preemption (SIGTERM) and wall-clock save intervals.

With jax.distributed initialised (every multi-host run, and TPU VMs), JAX's preemption
notifier catches SIGTERM and `reached_preemption_sync_point(step)` is True on every host at
the same step. Without it (a plain local run) a SIGTERM handler of our own does the same
for the one process. Before that handler takes over (the scan, the lease, the restore),
a SIGTERM there stops the run at once: nothing is trained yet, so there is nothing to save.
"""

import contextlib
import signal
import threading
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class Stopped(BaseException):
    """A SIGTERM before training began. Not an Exception, so that no retry loop or broad
    `except Exception` (a restore's tries) takes it for an error to handle."""


_training = [False]  # whether a Preemption took SIGTERM over in this run


@contextlib.contextmanager
def stop_before_training():
    """Within, until a Preemption takes over, a SIGTERM in a plain single-process run raises
    Stopped where the main thread is, and the `with` blocks it leaves release what they hold
    (the workdir's lease). After the Preemption closed the run is ending, having saved: a
    SIGTERM then is logged and the run ends as it would have. Multi-process runs have JAX's
    notifier from the start (jax.distributed)."""
    if jax.distributed.is_initialized() or threading.current_thread() is not \
            threading.main_thread():
        yield
        return

    def on_sigterm(signum, frame) -> None:
        if not _training[0]:
            raise Stopped()
        logging.warning("got SIGTERM while the run ends; it exits once done")

    _training[0] = False
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Preemption:
    """`reached(step)` is True, on every host at the same step, once a SIGTERM arrived."""

    def __init__(self):
        self.distributed = jax.distributed.is_initialized()
        self.signalled = False
        self._previous = None
        if not self.distributed:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            _training[0] = True

    def _on_sigterm(self, signum, frame) -> None:
        logging.warning("got SIGTERM: will save a checkpoint at the next step and exit")
        self.signalled = True

    def reached(self, step: int) -> bool:
        if self.distributed:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signalled

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class SaveClock:
    """Whether `minutes` have passed since the last save, as process 0 sees it."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self.last = time.monotonic()

    def saved(self) -> None:
        self.last = time.monotonic()

    def due(self) -> bool:
        if not self.seconds:
            return False
        mine = np.int32(time.monotonic() - self.last >= self.seconds)
        if jax.process_count() > 1:  # process 0's clock decides for every host
            mine = multihost_utils.broadcast_one_to_all(mine)
        return bool(mine)
