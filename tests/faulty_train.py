"""`python -m vitpod.train` with checkpoint restores failing on one process (tests only).

    VITPOD_TEST_RESTORE_FAULT=PROCESS:TRIES python -m vitpod.local_hosts \
        --module=tests.faulty_train ...

The first TRIES restores of process PROCESS raise OSError, as a flaky disk or bucket would;
the other processes restore normally.
"""

import os
import sys

import orbax.checkpoint as ocp

from vitpod import checkpoint, cli, train


def main() -> None:
    process, tries = map(int, os.environ["VITPOD_TEST_RESTORE_FAULT"].split(":"))
    me = next((int(a.split("=")[1]) for a in sys.argv if a.startswith("--process_id=")), 0)
    if me == process:
        original, calls = ocp.StandardCheckpointHandler.restore, [0]

        def failing(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] <= tries:
                raise OSError(5, "injected I/O error")
            return original(self, *args, **kwargs)

        ocp.StandardCheckpointHandler.restore = failing
    checkpoint.RESTORE_BACKOFF_SECONDS = 0.1
    train.define_flags()
    cli.run(train.main)


if __name__ == "__main__":
    main()
