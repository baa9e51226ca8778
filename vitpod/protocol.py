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
# Where a rehearsal runs on CPU devices: the order the rehearsed TPU type's mesh puts its hosts'
# chips in (JSON from vitpod.device_order), so the CPU mesh interleaves hosts as the chips do.
DEVICE_ORDER_ENV = "VITPOD_SIM_DEVICE_ORDER"

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


# The shapes of the JSON files above, for `mismatch`: a type (float also takes an integer), a
# tuple of alternatives, a one-item list (every item has that shape), or a dict of the keys
# that must be there ('?' at the end: may be absent) and their shapes; other keys may be there.
NULL = type(None)
LEASE_SHAPE = {"heartbeat": float, "launch?": str, "host?": str, "pid?": int,
               "pid_start?": (int, NULL)}
_AT = {"step": int, "time": float}
RECORD_SHAPE = {"launch": str, "start_time": float, "start_step": int,
                "end": (NULL, {**_AT, "how": str}), "progress?": (NULL, _AT),
                "first_step_seconds?": (NULL, float), "restore_seconds?": float,
                "steps_redone?": int, "hosts?": int, "devices?": int,
                "checkpointed?": (NULL, int)}
TIMELINE_SHAPE = {"asked": float, "active": float, "set_up": float}
DONE_SHAPE = {"step": int, "stopped?": str, "eval/accuracy?": float, "eval/count?": int}
_KINDS = {dict: "an object", list: "a list", str: "a string", int: "an integer",
          float: "a number", bool: "true or false", NULL: "null"}


def mismatch(value, shape, where: str = "") -> str | None:
    """How a parsed JSON value differs from `shape` (None when it fits), naming the key:
    '"end.step" is a string, not an integer', or 'a list, not an object' for the whole."""
    if isinstance(shape, tuple):
        same = [s for s in shape if _same_kind(value, s)]
        if not same:
            return _differs(value, " or ".join(_kind_of(s) for s in shape), where)
        found = [mismatch(value, s, where) for s in same]
        return None if None in found else found[0]
    if not _same_kind(value, shape):
        return _differs(value, _kind_of(shape), where)
    if isinstance(shape, dict):
        for key, sub in shape.items():
            name = key.removesuffix("?")
            path = f"{where}.{name}" if where else name
            if name not in value:
                if not key.endswith("?"):
                    return f'"{path}" is missing'
            elif found := mismatch(value[name], sub, path):
                return found
    elif isinstance(shape, list):
        plain = not isinstance(shape[0], (dict, list, tuple))
        if not plain or not all(_same_kind(v, shape[0]) for v in value):  # fast for long lists
            for i, item in enumerate(value):
                if found := mismatch(item, shape[0], f"{where}[{i}]"):
                    return found
    return None


def _same_kind(value, shape) -> bool:
    kind = dict if isinstance(shape, dict) else list if isinstance(shape, list) else shape
    return type(value) is kind or (kind is float and type(value) is int)


def _kind_of(shape) -> str:
    return _KINDS[dict if isinstance(shape, dict) else list if isinstance(shape, list)
                  else shape]


def _differs(value, expected: str, where: str) -> str:
    found = _KINDS.get(type(value), type(value).__name__)
    return f'"{where}" is {found}, not {expected}' if where else f"{found}, not {expected}"
