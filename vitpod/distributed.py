"""Process group start-up, the device check, and agreement between hosts (the mesh is
vitpod/mesh.py).

Every host runs the same program. Whatever the hosts decide (a config, a failure, a
manifest) they decide identically, through the coordinator or a collective.
"""

import glob
import hashlib
import os
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from vitpod import (
    config_record,
    protocol,  # a leaf: standard library only
    storage,
)
from vitpod.errors import UserError


def _on_cloud_tpu_vm() -> bool:
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _on_gke_tpu_slice(env) -> bool:
    """A pod of a multi-host TPU slice on GKE, whatever devices its container sees: GKE lists
    the slice's hosts in TPU_WORKER_HOSTNAMES (one host, or `localhost` where a compile job
    quiets libtpu with it, is no job to join)."""
    hosts = [h for h in env.get(protocol.WORKER_HOSTNAMES_ENV, "").split(",") if h.strip()]
    return len(hosts) > 1


def initialize(coordinator_address: str = "", num_processes: int = 0,
               process_id: int = -1) -> None:
    """Join the job: explicit flags for local multi-process runs, auto-detect on TPU VMs and
    GKE TPU pods (and in the rehearsal, from its stand-in for the metadata server)."""
    timeout = init_timeout(os.environ)
    if not coordinator_address and os.environ.get(protocol.SIM_WORKER0_ENV):
        coordinator_address, num_processes, process_id = rehearsed_cluster(os.environ)
    if coordinator_address:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise UserError(f"--process_id={process_id} --num_processes={num_processes}: "
                            "need num_processes >= 1 and 0 <= process_id < num_processes")
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id,
                                   initialization_timeout=timeout)
    elif _on_cloud_tpu_vm() or _on_gke_tpu_slice(os.environ):
        # Worker list, coordinator (JAX_COORDINATOR_PORT) and slices from the TPU metadata, or
        # on GKE from the environment GKE gives the pod (JAX's GkeTpuCluster).
        jax.distributed.initialize(initialization_timeout=timeout)


def init_timeout(env) -> int:
    """Seconds jax.distributed waits for every host: the launcher's setting, else JAX's 300."""
    value = env.get(protocol.INIT_TIMEOUT_ENV, "300")
    try:
        return max(1, round(float(value)))
    except ValueError:
        raise UserError(f"{protocol.INIT_TIMEOUT_ENV}={value!r} in the environment: need a "
                        "number of seconds (INIT_TIMEOUT in deploy/pod.env)") from None


def rehearsed_cluster(env) -> tuple[str, int, int]:
    """(coordinator, process count, process id) from the rehearsal's stand-ins for the TPU
    metadata, derived as JAX's Cloud TPU detection derives them from the real metadata
    (jax/_src/clusters/cloud_tpu_cluster.py): process id = index in the slice + slice id x
    hosts per slice; the coordinator is MEGASCALE_COORDINATOR_ADDRESS, else the slice's worker
    0, at JAX_COORDINATOR_PORT (default 8482)."""
    hosts, worker = int(env[protocol.SIM_HOSTS_ENV]), int(env[protocol.SIM_WORKER_ID_ENV])
    slices = int(env.get(protocol.NUM_SLICES_ENV) or 1)
    slice_id = int(env.get(protocol.SLICE_ID_ENV) or 0)
    host = env.get(protocol.SLICE_COORDINATOR_ENV) or env[protocol.SIM_WORKER0_ENV]
    port = env.get(protocol.COORDINATOR_PORT_ENV) or protocol.DEFAULT_COORDINATOR_PORT
    return f"{host.split(':')[0]}:{port}", hosts * slices, worker + slice_id * hosts


def check_devices(expect_platform: str = "", expect_devices: int = 0) -> str:
    """Stop, in one line, when JAX sees other devices than the launch expects.

    A TPU held by a stale process makes JAX fall back to the CPU with only a warning (or, with
    JAX_PLATFORMS=tpu, fail deep inside backend start-up): either way the run must not go on.
    Returns what was found, e.g. "8 tpu devices (4 local)".
    """
    try:
        devices = jax.devices()
    except RuntimeError as e:  # JAX_PLATFORMS names a backend that could not start
        cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UserError(f"JAX could not start the {expect_platform or 'requested'} backend "
                        f"({cause}); {_HELD_HINT}") from None
    platform, count = devices[0].platform, len(devices)
    found = f"{count} {platform} devices ({jax.local_device_count()} local)"
    if expect_platform and platform != expect_platform:
        raise UserError(f"expected {expect_devices or 'some'} {expect_platform} devices, JAX "
                        f"found {found}: it fell back to {platform}; {_HELD_HINT}")
    if expect_devices and count != expect_devices:
        raise UserError(f"expected {expect_devices} {platform} devices across the job, found "
                        f"{found}: a worker did not join, or --expect_devices does not match "
                        "the slice; check every worker with make pod-check")
    return found


_HELD_HINT = ("most likely another process holds the accelerator (a stale trainer: "
              "make pod-launch stops it by its pid file; or see `sudo lsof /dev/accel* "
              "/dev/vfio/*`), or the worker's jax lacks the tpu extra (make pod-setup)")


def check_same_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Fail on every host if any host was launched with another config or workdir."""
    if jax.process_count() == 1:
        return
    text = config_record.to_json(config) + "\n" + storage.absolute(workdir)
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], np.int64)
    digests = multihost_utils.process_allgather(digest).reshape(-1)
    differ = [i for i, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise UserError(f"process(es) {differ} run a different config or workdir than process 0;"
                        " launch every host with the same flags")


def primary_first(fn: Callable[[], None], what: str) -> None:
    """Run `fn` on process 0 only; every process raises if it failed there."""
    failure = None
    if jax.process_index() == 0:
        try:
            fn()
        except UserError as e:
            failure = e
    if jax.process_count() > 1:
        failed = multihost_utils.broadcast_one_to_all(np.int32(failure is not None))
        if failed and failure is None:
            raise UserError(f"process 0 failed to {what}; its log says why")
    if failure is not None:
        raise failure
