"""A worker's readiness markers in the workdir (`WORKDIR/launches/LAUNCH/worker-N.MARKER`),
written by the trainer (joining, ready) and by its supervisor (started, exited) when
`make pod-launch` or the GKE JobSet started them; without that environment nothing is marked.
"""

import json
import os
import socket
import time

from vitpod import protocol, storage


def mark(workdir: str, marker: str, **info) -> None:
    """Write this worker's `marker` (one of protocol.MARKERS) as JSON, with `info`."""
    launch_id, worker = os.environ.get(protocol.LAUNCH_ENV), os.environ.get(protocol.WORKER_ENV)
    if not launch_id or worker is None:
        return
    info = {"worker": int(worker), "host": socket.gethostname(), "time": time.time(), **info}
    storage.write_text(protocol.marker_path(workdir, launch_id, worker, marker), json.dumps(info))
