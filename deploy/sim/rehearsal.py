"""What the two rehearsals (podsim.py, gkesim.py) share: the bucket and default flags, the
config's data uploaded to it, the device orders rehearsed, the checkout's wheel and the warm
package caches, the settings every rehearsal passes its door, running the door, and the end:
the workdir copied back, leftover processes, the steps done. `say` is each rehearsal's logger.
"""

import glob
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

from deploy import job
from deploy import settings as deploy_settings
from deploy.sim import cloud_state as sim
from vitpod import protocol
from vitpod.local_hosts import free_port

ROOT = job.ROOT
BUCKET = "vitpod-sim"
DEFAULT_FLAGS = ("--config.total_steps=60 --config.log_every=1 --config.save_every=20 "
                 "--config.eval_every=0")


def data_flags(config: str, train_flags: str, say) -> str:
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


def rehearsed_orders(tpu_type: str, say) -> dict:
    """The device order of every type and slice count pod-run may get (TPU_TYPES x
    NUM_SLICES), so that its trainers interleave their batch rows as those chips do."""
    types = [t.split("@")[0].strip() for t in
             (os.environ.get("TPU_TYPES") or tpu_type).split(",") if t.strip()]
    counts = [int(n) for n in os.environ.get("NUM_SLICES", "1").split(",") if n.strip()]
    orders = sim.device_orders(types, counts)
    say(f"device order of {', '.join(orders) or 'no type'} from libtpu's description: "
        "the trainers' hosts interleave as those chips' do")
    return orders


def build_wheel(sim_dir: str) -> str:
    dist = os.path.join(sim_dir, "dist")
    shutil.rmtree(dist, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", dist,
                    ROOT], check=True)
    return glob.glob(os.path.join(dist, "vitpod-*.whl"))[0]


def warm_caches(wheel: str, python_version: str, sim_dir: str, say) -> str:
    """Run the workers' setup once, so that every simulated worker installs from the cache;
    the home it set up."""
    home = os.path.join(sim_dir, "warm-home")
    os.makedirs(home, exist_ok=True)
    shutil.copy(wheel, home)
    shutil.copy(os.path.join(ROOT, "deploy", "constraints.txt"),
                os.path.join(home, protocol.CONSTRAINTS))
    env = {**sim.image_env(home), **job.HOME_NAMES, "PYTHON_VERSION": python_version,
           "UV_VERSION": os.environ.get("UV_VERSION", deploy_settings.DEFAULTS["UV_VERSION"])}
    start = time.monotonic()
    subprocess.run(["bash", os.path.join(ROOT, "deploy", "worker.sh"), "setup",
                    os.path.basename(wheel)], cwd=home, env=env, check=True)
    say(f"package caches warm ({time.monotonic() - start:.0f} s)")
    return home


def copy_workdir(client, target: str, workdir: str) -> None:
    shutil.rmtree(target, ignore_errors=True)
    prefix = workdir.removeprefix(f"gs://{BUCKET}/") + "/"
    for blob in client.list_blobs(BUCKET, prefix=prefix):
        rel = blob.name[len(prefix):]
        if rel.startswith("compile_cache/"):
            continue
        os.makedirs(os.path.dirname(os.path.join(target, rel)), exist_ok=True)
        blob.download_to_filename(os.path.join(target, rel))


def settings(name: str, tpu_type: str, workdir: str, config: str, flags: str, **door) -> dict:
    """The settings every rehearsal gives its door, then the door's own (`door`)."""
    return {"NAME": name, "TPU_TYPE": tpu_type, "WORKDIR": workdir, "CONFIG": config,
            "TRAIN_FLAGS": flags, "PLATFORM": "cpu", "POLL_SECONDS": "1", "MAX_RETRIES": "3",
            "POD_ENV": os.devnull,
            # every simulated host is on loopback: a free port, not JAX's default
            "COORDINATOR_PORT": str(free_port()), **door}


def run_door(module: str, values: dict, sim_dir: str, bin_dir: str) -> int:
    """`python -m MODULE run` with `values`, the simulated tools first on PATH, and a home of
    its own (gcloud makes its ssh key there, as on a machine's first use); its exit code."""
    client = os.path.join(sim_dir, "client")
    os.makedirs(client, exist_ok=True)
    env = {**os.environ, **values, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": client}
    for key in ("VIRTUAL_ENV", "PYTHONPATH"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", module, "run"], cwd=ROOT, env=env).returncode


def kill_leftovers(what: str, door: str) -> int:
    """1 (and every leftover killed) when a simulated host's process outlived the door's run."""
    leftovers = sim.node_processes()
    if not leftovers:
        return 0
    sim.signal_node("", 9)
    print(f"error: {len(leftovers)} {what} process(es) still ran after {door} (now killed): "
          f"{leftovers}", file=sys.stderr)
    return 1


def done_steps(workdir: str) -> int:
    """The step DONE records in a local copy of the workdir; 0 without DONE."""
    done = protocol.done_path(workdir)
    return json.load(open(done))["step"] if os.path.exists(done) else 0


def headline(door: str, config: str, tpu_types: str, slices: str, workdir: str,
             preemption: str) -> str:
    return (f"{door} of {config} on a simulated {tpu_types}"
            + (f" x {slices} slices" if slices != "1" else "") + f", workdir {workdir}, "
            + preemption)


def copy_back(sim_dir: str, workdir: str) -> str:
    """The bucket's workdir copied to SIM_DIR/workdir (without its compile cache); that path."""
    from google.cloud import storage as gcs

    target = os.path.join(sim_dir, "workdir")
    copy_workdir(gcs.Client(project="test-project"), target, workdir)
    return target
