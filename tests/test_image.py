"""`make test-image`: vitpod's GKE image built for real, with podman and no daemon, from the
Dockerfile users build, on a local Debian 12 base (deploy/sim/container.py: no registry image
can be pulled here); then the JobSet's own train command (`make gke-manifest`, for a CPU run
of 8 devices) run inside it with buildah, against the same steps run outside it. The image it
leaves (container.SIM_IMAGE) is the one `make gke-sim` runs its pods in. As root.

The test build differs from a user's in its build arguments only: BASE_IMAGE (the local
base), PYTHON_VERSION (the base's own python3, since uv cannot download one here), uv allowed
to take that Python, pip allowed to install uv into Debian's Python (PEP 668), and uv's
downloads kept in a cache on this machine, mounted for the build only.
"""

import json
import os
import shlex
import subprocess
import sys
import time

import pytest
import yaml

from deploy.gke import image as gke_image
from deploy.gke.jobset import IMAGE_HOME, IMAGE_PYTHON
from deploy.sim import container
from tests.conftest import ROOT, read_losses
from vitpod import protocol

pytestmark = pytest.mark.image

STEPS = 5
# uv's download cache between runs on one machine (never the image itself: each run rebuilds).
CACHE = os.path.expanduser(os.environ.get("VITPOD_IMAGE_CACHE", "~/.cache/vitpod-image-test"))
BUILD_CACHE = "/var/cache/vitpod-uv"  # where the build sees it
PINNED = ("jax", "jaxlib", "flax", "orbax-checkpoint", "libtpu")


def say(message: str) -> None:
    print(f"[test-image] {message}", flush=True)


def in_container(name: str, command: list[str], timeout: float = 120, **kw) -> str:
    done = subprocess.run(container.run_argv(name, command, {}, **kw), capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout


@pytest.fixture(scope="module")
def built():
    """(the base's Python version, seconds the build took)."""
    if os.geteuid() != 0:
        pytest.fail("make test-image runs as root: apt-get, debootstrap and buildah need it")
    container.install_tools(say)
    start = time.monotonic()
    base = container.make_base(say)
    with container.working(base, "vitpod-test-base") as name:
        python = in_container(name, ["python3", "-c", "import platform; "
                                     "print(platform.python_version())"]).strip()
    say(f"base {base} ready in {time.monotonic() - start:.0f} s (Python {python})")
    os.makedirs(os.path.join(CACHE, "uv"), exist_ok=True)
    flags = [f"--build-arg=BASE_IMAGE={base}", "--build-arg=UV_PYTHON_PREFERENCE=only-system",
             "--build-arg=PIP_BREAK_SYSTEM_PACKAGES=1", "--build-arg=UV_NO_CACHE=0",
             f"--build-arg=UV_CACHE_DIR={BUILD_CACHE}",
             f"--volume={os.path.join(CACHE, 'uv')}:{BUILD_CACHE}", "--layers=false"]
    # The last build goes first: never a build result reused, nor left behind untagged.
    subprocess.run(["podman", "rmi", "--force", container.SIM_IMAGE], capture_output=True)
    start = time.monotonic()
    done = subprocess.run(["make", "image", f"PYTHON={sys.executable}", f"POD_ENV={os.devnull}",
                           f"IMAGE={container.SIM_IMAGE}", f"PYTHON_VERSION={python}",
                           f"IMAGE_BUILD_FLAGS={shlex.join(flags)}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
    seconds = time.monotonic() - start
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("[image] built ")]
    say(f"{line.removeprefix('[image] ')} (make image: {seconds:.0f} s)")
    return python, seconds


def manifest_container(train_flags: str) -> dict:
    """The container of the JobSet `make gke-manifest` writes for a CPU run of 8 devices
    (v4-16: 8 chips; the bucket is never read, the workdir is mounted instead)."""
    done = subprocess.run(
        ["make", "-s", "gke-manifest", f"PYTHON={sys.executable}", f"POD_ENV={os.devnull}",
         f"IMAGE={container.SIM_IMAGE}", "NAME=test-image", "TPU_TYPE=v4-16", "PLATFORM=cpu",
         "WORKDIR=gs://test-image/runs/image", "CONFIG=configs/demo.py",
         f"TRAIN_FLAGS={train_flags}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    spec = yaml.safe_load(done.stdout)["spec"]["replicatedJobs"][0]["template"]["spec"]
    (found,) = spec["template"]["spec"]["containers"]
    return found


def test_the_image_trains_the_jobsets_command_as_outside_it(built, tmp_path):
    digits = ROOT / "data" / "digits"
    flags = (f"--config.total_steps={STEPS} --config.log_every=1 --config.eval_every=0 "
             f"--config.save_every={STEPS} --config.optim.warmup_steps=2 "
             "--config.data.train_dir=/data/digits/train "
             "--config.data.val_dir=/data/digits/val")
    spec = manifest_container(flags)
    command = [a if not a.startswith("--workdir=") else "--workdir=/workdir"
               for a in spec["command"]]
    assert command[0] == IMAGE_PYTHON and "--expect_platform=cpu" in command
    assert "--expect_devices=8" in command and "--workdir=/workdir" in command
    env = {e["name"]: e["value"] for e in spec["env"]}
    assert env["JAX_PLATFORMS"] == "cpu"
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"  # GKE's chips, on a CPU
    inside = tmp_path / "inside"
    inside.mkdir()
    start = time.monotonic()
    with container.working(container.SIM_IMAGE, "vitpod-test-image") as name:
        done = subprocess.run(
            container.run_argv(name, command, env, {str(inside): "/workdir",
                                                    f"{digits}": "/data/digits:ro"}),
            capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    say(f"{STEPS} steps inside the image in {time.monotonic() - start:.0f} s")
    outside = tmp_path / "outside"
    local = [a.replace("/data/digits", str(digits)).replace(
        f"{IMAGE_HOME}/{protocol.CONFIGS}/", f"{ROOT / 'configs'}/") for a in command[1:]]
    local = [f"--workdir={outside}" if a.startswith("--workdir=") else a for a in local]
    done = subprocess.run([sys.executable, *local], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, **env})
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    losses_in, losses_out = read_losses(inside), read_losses(outside)
    assert sorted(losses_in) == list(range(1, STEPS + 1)), losses_in
    assert losses_in == pytest.approx(losses_out, rel=1e-6, abs=0)


def pins() -> dict[str, str]:
    lines = (ROOT / "deploy" / "constraints.txt").read_text().splitlines()
    found = dict(line.split("==", 1) for line in lines if "==" in line)
    return {name: found[name] for name in PINNED}


def test_the_image_has_the_pinned_versions_and_no_build_leftovers(built):
    python, _ = built
    probe = ("import importlib.metadata as m, json, platform; print(json.dumps({'python': "
             f"platform.python_version(), **{{n: m.version(n) for n in {PINNED!r}}}}}))")
    with container.working(container.SIM_IMAGE, "vitpod-test-image") as name:
        versions = json.loads(in_container(name, [IMAGE_PYTHON, "-c", probe]))
        home = in_container(name, ["ls", "-A", IMAGE_HOME]).split()
        leftovers = in_container(name, ["find", "/opt", "/root", "/tmp", "/var/cache", "(",
                                        "-name", "*.whl", "-o",
                                        "-name", ".cache", "-o", "-path", f"{BUILD_CACHE}/*",
                                        ")", "-print"], timeout=300)
    assert versions == {"python": python, **pins()}
    assert sorted(home) == sorted([".local", "vitpod-check.py", "vitpod-configs",
                                   "vitpod-constraints.txt", "vitpod-venv",
                                   "vitpod-worker.sh"])  # no wheel, no .cache
    assert leftovers == ""  # no wheel, no cache (uv's was mounted for the build only)
    config = container.image_config(container.SIM_IMAGE)
    names = {item.split("=", 1)[0] for item in config.get("Env") or []}
    assert names <= {"PATH", "HOME", "SSL_CERT_FILE"}, names  # no build argument kept
    assert config["WorkingDir"] == IMAGE_HOME and gke_image.SOURCE_LABEL in config["Labels"]
