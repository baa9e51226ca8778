"""The simulated cloud's shared state for `make pod-sim`: the scenario, the control plane's
state file (read and written under a lock: gcloud calls run in parallel), the workers' homes,
their processes (found by the NODE_ENV they inherit) and the image's environment. The
simulation lives in $SIM_DIR.
"""

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import sys
import time

from deploy.tpu_vm.queued_resource import SPOT_NOTICE_SECONDS
from vitpod import protocol  # a leaf: standard library only

NODE_ENV = "VITPOD_SIM_NODE"  # SIM_DIR:NAME:WORKER, in every worker process's environment
SCENARIO = {
    "wait_polls": 1,          # describes spent WAITING_FOR_RESOURCES after a create
    "provision_polls": 1,     # then PROVISIONING
    "delete_polls": 1,        # DELETING after a delete
    "fail_creations": [],     # the next creations go FAILED with these messages
    "describe_errors": 0,     # the next describes fail with a transient (auth) error
    "scp_failures": 0,        # the next scp calls fail as right after ACTIVE (keys propagating)
    "preempt_at_step": 0,     # preempt (once) when WORKDIR/metrics.jsonl reaches this step
    "preempt_slice": -1,      # which slice of a multislice job is taken back (the last)
    "grace_seconds": SPOT_NOTICE_SECONDS,  # SIGTERM, then SIGKILL after this
    "chips_per_host": 4,
    "capacity_limits": {},    # {TYPE: n}: TYPE becomes ACTIVE at most n times, then waits
    "bucket_location": "US-CENTRAL2",  # what `storage buckets describe` says
    "unreachable_coordinator": False,  # worker 0's address in `tpu-vm describe` answers nothing
    "watch_workdir": "",      # the run the preemption watches
    "worker_env": {},         # environment every worker sees (the emulator's endpoints ...)
    "image_bin": "",          # the stand-in image's bin folder (python3 = 3.10, no venv)
    "downloads_bin": "",      # where uv finds the Python it would download (downloads off)
    "cache_dir": "",          # package caches shared by every worker
}


def sim_dir() -> str:
    return os.environ["SIM_DIR"]


def scenario() -> dict:
    with contextlib.suppress(FileNotFoundError):
        return {**SCENARIO, **json.load(open(os.path.join(sim_dir(), "scenario.json")))}
    return dict(SCENARIO)


@contextlib.contextmanager
def locked_state():
    """The control plane's state, read and written under a lock (calls run in parallel)."""
    os.makedirs(sim_dir(), exist_ok=True)
    path = os.path.join(sim_dir(), "state.json")
    with open(os.path.join(sim_dir(), "state.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = json.load(open(path)) if os.path.exists(path) else {"resources": {},
                                                                   "calls": []}
        try:
            yield state
        finally:  # also when the call ends in an error (sys.exit) after changing the state
            with open(path + ".tmp", "w") as f:
                json.dump(state, f, indent=1)
            os.replace(path + ".tmp", path)


def cloud_log(message: str) -> None:
    with open(os.path.join(sim_dir(), "cloud.log"), "a") as f:
        f.write(f"{time.strftime('%H:%M:%S')} {message}\n")


def node_dir(name: str) -> str:
    return os.path.join(sim_dir(), "nodes", name)


def node_processes(name: str = "", worker: str | None = None) -> list[int]:
    """Every process started on the node's workers (they inherit NODE_ENV), or on one worker;
    without a name, on any node of this simulation."""
    tag = f"{NODE_ENV}={node_tag(name, worker)}".encode()
    found = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            if any(v == tag if worker is not None else v.startswith(tag)
                   for v in open(f"/proc/{pid}/environ", "rb").read().split(b"\0")):
                found.append(int(pid))
        except OSError:
            pass
    return found


def node_tag(name: str, worker: int | None = None) -> str:
    """NODE_ENV's value on a worker of node `name` (a prefix of it without `worker`)."""
    return f"{sim_dir()}:{name + ':' if name else ''}{'' if worker is None else worker}"


def signal_node(name: str, sig: int) -> int:
    pids = node_processes(name)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return len(pids)


def tear_down(name: str) -> None:
    """A VM that is gone: its processes killed, its disk gone."""
    signal_node(name, signal.SIGKILL)
    shutil.rmtree(node_dir(name), ignore_errors=True)


def image_env(home: str) -> dict:
    """A login shell on the simulated image: its PATH (python3 is the 3.10 stand-in), the
    shared package caches, interpreter downloads off, and the scenario's worker_env."""
    sc = scenario()
    keep = {k: v for k, v in os.environ.items()
            if k.startswith(("PIP_", "SSL_", "REQUESTS_CA")) or k.lower().endswith("_proxy")
            or k in ("LANG", "LC_ALL", "TZ", "USER", "LOGNAME")}
    return {**keep, "HOME": home, "SHELL": "/bin/bash",
            "PATH": f"{sc['image_bin']}:/usr/local/bin:/usr/bin:/bin:{sc['downloads_bin']}",
            "UV_PYTHON_DOWNLOADS": "never", "UV_CACHE_DIR": os.path.join(sc["cache_dir"], "uv"),
            "PIP_CACHE_DIR": os.path.join(sc["cache_dir"], "pip"),
            "PIP_ROOT_USER_ACTION": "ignore", **sc["worker_env"]}


# --- how the simulated gcloud reads its arguments and answers ----------------------------
def fail(message: str, code: int = 1) -> None:
    print(message, file=sys.stderr)
    sys.exit(code)


def not_found(kind: str, name: str, command: str) -> None:
    fail(f"ERROR: (gcloud.compute.tpus.{command}) NOT_FOUND: Resource "
         f"'projects/sim/locations/sim/{kind}/{name}' was not found")


def flag(args: list[str], name: str, default: str = "") -> str:
    for a in args:
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return default


def positional(args: list[str]) -> list[str]:
    return [a for a in args if not a.startswith("--")]


def device_order_key(tpu_type: str, slices: int) -> str:
    return f"{slices}x{tpu_type}"


def device_order_env(tpu_type: str, slices: int) -> dict:
    """The rehearsed type's device order for its trainers (vitpod/mesh.py), as the rehearsal's
    launcher computed it into the scenario (`device_orders`); none for a type it did not."""
    order = scenario().get("device_orders", {}).get(device_order_key(tpu_type, slices))
    return {protocol.DEVICE_ORDER_ENV: order} if order else {}


def device_orders(types: list[str], counts: list[int]) -> dict:
    """Each (type, slice count)'s order from libtpu's description of its chips, computed once
    here, in a process of its own per job (vitpod.device_order), not in every trainer."""
    from deploy.tpu_types import libtpu_topology
    from vitpod.device_order import computed

    return {device_order_key(t, n): computed(libtpu_topology(t), n)
            for t in types for n in counts if libtpu_topology(t)}


def install_shim(bin_dir: str, tool: str, module: str) -> str:
    """A `tool` in bin_dir that runs `python -m module` with this Python, from any folder."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(bin_dir, tool)
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\nexport PYTHONPATH={shlex.quote(root)}${{PYTHONPATH:+:$PYTHONPATH}}\n"
                f"exec {shlex.quote(sys.executable)} -m {module} \"$@\"\n")
    os.chmod(path, 0o755)
    return path
