"""Setting workers up (uv, a uv-managed Python, the wheel under deploy/constraints.txt) and
checking them, with worker.sh and worker_check.py copied into each worker's home.
"""

import glob
import os
import shlex
import subprocess
import sys

from deploy.gcloud_cli import log
from deploy.settings import DEPLOY_DIR, Settings, slice_devices
from deploy.slices import Workers
from vitpod.workdir import protocol

# The names worker.sh finds in the worker's home, passed in its environment (it is bash).
HOME_NAMES = {"VENV": protocol.VENV, "CONFIGS": protocol.CONFIGS,
              "CONSTRAINTS": protocol.CONSTRAINTS, "CHECK_SCRIPT": protocol.CHECK_SCRIPT}


def script_vars(settings: Settings, **extra: str) -> dict[str, str]:
    """worker.sh's environment (the container image's build passes the same names)."""
    return {"PYTHON_VERSION": settings.python_version, "UV_VERSION": settings.uv_version,
            "PLATFORM": settings.platform, "PYPI_MIRROR": settings.pypi_mirror,
            "PYTHON_MIRROR": settings.python_mirror, **HOME_NAMES, **extra}


def script_env(settings: Settings, **extra: str) -> str:
    """worker.sh's environment as `KEY=value ...`, every value shell-quoted."""
    pairs = script_vars(settings, **extra)
    return " ".join(f"{k}={shlex.quote(str(v))}" for k, v in pairs.items())


def setup(settings: Settings, workers: Workers) -> None:
    """Copy the wheel, the constraints and the worker scripts to every worker; run the set-up."""
    wheel = build_wheel(settings)
    files = {wheel: os.path.basename(wheel),
             os.path.join(DEPLOY_DIR, "constraints.txt"): protocol.CONSTRAINTS,
             os.path.join(DEPLOY_DIR, "worker.sh"): protocol.WORKER_SCRIPT,
             os.path.join(DEPLOY_DIR, "worker_check.py"): protocol.CHECK_SCRIPT}
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
    command = (f"{script_env(settings)} bash {protocol.WORKER_SCRIPT} setup "
               f"{shlex.quote(os.path.basename(wheel))}")
    workers.on_each("setup", lambda i: workers.run(i, command))


def build_wheel(settings: Settings) -> str:
    if settings.wheel:  # a wheel built before: install it as it is
        return settings.wheel
    root = os.path.dirname(DEPLOY_DIR)
    dist = os.path.join(root, "dist")
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", dist, root]
    if settings.dry_run:
        print(shlex.join(build))
        return os.path.join(dist, "vitpod-VERSION-py3-none-any.whl")
    subprocess.run(build, check=True)
    return max(glob.glob(os.path.join(dist, "vitpod-*.whl")), key=os.path.getmtime)


def check(settings: Settings, workers: Workers, tpu_type: str, slices: int = 1) -> None:
    """Every worker: its Python, `import vitpod`, the devices JAX sees against the slice."""
    devices, n = slice_devices(tpu_type), workers.count
    per_slice = n // slices
    local = devices // per_slice if devices and devices % per_slice == 0 else 0
    script = protocol.WORKER_SCRIPT
    command = (f"cd ~ && if [ ! -f {script} ]; then echo 'FAILED: vitpod was never set up "
               f"here: run make pod-setup'; exit 1; fi; "
               f"{script_env(settings, LOCAL_DEVICES=str(local))} bash {script} check")
    workers.on_each("pod-check", lambda i: workers.run(i, command, retries=2))
    for k in range(slices if slices > 1 else 0):
        log(f"pod-check: slice {k}: workers {k * per_slice}-{(k + 1) * per_slice - 1} ok")
    log(f"pod-check: all {n} worker(s) ok" + (f" on {slices} slices" if slices > 1 else "")
        + (f", {local} {settings.platform} devices each" if local else ""))
