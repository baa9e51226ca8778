"""Setting workers up (uv, a uv-managed Python, the wheel under deploy/constraints.txt) and
checking them, with worker.sh and worker_check.py copied into each worker's home.
"""

import os
import shlex

from deploy import job
from deploy.settings import DEPLOY_DIR, slice_devices
from deploy.shell import DeployError, log, reason
from deploy.tpu_vm.settings import TpuVmSettings
from deploy.tpu_vm.slices import Workers
from deploy.worker_probe import IN_USE, UNREACHABLE
from vitpod import protocol

PROBE_SECONDS = 15  # how long each worker tries to reach worker 0; worker 0 listens 5 s longer

def setup(settings: TpuVmSettings, workers: Workers) -> None:
    """Copy the wheel, the constraints and the worker scripts to every worker; run the set-up."""
    wheel = job.build_wheel(settings)
    files = {wheel: os.path.basename(wheel),
             os.path.join(DEPLOY_DIR, "constraints.txt"): protocol.CONSTRAINTS,
             os.path.join(DEPLOY_DIR, "worker.sh"): protocol.WORKER_SCRIPT,
             os.path.join(DEPLOY_DIR, "worker_check.py"): protocol.CHECK_SCRIPT,
             os.path.join(DEPLOY_DIR, "worker_probe.py"): protocol.PROBE_SCRIPT}
    staged = os.path.join(os.path.dirname(wheel), "worker-files")
    os.makedirs(staged, exist_ok=True)
    for src, name in files.items():  # scp keeps names: stage the files as workers see them
        if not settings.dry_run:
            with open(src, "rb") as f, open(os.path.join(staged, name), "wb") as g:
                g.write(f.read())
    sources = [os.path.join(staged, name) for name in files.values()]
    log(f"setting up every worker: uv {settings.uv_version}, Python {settings.python_version}, "
        f"{os.path.basename(wheel)}[tpu] with deploy/constraints.txt")
    workers.on_each("copying the wheel", lambda i: workers.copy(i, "~/", *sources))
    command = (f"{job.script_env(settings)} bash {protocol.WORKER_SCRIPT} setup "
               f"{shlex.quote(os.path.basename(wheel))}")
    workers.on_each("setup", lambda i: workers.run(i, command))


def check(settings: TpuVmSettings, workers: Workers, tpu_type: str, slices: int = 1) -> None:
    """Every worker: its Python, `import vitpod`, the processes that hold its TPU (stopped with
    FREE_TPU=1), the devices JAX sees against the slice; then the coordinator's port."""
    devices, n = slice_devices(tpu_type), workers.count
    per_slice = n // slices
    local = devices // per_slice if devices and devices % per_slice == 0 else 0
    script = protocol.WORKER_SCRIPT
    command = (f"cd ~ && if [ ! -f {script} ]; then echo 'FAILED: vitpod was never set up "
               f"here: run make pod-setup'; exit 1; fi; "
               f"{job.script_env(settings, LOCAL_DEVICES=str(local))} bash {script} check"
               + (" --free_tpu" if settings.free_tpu else ""))
    workers.on_each("pod-check", lambda i: workers.run(i, command, retries=2))
    probe_coordinator(settings, workers)
    for k in range(slices if slices > 1 else 0):
        log(f"pod-check: slice {k}: workers {k * per_slice}-{(k + 1) * per_slice - 1} ok")
    log(f"pod-check: all {n} worker(s) ok" + (f" on {slices} slices" if slices > 1 else "")
        + (f", {local} {settings.platform} devices each" if local else "")
        + f"; worker 0's coordinator port {settings.coordinator_port} reachable from every worker")


def probe_coordinator(settings: TpuVmSettings, workers: Workers) -> None:
    """JAX's coordinator port as jax.distributed will use it, all workers at once: worker 0
    listens on COORDINATOR_PORT, every other worker connects to its internal IP."""
    port, python = settings.coordinator_port, f"{protocol.VENV}/bin/python"
    ip, network, cidr = workers.coordinator()
    host = ip or "WORKER0_IP"  # a dry run's describe has no address

    def probe(i: int):
        args = (["listen", port, workers.count - 1, PROBE_SECONDS + 5] if i == 0 else
                ["connect", host, port, i, PROBE_SECONDS])
        script = protocol.PROBE_SCRIPT
        return workers.run(i, f"cd ~ && if [ ! -f {script} ]; then echo 'FAILED: no ~/{script}: "
                              f"run make pod-setup'; exit 2; fi; {python} {script} "
                              f"{shlex.join(map(str, args))}", retries=1)

    results = workers.each(probe)
    codes = {i: -1 if isinstance(r, Exception) else r[0] for i, r in results.items()}
    failed = sorted(i for i, code in codes.items() if code)
    for i in failed:
        r = results[i]
        log(f"worker {i}: the coordinator probe failed: "
            f"{r if isinstance(r, Exception) else reason(r[2] or r[1], f'exit {r[0]}')}")
    if codes[0] == IN_USE:
        raise DeployError(f"port {port} (COORDINATOR_PORT) is in use on worker 0: a stale process "
                          "may hold it (a trainer vitpod did not stop?); stop it, or set "
                          "COORDINATOR_PORT to a free port")
    peers = [i for i in failed if codes[i] == UNREACHABLE]
    if peers and codes[0] in (0, 1):  # worker 0 listened, and they did not get through
        raise DeployError(
            f"worker(s) {', '.join(map(str, peers))} cannot reach worker 0 ({host}) on the "
            f"coordinator port {port}: open it (gcloud compute firewall-rules create "
            f"vitpod-coordinator --project={settings.project} --network={network or 'NETWORK'} "
            f"--allow=tcp:{port} --source-ranges={cidr or 'RANGE'}), or set COORDINATOR_PORT to "
            "a port the network allows")
    if failed:
        raise DeployError("the coordinator probe failed on worker(s) "
                          f"{', '.join(map(str, failed))} (reasons above)")
