"""`make gke-sim`: the whole `make gke-run`, rehearsed on localhost before a cluster is paid for.

    python -m deploy.sim.gkesim      (from the repository root, in the venv: make gke-sim)

Only Kubernetes' side is simulated: a `kubectl` (deploy/sim/kubectl.py) that checks the real
manifest and a JobSet controller (deploy/sim/jobset_controller.py) that runs its pods as local
process groups with the environment GKE gives TPU pods; the gcloud of pod-sim reads the
bucket. deploy.gke runs as it would against a cluster. The pods run in the image `make
test-image` built (SIM_IMAGE, with podman) when it is there and of this checkout (its source
digest); else in a folder set up by the same `deploy/worker.sh setup` the Dockerfile runs, with
the wheel built from this checkout and the checkout's configs, saying so. Settings as for
`gke-run` (TPU_TYPE, NUM_SLICES, CONFIG, TRAIN_FLAGS) plus PREEMPT_AT_STEP (0: never; else
every node pool is preempted once at that step). Ends with one summary line and a copy of the
bucket's workdir in SIM_DIR/workdir.
"""

import json
import os
import platform
import shutil
import sys
import tempfile

from deploy.gke import image as gke_image
from deploy.gke.jobset import CONFIGS_DIR
from deploy.sim import cloud_state as sim
from deploy.sim import container, image, rehearsal
from testkit.gcs import Emulator
from vitpod import protocol

ROOT = rehearsal.ROOT
SIM_DIR = os.path.abspath(os.environ.get("SIM_DIR", os.path.join(ROOT, "runs", "gke-sim")))
# The package caches pod-sim's workers install from: the image's set-up shares them.
CACHE_DIR = os.path.abspath(os.environ.get(
    "SIM_CACHE_DIR", os.path.join(ROOT, "runs", "pod-sim", "cache")))
NAME = "vitpod-sim"
WORKDIR = f"gs://{rehearsal.BUCKET}/runs/gke-sim"


def say(message: str) -> None:
    print(f"[gke-sim] {message}", flush=True)


def built_image(wheel: str) -> str:
    """SIM_IMAGE when podman has it and it was built from this checkout, else ''."""
    tag = container.SIM_IMAGE
    if not container.image_exists(tag):
        say(f"no image {tag} here (make test-image builds it): the pods run from a folder")
        return ""
    with tempfile.TemporaryDirectory(prefix="gke-sim-") as scratch:
        gke_image.stage(wheel, os.path.join(scratch, "context"))
        digest = gke_image.source_digest(os.path.join(scratch, "context"))
    if container.image_labels(tag).get(gke_image.SOURCE_LABEL) != digest:
        say(f"{tag} was built from another checkout (make test-image rebuilds it): the pods "
            "run from a folder")
        return ""
    say(f"the pods run in {tag} (buildah, chroot isolation)")
    return tag


def make_image(python_version: str, wheel: str) -> str:
    """The image's IMAGE_HOME: worker.sh setup with the checkout's wheel (as the Dockerfile
    runs it), and the checkout's configs where the manifest points."""
    home = rehearsal.warm_caches(wheel, python_version, SIM_DIR, say)
    shutil.copytree(os.path.join(ROOT, CONFIGS_DIR), os.path.join(home, protocol.CONFIGS),
                    dirs_exist_ok=True)
    return home


def main() -> int:
    os.environ["SIM_DIR"] = SIM_DIR
    tpu_type = os.environ.get("TPU_TYPE", "v4-16")
    slices = os.environ.get("NUM_SLICES", "1")
    config = os.environ.get("CONFIG", "configs/demo.py")
    train_flags = os.environ.get("TRAIN_FLAGS") or rehearsal.DEFAULT_FLAGS
    preempt_at = int(os.environ.get("PREEMPT_AT_STEP", "30"))
    for sub in ("pods", "workdir", "image", "downloads", "warm-home", "client", "bin"):
        shutil.rmtree(os.path.join(SIM_DIR, sub), ignore_errors=True)
    os.makedirs(SIM_DIR, exist_ok=True)
    for f in os.listdir(SIM_DIR):
        if f.endswith((".json", ".log", ".lock")):
            os.remove(os.path.join(SIM_DIR, f))
    python_version = os.environ.get("PYTHON_VERSION") or platform.python_version()
    image_bin, downloads = image.make(SIM_DIR, python_version)
    emulator = Emulator()
    try:
        emulator.create_bucket(rehearsal.BUCKET)
        client_env = emulator.env(direct=True)
        os.environ.update(client_env)
        scenario = {"preempt_at_step": preempt_at, "watch_workdir": WORKDIR,
                    "worker_env": client_env, "image_bin": image_bin,
                    "downloads_bin": downloads, "cache_dir": CACHE_DIR,
                    "tpu_type": tpu_type,
                    "device_orders": rehearsal.rehearsed_orders(tpu_type, say)}
        with open(os.path.join(SIM_DIR, "scenario.json"), "w") as f:
            json.dump(scenario, f)
        # No compile cache: a pod that finds the step there reaches the first collective long
        # before the pods that compile it, and on a few busy CPU cores that can outlast the
        # 30 s the CPU collectives (gloo) wait for their peers. TRAIN_FLAGS can turn it on.
        flags = (f"--config.compile_cache=False {train_flags} "
                 f"{rehearsal.data_flags(config, train_flags, say)}").strip()
        wheel = rehearsal.build_wheel(SIM_DIR)
        scenario["container_image"] = built_image(wheel)
        if scenario["container_image"]:
            container.remove_prefixed(NAME)  # a killed run's pods
        else:
            scenario["image_root"] = make_image(python_version, wheel)
        with open(os.path.join(SIM_DIR, "scenario.json"), "w") as f:
            json.dump(scenario, f)
        bin_dir = os.path.join(SIM_DIR, "bin")
        os.makedirs(bin_dir, exist_ok=True)
        sim.install_shim(bin_dir, "gcloud", "deploy.sim.gcloud")
        sim.install_shim(bin_dir, "kubectl", "deploy.sim.kubectl")
        settings = rehearsal.settings(
            NAME, tpu_type, WORKDIR, config, flags, NUM_SLICES=slices,
            IMAGE=container.SIM_IMAGE, READY_TIMEOUT="120", GRACE_SECONDS="60",
            INIT_TIMEOUT="120")
        say(rehearsal.headline("gke-run", config, tpu_type, slices, WORKDIR,
                               f"node pools preempted at step {preempt_at or 'never'}"))
        return summarize(rehearsal.run_door("deploy.gke", settings, SIM_DIR, bin_dir))
    finally:
        emulator.stop()


def summarize(code: int) -> int:
    target = rehearsal.copy_back(SIM_DIR, WORKDIR)
    with sim.locked_state() as state:
        jobsets, preempted = state.get("jobsets", {}), state.get("preempted", 0)
        restarts = sum(js["restarts"] for js in state.get("deleted", {}).values())
    for name, js in jobsets.items():  # gke-run deletes its JobSet: one left is a failure
        print(f"error: JobSet {name} still exists after gke-run (its controller stopped)",
              file=sys.stderr)
        if js.get("controller"):
            sim.signal_node("", 9)
            os.kill(js["controller"], 9)
        code = code or 1
    code = rehearsal.kill_leftovers("pod", "gke-run") or code
    steps = rehearsal.done_steps(target)
    say(f"{'DONE' if steps else 'NOT DONE'}: {steps} steps, {restarts} restart(s), "
        f"{preempted} preemption(s); workdir copied to {os.path.relpath(target, ROOT)} "
        f"(exit {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
