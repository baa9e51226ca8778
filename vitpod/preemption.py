"""Agreeing on when to stop and save: preemption (SIGTERM) and wall-clock save intervals.

With jax.distributed initialised (every multi-host run, and TPU VMs), JAX's preemption
notifier catches SIGTERM and `reached_preemption_sync_point(step)` is True on every host at
the same step. Without it (a plain local run) a SIGTERM handler of our own does the same
for the one process.
"""

import signal
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class Preemption:
    """`reached(step)` is True, on every host at the same step, once a SIGTERM arrived."""

    def __init__(self):
        self.distributed = jax.distributed.is_initialized()
        self.signalled = False
        self._previous = None
        if not self.distributed:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

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
