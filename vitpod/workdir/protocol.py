"""The launch protocol: what a launcher (deploy/) and the trainers on its workers agree on.

A launch has an id (a UTC timestamp); each worker learns it, its index and the slice type from
the environment the launcher sets, and writes markers to `WORKDIR/launches/LAUNCH/` as it goes
(`worker-N.started|joining|ready|exited`), its log to `WORKDIR/logs/LAUNCH/worker-N.log`.
Process 0 keeps the launch's goodput in `record.json` beside them; pod-run adds `pod.json`.
Standard library only: deploy/ imports it under a plain python3, without vitpod's dependencies.
Paths join with '/', which serves local paths and gs:// alike.
"""

import os
import posixpath
import time

# The environment every launcher sets for the trainer on each worker. JAX_PLATFORMS (JAX's own)
# makes JAX fail instead of falling back to the CPU.
PLATFORMS_ENV = "JAX_PLATFORMS"
LAUNCH_ENV = "VITPOD_LAUNCH_ID"
WORKER_ENV = "VITPOD_WORKER"
SLICE_ENV = "VITPOD_TPU_TYPE"
# JAX's coordinator port (JAX reads it itself; its default, jax/_src/clusters/cluster.py) and
# how long jax.distributed waits for every host (vitpod passes it on).
COORDINATOR_PORT_ENV = "JAX_COORDINATOR_PORT"
DEFAULT_COORDINATOR_PORT = 8482
INIT_TIMEOUT_ENV = "VITPOD_INIT_TIMEOUT"
# Set by the TPU runtime on every host of a multislice job; JAX reads them itself.
NUM_SLICES_ENV = "MEGASCALE_NUM_SLICES"
SLICE_ID_ENV = "MEGASCALE_SLICE_ID"
SLICE_COORDINATOR_ENV = "MEGASCALE_COORDINATOR_ADDRESS"
# Set by GKE on each pod of a multi-host TPU slice (the slice's hosts, comma-separated), with
# TPU_WORKER_ID; JAX's GKE detection reads them itself.
WORKER_HOSTNAMES_ENV = "TPU_WORKER_HOSTNAMES"
# What a TPU VM's metadata server tells JAX about its own slice, where there is none: only the
# rehearsal sets these (the host of the slice's worker 0, the slice's host count, this host's
# index in the slice).
SIM_WORKER0_ENV = "VITPOD_SIM_WORKER0"
SIM_HOSTS_ENV = "VITPOD_SIM_HOSTS"
SIM_WORKER_ID_ENV = "VITPOD_SIM_WORKER_ID"

# A TPU host's chips as device files (v4: /dev/accel*; v5e, v5p, v6e: /dev/vfio/*) and the lock
# file libtpu leaves behind; the rehearsal, which has no chips, sets SIM_ROOT_ENV to a folder of
# each worker's that holds stand-ins at the same paths (FOLDER/dev/accel0 ...).
TPU_DEVICE_GLOBS = ("/dev/accel*", "/dev/vfio/*")
LIBTPU_LOCKFILE = "/tmp/libtpu_lockfile"
SIM_ROOT_ENV = "VITPOD_SIM_ROOT"

# A worker's readiness, in the order it is reached.
STARTED, JOINING, READY, EXITED = "started", "joining", "ready", "exited"
MARKERS = (STARTED, JOINING, READY, EXITED)

# In the workdir.
DONE = "DONE"
LEASE = "lease.json"  # held by process 0 of the run that trains in the workdir
LAUNCHES, LOGS = "launches", "logs"
RECORD = "record.json"
POD_TIMELINE = "pod.json"
_WORKER_PREFIX = "worker-"

# In each worker's home.
VENV = "vitpod-venv"
LOG = "vitpod.log"
PIDFILE = "vitpod.pid"
CONFIGS = "vitpod-configs"
WORKER_SCRIPT = "vitpod-worker.sh"
CHECK_SCRIPT = "vitpod-check.py"
PROBE_SCRIPT = "vitpod-probe.py"
CONSTRAINTS = "vitpod-constraints.txt"


# In the home of whoever runs gcloud: the ssh key gcloud makes on its first ssh or scp.
GCLOUD_SSH_KEY = ".ssh/google_compute_engine"

def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts)


def new_launch_id(now: float | None = None) -> str:
    """The id a launcher gives a launch: its UTC start, to the second (sorts by time)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))


def unlaunched_id(start_time: float, pid: int) -> str:
    """The id of a run no launcher started (a plain `train`): its start and its pid."""
    return f"{new_launch_id(start_time)}-{pid}"


def this_launch(start_time: float, pid: int) -> str:
    """This process's launch: the launcher's id, else one of its own."""
    return os.environ.get(LAUNCH_ENV) or unlaunched_id(start_time, pid)


def process_start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22); None when
    it is gone. Pid files and the lease record it, to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def launch_env(launch_id: str, worker: int, slice_type: str, coordinator_port: int,
               init_timeout: float) -> dict[str, str]:
    return {LAUNCH_ENV: launch_id, WORKER_ENV: str(worker), SLICE_ENV: slice_type,
            COORDINATOR_PORT_ENV: str(coordinator_port), INIT_TIMEOUT_ENV: f"{init_timeout:g}"}


def sim_metadata_env(worker0_host: str, hosts: int, worker: int) -> dict[str, str]:
    return {SIM_WORKER0_ENV: worker0_host, SIM_HOSTS_ENV: str(hosts),
            SIM_WORKER_ID_ENV: str(worker)}


def tpu_device_globs(env: dict) -> list[str]:
    """The patterns of this host's TPU device files."""
    return [env.get(SIM_ROOT_ENV, "") + pattern for pattern in TPU_DEVICE_GLOBS]


def libtpu_lockfile(env: dict) -> str:
    return env.get(SIM_ROOT_ENV, "") + LIBTPU_LOCKFILE

def slices_env(slices: int, slice_id: int, coordinator_host: str) -> dict[str, str]:
    return {NUM_SLICES_ENV: str(slices), SLICE_ID_ENV: str(slice_id),
            SLICE_COORDINATOR_ENV: coordinator_host}


def done_path(workdir: str) -> str:
    return join(workdir, DONE)


def lease_path(workdir: str) -> str:
    return join(workdir, LEASE)


def launches_dir(workdir: str) -> str:
    return join(workdir, LAUNCHES)


def launch_dir(workdir: str, launch_id: str) -> str:
    return join(workdir, LAUNCHES, launch_id)


def record_path(workdir: str, launch_id: str) -> str:
    return join(launch_dir(workdir, launch_id), RECORD)


def timeline_path(workdir: str, launch_id: str) -> str:
    return join(launch_dir(workdir, launch_id), POD_TIMELINE)


def marker_path(workdir: str, launch_id: str, worker: int | str, marker: str) -> str:
    return join(launch_dir(workdir, launch_id), f"{_WORKER_PREFIX}{worker}.{marker}")


def parse_marker(path: str) -> tuple[int, str] | None:
    """(worker, marker) of a marker's path or file name; None for any other file."""
    stem, _, marker = path.rstrip("/").rsplit("/", 1)[-1].partition(".")
    index = stem.removeprefix(_WORKER_PREFIX)
    if marker in MARKERS and stem.startswith(_WORKER_PREFIX) and index.isdigit():
        return int(index), marker
    return None


def launch_of(workdir: str, path: str) -> str:
    """The launch id in a path below `WORKDIR/launches/`; '' for any other path."""
    prefix = launches_dir(workdir).rstrip("/") + "/"
    return path[len(prefix):].split("/", 1)[0] if path.startswith(prefix) else ""


def log_dir(workdir: str, launch_id: str) -> str:
    return join(workdir, LOGS, launch_id)


def log_path(workdir: str, launch_id: str, worker: int | str) -> str:
    return join(log_dir(workdir, launch_id), f"{_WORKER_PREFIX}{worker}.log")
