"""`make pod-sim`: the whole `make pod-run`, rehearsed on localhost before paying for a slice.

    python -m deploy.sim.podsim      (from the repository root, in the venv: make pod-sim)

Only the cloud's control plane is simulated (deploy/sim/gcloud.py); deploy.pod runs as it
would against Google, its commands run in simulated workers (home folders whose `python3` is
a 3.10 without venv, as on the TPU images), the workers form one jax.distributed job on fake
CPU devices, and the workdir is a bucket on a GCS server on loopback. Settings as for
`pod-run` (TPU_TYPE, NUM_SLICES, CONFIG, TRAIN_FLAGS) plus PREEMPT_AT_STEP (0: no
preemption; of several slices, the last is taken back). Ends with one summary line and a copy
of the bucket's workdir in SIM_DIR/workdir.
"""

import glob
import importlib.util
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time

from deploy import settings as pod_settings
from deploy import worker_setup
from deploy.sim import cloud_state as sim
from deploy.sim import gcloud as sim_gcloud
from deploy.sim import image
from deploy.sim.gcs import Emulator
from vitpod.distributed import free_port
from vitpod.workdir import protocol

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIM_DIR = os.path.abspath(os.environ.get("SIM_DIR", os.path.join(ROOT, "runs", "pod-sim")))
# uv's and pip's caches, shared by every simulated worker (a rehearsal takes minutes).
CACHE_DIR = os.path.abspath(os.environ.get("SIM_CACHE_DIR", os.path.join(SIM_DIR, "cache")))
BUCKET, NAME = "vitpod-sim", "vitpod-sim"
WORKDIR = f"gs://{BUCKET}/runs/pod-sim"
DEFAULT_FLAGS = ("--config.total_steps=60 --config.log_every=1 --config.save_every=20 "
                 "--config.eval_every=0")


def say(message: str) -> None:
    print(f"[pod-sim] {message}", flush=True)


def data_flags(config: str, train_flags: str) -> str:
    """Upload the config's local data dirs to the bucket; the flags that point the run there."""
    values = {}
    for flag in shlex.split(train_flags):
        key, _, value = flag.partition("=")
        if key in ("--config.data.train_dir", "--config.data.val_dir"):
            values[key.removeprefix("--config.")] = value
    path, _, arg = config.partition(":")
    spec = importlib.util.spec_from_file_location("simconfig", os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(arg or None)
    extra = []
    for key in ("data.train_dir", "data.val_dir"):
        local = values.get(key, cfg.data.train_dir if key == "data.train_dir" else
                           cfg.data.val_dir)
        if not local or local.startswith("gs://"):
            continue
        if not os.path.isdir(local) and local.startswith("data/digits"):
            subprocess.run([sys.executable, "-m", "vitpod.prepare", "digits",
                            "--out=data/digits"], check=True, cwd=ROOT)
        remote = f"gs://{BUCKET}/{os.path.relpath(os.path.abspath(local), ROOT)}"
        subprocess.run([sys.executable, "-m", "vitpod.prepare", "upload", f"--src={local}",
                        f"--dst={remote}"], check=True, cwd=ROOT)
        say(f"{key}: {local} uploaded to {remote}; the workers read it from there")
        extra.append(f"--config.{key}={remote}")
    return shlex.join(extra)


def rehearsed_orders(tpu_type: str) -> dict:
    """The device order of every type and slice count pod-run may get (TPU_TYPES x
    NUM_SLICES), so that its trainers interleave their batch rows as those chips do."""
    types = [t.split("@")[0].strip() for t in
             (os.environ.get("TPU_TYPES") or tpu_type).split(",") if t.strip()]
    counts = [int(n) for n in os.environ.get("NUM_SLICES", "1").split(",") if n.strip()]
    orders = sim.device_orders(types, counts)
    say(f"device order of {', '.join(orders) or 'no type'} from libtpu's description: "
        "the trainers' hosts interleave as those chips' do")
    return orders


def capacity_limits(text: str) -> dict:
    """SIM_CAPACITY="v4-32=1": a v4-32 is granted once, then never again (a fallback rehearsal)."""
    limits = {}
    for item in filter(None, text.split(",")):
        tpu_type, _, times = item.partition("=")
        limits[tpu_type.strip()] = int(times or 0)
    return limits


def build_wheel(sim_dir: str = SIM_DIR) -> str:
    dist = os.path.join(sim_dir, "dist")
    shutil.rmtree(dist, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", dist,
                    ROOT], check=True)
    return glob.glob(os.path.join(dist, "vitpod-*.whl"))[0]


def warm_caches(wheel: str, python_version: str, sim_dir: str = SIM_DIR) -> str:
    """Run the workers' setup once, so that every simulated worker installs from the cache;
    the home it set up."""
    home = os.path.join(sim_dir, "warm-home")
    os.makedirs(home, exist_ok=True)
    shutil.copy(wheel, home)
    shutil.copy(os.path.join(ROOT, "deploy", "constraints.txt"),
                os.path.join(home, protocol.CONSTRAINTS))
    env = {**sim.image_env(home), **worker_setup.HOME_NAMES, "PYTHON_VERSION": python_version,
           "UV_VERSION": os.environ.get("UV_VERSION", pod_settings.DEFAULTS["UV_VERSION"])}
    start = time.monotonic()
    subprocess.run(["bash", os.path.join(ROOT, "deploy", "worker.sh"), "setup",
                    os.path.basename(wheel)], cwd=home, env=env, check=True)
    say(f"package caches warm ({time.monotonic() - start:.0f} s)")
    return home


def copy_workdir(client, target: str, workdir: str = WORKDIR) -> None:
    shutil.rmtree(target, ignore_errors=True)
    prefix = workdir.removeprefix(f"gs://{BUCKET}/") + "/"
    for blob in client.list_blobs(BUCKET, prefix=prefix):
        rel = blob.name[len(prefix):]
        if rel.startswith("compile_cache/"):
            continue
        os.makedirs(os.path.dirname(os.path.join(target, rel)), exist_ok=True)
        blob.download_to_filename(os.path.join(target, rel))


def main() -> int:
    os.environ["SIM_DIR"] = SIM_DIR  # the simulated gcloud and cloud_state find it here
    tpu_type = os.environ.get("TPU_TYPE", "v4-16")
    config = os.environ.get("CONFIG", "configs/demo.py")
    train_flags = os.environ.get("TRAIN_FLAGS") or DEFAULT_FLAGS
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
                       "device_orders": rehearsed_orders(tpu_type),
                       **json.loads(os.environ.get("SIM_SCENARIO", "{}"))}, f)
        flags = f"{train_flags} {data_flags(config, train_flags)}".strip()
        wheel = build_wheel()
        warm_caches(wheel, python_version)
        bin_dir = os.path.join(SIM_DIR, "bin")
        os.makedirs(bin_dir, exist_ok=True)
        sim_gcloud.install(bin_dir)
        settings = {"PROJECT": "sim-project", "ZONE": "sim-zone-a", "NAME": NAME,
                    "TPU_TYPE": tpu_type, "CAPACITY": "spot", "WORKDIR": WORKDIR,
                    "CONFIG": config, "TRAIN_FLAGS": flags, "WHEEL": wheel, "PLATFORM": "cpu",
                    "PYTHON_VERSION": python_version,
                    "POLL_SECONDS": "1", "LOG_SYNC_SECONDS": "2", "CRASH_GRACE": "20",
                    "READY_TIMEOUT": "300", "MAX_RETRIES": "3", "POD_ENV": os.devnull,
                    # every simulated worker is on loopback: a free port, not JAX's default
                    "COORDINATOR_PORT": str(free_port())}
        for key in ("TPU_TYPES", "NUM_SLICES", "QUEUE_TIMEOUT", "PRICE_PER_CHIP_HOUR"):
            if os.environ.get(key):
                settings[key] = os.environ[key]
        slices = settings.get("NUM_SLICES", "1")
        say(f"pod-run of {config} on a simulated {settings.get('TPU_TYPES', tpu_type)}"
            + (f" x {slices} slices" if slices != "1" else "") + ", workdir "
            f"{WORKDIR}, preemption at step {preempt_at or 'never'}")
        # The machine pod-run runs on, as on first use: gcloud makes its ssh key in this home.
        client = os.path.join(SIM_DIR, "client")
        os.makedirs(client, exist_ok=True)
        env = {**os.environ, **settings, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": client}
        for key in ("VIRTUAL_ENV", "PYTHONPATH"):
            env.pop(key, None)
        code = subprocess.run([sys.executable, "-m", "deploy.pod", "run"], cwd=ROOT,
                              env=env).returncode
        return summarize(code)
    finally:
        emulator.stop()


def summarize(code: int) -> int:
    from google.cloud import storage as gcs

    client = gcs.Client(project="test-project")
    target = os.path.join(SIM_DIR, "workdir")
    copy_workdir(client, target)
    state = json.load(open(os.path.join(SIM_DIR, "state.json")))
    leftovers = sim.node_processes()
    if leftovers:
        sim.signal_node("", 9)
        print(f"error: {len(leftovers)} simulated worker process(es) still ran after pod-run "
              f"(now killed): {leftovers}", file=sys.stderr)
        code = code or 1
    done = protocol.done_path(target)
    steps = json.load(open(done))["step"] if os.path.exists(done) else 0
    say(f"{'DONE' if steps else 'NOT DONE'}: {steps} steps, {state.get('preempted', 0)} "
        f"preemption(s) survived, on {' then '.join(state.get('slices', ['?']))}; workdir "
        "copied to "
        f"{os.path.relpath(target, ROOT)} (exit {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
