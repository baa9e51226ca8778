"""What both doors share: the trainer's command line, the job's label, the stall watch, the
preflight of a config against the slices it may get, the wheel and the worker script's
environment, the newest launch record, the local venv's Python, and the verb dispatcher.

deploy/tpu_vm (TPU VMs through queued resources) and deploy/gke (a JobSet) each import this and
never each other. Standard library only.
"""

import glob
import json
import os
import shlex
import subprocess
import sys
import time

from deploy.bucket import Bucket
from deploy.settings import DEPLOY_DIR, RunSettings, load_settings, slice_devices
from deploy.shell import DeployError, exit_code, log, reason
from deploy.tpu_types import libtpu_topology
from vitpod import protocol

ROOT = os.path.dirname(DEPLOY_DIR)


def local_python() -> str | None:
    """The checkout's .venv Python (make install), which has vitpod's dependencies; None
    when there is none."""
    python = os.path.join(ROOT, ".venv", "bin", "python")
    return python if os.path.exists(python) else None


def train_command(s: RunSettings, python: str, config: str, devices: int,
                  *extra: str) -> list[str]:
    """The trainer's command line on every host: the config and workdir, the platform and
    device count it must find (`devices`: the whole job's; 0 leaves it unchecked), `extra`
    flags, then TRAIN_FLAGS (last, so that they win)."""
    return [python, "-m", "vitpod.train", f"--config={config}", f"--workdir={s.workdir}",
            f"--expect_platform={s.platform}",
            *([f"--expect_devices={devices}"] if devices else []), *extra,
            *shlex.split(s.train_flags)]


def slice_label(tpu_type: str, slices: int) -> str:
    """What the goodput report calls the job's hardware: v4-32, or 2xv4-16 for two slices."""
    return tpu_type if slices == 1 else f"{slices}x{tpu_type}"


def preflight(s: RunSettings, jobs: list[tuple[str, int]], say=log,
              outcome: str = "nothing created") -> None:
    """The config against each (slice type, slice count) in `jobs` (vitpod.preflight, in the
    local venv): the global batch must divide over every one, and the launch's start-up runs on
    libtpu's description of each type's chips, in their real order. Its lines go to `say`."""
    python = local_python()
    counts = [(t, slice_devices(t), n) for t, n in jobs]
    if not python or not all(d for _, d, _ in counts):
        say("config not checked against the slice types (no .venv here: make install; or "
            "a type whose device count is unknown)")
        return
    flags = [f for f in shlex.split(s.train_flags) if f.startswith("--config.")]
    slices = ",".join((f"{t}={d}" if n == 1 else f"{n}x{t}={d * n}/{n}")
                      + (f"@{libtpu_topology(t)}" if libtpu_topology(t) else "")
                      for t, d, n in counts)
    check = [python, "-m", "vitpod.preflight", f"--config={s.config}", f"--slices={slices}",
             *flags]
    done = subprocess.run(check, capture_output=True, text=True, timeout=300)
    for line in done.stdout.splitlines():
        say(f"preflight: {line}")
    if done.returncode:
        why = reason(done.stderr, "").removeprefix("error: ") or f"exit {done.returncode}"
        raise DeployError(f"preflight: {why} ({outcome})")


# The names worker.sh finds in the worker's home, passed in its environment (it is bash).
HOME_NAMES = {"VENV": protocol.VENV, "CONFIGS": protocol.CONFIGS,
              "CONSTRAINTS": protocol.CONSTRAINTS, "CHECK_SCRIPT": protocol.CHECK_SCRIPT}


def script_vars(settings: RunSettings, **extra: str) -> dict[str, str]:
    """worker.sh's environment (the container image's build passes the same names)."""
    return {"PYTHON_VERSION": settings.python_version, "UV_VERSION": settings.uv_version,
            "PLATFORM": settings.platform, "PYPI_MIRROR": settings.pypi_mirror,
            "PYTHON_MIRROR": settings.python_mirror, **HOME_NAMES, **extra}


def script_env(settings: RunSettings, **extra: str) -> str:
    """worker.sh's environment as `KEY=value ...`, every value shell-quoted."""
    pairs = script_vars(settings, **extra)
    return " ".join(f"{k}={shlex.quote(str(v))}" for k, v in pairs.items())


def build_wheel(settings: RunSettings) -> str:
    if settings.wheel:  # a wheel built before: install it as it is
        return settings.wheel
    dist = os.path.join(ROOT, "dist")
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", dist, ROOT]
    if settings.dry_run:
        print(shlex.join(build))
        return os.path.join(dist, "vitpod-VERSION-py3-none-any.whl")
    subprocess.run(build, check=True)
    return max(glob.glob(os.path.join(dist, "vitpod-*.whl")), key=os.path.getmtime)


def newest_launch(bucket: Bucket, workdir: str) -> str:
    """The latest launch id in the workdir ('' when none)."""
    listed = bucket.list(protocol.launches_dir(workdir) + "/") or []
    return max(filter(None, (protocol.launch_of(workdir, line) for line in listed)), default="")


def report_flags(s: RunSettings) -> list[str]:
    """vitpod.report's flags for this run."""
    price = [f"--price_per_chip_hour={s.price_per_chip_hour:g}"] if s.price_per_chip_hour else []
    return [f"--workdir={s.workdir}", *price]


class Stall:
    """Whether the launch record (rewritten by process 0 at every log row) stopped changing for
    `timeout` seconds; 0 turns the check off."""

    def __init__(self, timeout: float):
        self.timeout, self.last, self.since = timeout, None, time.monotonic()

    def stuck(self, record: str | None) -> bool:
        if record != self.last:
            self.last, self.since = record, time.monotonic()
        return self.timeout > 0 and time.monotonic() - self.since > self.timeout

    def seen_as(self) -> str:
        if self.last is None:
            return "was never written"
        try:
            return f"stayed at step {json.loads(self.last)['progress']['step']}"
        except (ValueError, KeyError, TypeError):
            return "did not change"


def main(prog: str, verbs: dict, settings_type: type, argv: list[str]) -> int:
    """`python3 -m PROG VERB`: the settings (deploy/pod.env or $POD_ENV, overridden by
    same-named environment variables) read as `settings_type`, then verbs[VERB](settings);
    errors as `error: ...` lines (shell.exit_code)."""
    if len(argv) != 2 or argv[1] not in verbs:
        print(f"usage: python3 -m {prog} {{{'|'.join(verbs)}}}", file=sys.stderr)
        return 2

    def verb():
        path = os.environ.get("POD_ENV", os.path.join(DEPLOY_DIR, "pod.env"))
        verbs[argv[1]](load_settings(path, dict(os.environ), settings_type))

    return exit_code(verb)
