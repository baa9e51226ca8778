"""`make pod-sim`: the whole `make pod-run`, rehearsed on localhost before paying for a slice.

    python -m deploy.sim.podsim      (from the repository root, in the venv: make pod-sim)

Only the cloud's control plane is simulated (deploy/sim/gcloud.py); deploy.tpu_vm runs as it
would against Google, its commands run in simulated workers (home folders whose `python3` is
a 3.10 without venv, as on the TPU images), the workers form one jax.distributed job on fake
CPU devices, and the workdir is a bucket on a GCS server on loopback. Settings as for
`pod-run` (TPU_TYPE, NUM_SLICES, CONFIG, TRAIN_FLAGS) plus PREEMPT_AT_STEP (0: no
preemption; of several slices, the last is taken back). Ends with one summary line and a copy
of the bucket's workdir in SIM_DIR/workdir.
"""

import json
import os
import platform
import shutil
import sys

from deploy.sim import cloud_state as sim
from deploy.sim import image, rehearsal
from testkit.gcs import Emulator

ROOT = rehearsal.ROOT
SIM_DIR = os.path.abspath(os.environ.get("SIM_DIR", os.path.join(ROOT, "runs", "pod-sim")))
# uv's and pip's caches, shared by every simulated worker (a rehearsal takes minutes).
CACHE_DIR = os.path.abspath(os.environ.get("SIM_CACHE_DIR", os.path.join(SIM_DIR, "cache")))
BUCKET, NAME = rehearsal.BUCKET, "vitpod-sim"
WORKDIR = f"gs://{BUCKET}/runs/pod-sim"


def say(message: str) -> None:
    print(f"[pod-sim] {message}", flush=True)


def capacity_limits(text: str) -> dict:
    """SIM_CAPACITY="v4-32=1": a v4-32 is granted once, then never again (a fallback rehearsal)."""
    limits = {}
    for item in filter(None, text.split(",")):
        tpu_type, _, times = item.partition("=")
        limits[tpu_type.strip()] = int(times or 0)
    return limits


def main() -> int:
    os.environ["SIM_DIR"] = SIM_DIR  # the simulated gcloud and cloud_state find it here
    tpu_type = os.environ.get("TPU_TYPE", "v4-16")
    config = os.environ.get("CONFIG", "configs/demo.py")
    train_flags = os.environ.get("TRAIN_FLAGS") or rehearsal.DEFAULT_FLAGS
    preempt_at = int(os.environ.get("PREEMPT_AT_STEP", "30"))
    for sub in ("nodes", "workdir", "image", "downloads", "warm-home", "client"):
        shutil.rmtree(os.path.join(SIM_DIR, sub), ignore_errors=True)
    for f in ("state.json", "cloud.log", "capacity.log", "scenario.json"):
        if os.path.exists(os.path.join(SIM_DIR, f)):
            os.remove(os.path.join(SIM_DIR, f))
    # The workers' Python: the one this machine runs (uv cannot download one here).
    python_version = os.environ.get("PYTHON_VERSION") or platform.python_version()
    image_bin, downloads = image.make(SIM_DIR, python_version)
    emulator = Emulator()
    try:
        emulator.create_bucket(BUCKET)
        client_env = emulator.env(direct=True)
        os.environ.update(client_env)
        with open(os.path.join(SIM_DIR, "scenario.json"), "w") as f:
            json.dump({"preempt_at_step": preempt_at, "watch_workdir": WORKDIR,
                       "worker_env": client_env, "image_bin": image_bin, "downloads_bin": downloads,
                       "cache_dir": CACHE_DIR,
                       "capacity_limits": capacity_limits(os.environ.get("SIM_CAPACITY", "")),
                       "bucket_location": "SIM-ZONE",  # the region of ZONE=sim-zone-a
                       "device_orders": rehearsal.rehearsed_orders(tpu_type, say),
                       **json.loads(os.environ.get("SIM_SCENARIO", "{}"))}, f)
        flags = f"{train_flags} {rehearsal.data_flags(config, train_flags, say)}".strip()
        wheel = rehearsal.build_wheel(SIM_DIR)
        rehearsal.warm_caches(wheel, python_version, SIM_DIR, say)
        bin_dir = os.path.join(SIM_DIR, "bin")
        os.makedirs(bin_dir, exist_ok=True)
        sim.install_shim(bin_dir, "gcloud", "deploy.sim.gcloud")
        settings = rehearsal.settings(
            NAME, tpu_type, WORKDIR, config, flags, PROJECT="sim-project", ZONE="sim-zone-a",
            CAPACITY="spot", WHEEL=wheel, PYTHON_VERSION=python_version, LOG_SYNC_SECONDS="2",
            CRASH_GRACE="20", READY_TIMEOUT="300")
        for key in ("TPU_TYPES", "NUM_SLICES", "QUEUE_TIMEOUT", "PRICE_PER_CHIP_HOUR"):
            if os.environ.get(key):
                settings[key] = os.environ[key]
        slices = settings.get("NUM_SLICES", "1")
        say(rehearsal.headline("pod-run", config, settings.get("TPU_TYPES", tpu_type), slices,
                               WORKDIR, f"preemption at step {preempt_at or 'never'}"))
        return summarize(rehearsal.run_door("deploy.tpu_vm", settings, SIM_DIR, bin_dir))
    finally:
        emulator.stop()


def summarize(code: int) -> int:
    target = rehearsal.copy_back(SIM_DIR, WORKDIR)
    state = json.load(open(os.path.join(SIM_DIR, "state.json")))
    code = rehearsal.kill_leftovers("simulated worker", "pod-run") or code
    steps = rehearsal.done_steps(target)
    say(f"{'DONE' if steps else 'NOT DONE'}: {steps} steps, {state.get('preempted', 0)} "
        f"preemption(s) survived, on {' then '.join(state.get('slices', ['?']))}; workdir "
        "copied to "
        f"{os.path.relpath(target, ROOT)} (exit {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
