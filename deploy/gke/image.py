"""`make image`: the container image the JobSet runs, built from this checkout with docker or
podman, wherever one can build.

The image is set up by the same script as a TPU VM (deploy/worker.sh setup: uv, a uv-managed
Python, the wheel[tpu] under deploy/constraints.txt), with the same environment names
(job.script_vars), in a home of its own: deploy/gke/Dockerfile. The build context is
staged as a TPU worker's files are, plus the checkout's configs/: nothing else of
the checkout (runs/, data/, .venv) reaches it. podman builds without a daemon, with chroot
isolation unless BUILDAH_ISOLATION says otherwise. The image carries the digest of its context
(label SOURCE_LABEL), so that `make gke-sim` can tell an image of this checkout.
"""

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
import zipfile

from deploy.gke.jobset import CONFIGS_DIR
from deploy.gke.settings import GkeSettings
from deploy.job import build_wheel, script_vars
from deploy.settings import DEPLOY_DIR
from deploy.shell import DeployError, reason
from vitpod import protocol

DOCKERFILE = os.path.join(DEPLOY_DIR, "gke", "Dockerfile")
TOOLS = ("docker", "podman")
SOURCE_LABEL = "vitpod.source"


def say(message: str) -> None:
    print(f"[image] {message}", flush=True)


def container_tool(dry_run: bool = False, run=subprocess.run, which=shutil.which) -> str:
    """docker when its daemon answers `docker info`, else podman when `podman info` works; a
    DeployError of one line saying what is missing otherwise."""
    found = [tool for tool in TOOLS if which(tool)]
    if not found:
        raise DeployError("make image needs docker (with a daemon it can reach) or podman; "
                          "neither is on PATH here")
    if dry_run:
        return found[0]
    problems = []
    for tool in found:
        try:
            done = run([tool, "info"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            problems.append(f"{tool} info: {reason(str(e), type(e).__name__)}")
            continue
        if done.returncode == 0:
            return tool
        problems.append(f"{tool} info: {reason(done.stderr or done.stdout, done.returncode)}")
    raise DeployError(f"{' and '.join(found)} cannot build here ({'; '.join(problems)}): run "
                      "make image where a docker daemon can be reached, or with podman")


def build_args(settings: GkeSettings, wheel: str) -> dict[str, str]:
    """The Dockerfile's ARGs: worker.sh's environment, its file name and the wheel's."""
    return {**script_vars(settings), "WORKER_SCRIPT": protocol.WORKER_SCRIPT,
            "WHEEL": os.path.basename(wheel)}


def stage(wheel: str, context: str) -> None:
    """The build context: the files a worker gets, named as it gets them, and configs/."""
    os.makedirs(context)
    files = {wheel: os.path.basename(wheel),
             os.path.join(DEPLOY_DIR, "constraints.txt"): protocol.CONSTRAINTS,
             os.path.join(DEPLOY_DIR, "worker.sh"): protocol.WORKER_SCRIPT,
             os.path.join(DEPLOY_DIR, "worker_check.py"): protocol.CHECK_SCRIPT}
    for src, name in files.items():
        shutil.copyfile(src, os.path.join(context, name))
    shutil.copytree(os.path.join(os.path.dirname(DEPLOY_DIR), CONFIGS_DIR),
                    os.path.join(context, protocol.CONFIGS),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def source_digest(context: str) -> str:
    """sha256 of a staged context: every file's path and bytes, a wheel's by its members, not
    its timestamps, RECORD (their hashes) or the README in METADATA (after its headers)."""
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(context)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, context).encode() + b"\0")
            if name.endswith(".whl") and zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as wheel:
                    for member in sorted(wheel.namelist()):
                        data = wheel.read(member)
                        if member.endswith(".dist-info/RECORD"):
                            continue
                        if member.endswith(".dist-info/METADATA"):
                            data = data.split(b"\n\n", 1)[0]
                        digest.update(member.encode() + b"\0" + data)
            else:
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()


def inspect(tool: str, tag: str, run=subprocess.run) -> dict | None:
    """`TOOL image inspect TAG` (its Config and Size), or None where there is no such image."""
    done = run([tool, "image", "inspect", tag], capture_output=True, text=True, timeout=60)
    if done.returncode:
        return None
    found = json.loads(done.stdout or "[]")
    return found[0] if found else None


def build(settings: GkeSettings, run=subprocess.run) -> None:
    """Build IMAGE (a tag, e.g. REGION-docker.pkg.dev/PROJECT/REPO/vitpod:TAG)."""
    settings.require("IMAGE")
    tool = container_tool(settings.dry_run, run)
    wheel = build_wheel(settings)
    args = build_args(settings, wheel)

    isolation = (["--isolation=chroot"] if tool == "podman"
                 and not os.environ.get("BUILDAH_ISOLATION") else [])

    def command(context: str, digest: str) -> list[str]:
        return [tool, "build", "-f", DOCKERFILE, "-t", settings.image, *isolation,
                f"--label={SOURCE_LABEL}={digest}", *shlex.split(settings.image_build_flags),
                *[f"--build-arg={k}={v}" for k, v in args.items()], context]

    if settings.dry_run:
        print(shlex.join(command("BUILD_CONTEXT", "DIGEST")))
        return
    say(f"building {settings.image} with {tool}: uv {settings.uv_version}, Python "
        f"{settings.python_version}, {args['WHEEL']}[tpu] with deploy/constraints.txt")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vitpod-image-") as scratch:
        context = os.path.join(scratch, "context")
        stage(wheel, context)
        done = run(command(context, source_digest(context)))
    if done.returncode:
        raise DeployError(f"{tool} build failed (exit {done.returncode}; its output is above)")
    found = inspect(tool, settings.image, run) or {}
    size = f"{found['Size'] / 1e9:.2f} GB" if found.get("Size") else "size unknown"
    say(f"built {settings.image} ({size}) in {time.monotonic() - start:.0f} s; push it where "
        f"the cluster pulls from: {tool} push {shlex.quote(settings.image)}")
