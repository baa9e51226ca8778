"""Containers without a daemon, for `make test-image` and `make gke-sim`: a local Debian 12
base made with debootstrap (no registry image can be pulled here), and buildah working
containers whose commands run with chroot isolation (`podman run` needs an OCI runtime that
cannot set its limits in these sandboxes). A chroot shares the host's process table, and
runs here with its network and host name: the pods' loopback addresses and the simulation's
process tags work as outside.
"""

import contextlib
import json
import os
import shutil
import subprocess
import tempfile

# The image `make test-image` builds and `make gke-sim` runs its pods in, when present.
SIM_IMAGE = "localhost/vitpod:sim"
# Debian 12 with its python3 (3.11.2), venv, pip and CA certificates: the test build's base.
BASE_IMAGE = "localhost/vitpod-test-base:bookworm"
BASE_PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # Debian's, in the base
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # as Docker's
APT_PACKAGES = {"podman": "podman", "buildah": "buildah", "debootstrap": "debootstrap"}


def tools_missing() -> list[str]:
    return [tool for tool in APT_PACKAGES if not shutil.which(tool)]


def install_tools(say=print) -> None:
    """apt-get install what is missing of podman, buildah and debootstrap (as root)."""
    missing = tools_missing()
    if not missing:
        return
    say(f"installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(["apt-get", "install", "-y", "-q", *map(APT_PACKAGES.get, missing)],
                      env=env, stdout=subprocess.DEVNULL).returncode:
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL,
                       check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", *map(APT_PACKAGES.get, missing)],
                       env=env, stdout=subprocess.DEVNULL, check=True)


def image_exists(tag: str) -> bool:
    return bool(shutil.which("podman")) and subprocess.run(
        ["podman", "image", "exists", tag], capture_output=True).returncode == 0


def image_config(tag: str) -> dict:
    """The image's config (Env, WorkingDir, Labels ...), {} where there is no such image."""
    done = subprocess.run(["podman", "image", "inspect", tag], capture_output=True, text=True)
    return {} if done.returncode else json.loads(done.stdout)[0].get("Config") or {}


def image_labels(tag: str) -> dict[str, str]:
    return image_config(tag).get("Labels") or {}


def host_ca_bundle() -> str:
    """The CA certificates this machine trusts (SSL_CERT_FILE, else Debian's bundle), or ''."""
    for path in (os.environ.get("SSL_CERT_FILE", ""), CA_BUNDLE):
        if path and os.path.isfile(path):
            return path
    return ""


def make_base(say=print) -> str:
    """BASE_IMAGE, made once per machine (a podman image that persists between runs). It
    trusts the CAs this machine trusts, for pip and uv too (SSL_CERT_FILE): where the network
    inspects TLS, the build's downloads would fail otherwise."""
    if image_exists(BASE_IMAGE):
        return BASE_IMAGE
    say(f"making {BASE_IMAGE} with debootstrap (about a minute)")
    with tempfile.TemporaryDirectory(prefix="vitpod-base-") as scratch:
        root = os.path.join(scratch, "rootfs")
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}",
                        "bookworm", root, DEBIAN_MIRROR], stdout=subprocess.DEVNULL, check=True)
        shutil.rmtree(os.path.join(root, "var", "cache", "apt", "archives"), ignore_errors=True)
        changes = ["--change", f"ENV=PATH={BASE_PATH}"]
        if host_ca_bundle():
            shutil.copyfile(host_ca_bundle(), os.path.join(root, CA_BUNDLE.lstrip("/")))
            changes += ["--change", f"ENV=SSL_CERT_FILE={CA_BUNDLE}"]
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["podman", "import", *changes, "-", BASE_IMAGE],
                       stdin=tar.stdout, stdout=subprocess.DEVNULL, check=True)
        if tar.wait():
            raise RuntimeError("tar of the debootstrap root failed")
    return BASE_IMAGE


def create(tag: str, name: str) -> str:
    """A working container of image `tag` named `name` (an old one of that name removed)."""
    remove(name)
    subprocess.run(["buildah", "from", "--pull=never", "--quiet", "--name", name, tag],
                   stdout=subprocess.DEVNULL, check=True)
    return name


def remove(*names: str) -> None:
    for name in names:
        subprocess.run(["buildah", "rm", name], capture_output=True)


def remove_prefixed(prefix: str) -> None:
    """Every working container whose name starts with `prefix` (left by a killed run)."""
    done = subprocess.run(["buildah", "containers", "--format", "{{.ContainerName}}"],
                          capture_output=True, text=True)
    remove(*[n for n in done.stdout.split() if n.startswith(prefix)])


def run_argv(container: str, command: list[str], env: dict[str, str],
             volumes: dict[str, str] | None = None, workdir: str = "") -> list[str]:
    """`buildah run` of `command` in `container`: the image's own environment and working
    directory plus `env`, `volumes` (host path: path inside) mounted, the host's network and
    host name, as a GKE pod with hostNetwork has (gloo's CPU collectives resolve it)."""
    return ["buildah", "run", "--isolation=chroot", "--network=host", "--uts=host",
            *[f"--env={k}={v}" for k, v in env.items()],
            *[f"--volume={h}:{c}" for h, c in (volumes or {}).items()],
            *([f"--workingdir={workdir}"] if workdir else []), container, "--", *command]


@contextlib.contextmanager
def working(tag: str, name: str):
    """A working container for the block, removed after it."""
    try:
        yield create(tag, name)
    finally:
        remove(name)
