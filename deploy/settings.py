"""The settings of `make pod-*` and `make gke-*`: deploy/pod.env overridden by same-named
environment variables, read and checked once into a frozen RunSettings (the run's own) or a
door's subclass of it (deploy/tpu_vm/settings.py, deploy/gke/settings.py); what a TPU type
implies (runtime, device count).
"""

import dataclasses
import os
import re

from deploy.shell import DeployError
from vitpod import protocol

DEFAULTS = {"WORKER": "0", "PLATFORM": "tpu", "PYTHON_VERSION": "3.11.7", "UV_VERSION": "0.13.9",
            "WAIT_TIMEOUT": "7200", "POLL_SECONDS": "60", "MAX_RETRIES": "20",
            "READY_TIMEOUT": "900", "SSH_TIMEOUT": "900", "SSH_RETRIES": "4",
            "DESCRIBE_RETRIES": "8", "LOG_SYNC_SECONDS": "30", "CRASH_GRACE": "120",
            "STALL_TIMEOUT": "1800", "NUM_SLICES": "1",
            "COORDINATOR_PORT": str(protocol.DEFAULT_COORDINATOR_PORT), "INIT_TIMEOUT": "1800",
            "CAPACITY": "spot", "FREE_TPU": "0", "NAMESPACE": "default", "GRACE_SECONDS": "300"}
KEYS = ("PROJECT", "ZONE", "NAME", "TPU_TYPE", "TPU_TYPES", "QUEUE_TIMEOUT", "RUNTIME_VERSION",
        "CAPACITY", "WORKDIR", "CONFIG", "TRAIN_FLAGS", "WHEEL", "PYPI_MIRROR", "PYTHON_MIRROR",
        "PRICE_PER_CHIP_HOUR", "IMAGE", "IMAGE_BUILD_FLAGS", "CLUSTER", *DEFAULTS)
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
            "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
CAPACITY_FLAGS = {"spot": ["--spot"], "reserved": ["--reserved"], "on-demand": []}
DEPLOY_DIR = os.path.dirname(os.path.abspath(__file__))


def runtime_for(tpu_type: str, runtime_version: str = "") -> str:
    """The software version for a type: `runtime_version` when set, else its generation's."""
    if runtime_version:
        return runtime_version
    generation = tpu_type.rsplit("-", 1)[0]
    if generation not in RUNTIMES:
        raise DeployError(f"TPU_TYPE={tpu_type!r}: set RUNTIME_VERSION too (defaults exist for "
                          f"{', '.join(RUNTIMES)})")
    return RUNTIMES[generation]


def slice_devices(tpu_type: str) -> int | None:
    """JAX devices of a slice type: v4-N and v5p-N count TensorCores (2 per chip, one JAX
    device per chip), v5litepod-N and v6e-N count chips, v2-N and v3-N cores (one device each)."""
    generation, _, size = tpu_type.rpartition("-")
    if not size.isdigit():
        return None
    per_unit = {"v4": 0.5, "v5p": 0.5, "v5litepod": 1, "v6e": 1, "v2": 1, "v3": 1}
    return int(int(size) * per_unit[generation]) if generation in per_unit else None


def slice_workers(tpu_type: str) -> int | None:
    """TPU VMs (workers) of a slice type where every source agrees: 4 chips per VM on v4 and
    v5p, 8 cores on v2 and v3, one VM for v5litepod and v6e types of up to 8 chips; None for
    the others (docs/cloud.md: a real slice's workers are counted from gcloud)."""
    generation, _, size = tpu_type.rpartition("-")
    if not size.isdigit():
        return None
    if generation in ("v4", "v5p", "v2", "v3"):
        return max(1, int(size) // 8)
    return 1 if generation in ("v5litepod", "v6e") and int(size) <= 8 else None


# Compute Engine's rule for resource names, stricter than the TPU API's node id pattern:
# 1-63 characters, lowercase letters, digits and hyphens, a letter first, no hyphen last.
NAME_RULE = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


@dataclasses.dataclass(frozen=True)
class SliceType:
    """One slice type to ask for: its name (v4-32), zone and software version."""

    name: str
    zone: str
    runtime: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSettings:
    """The run's own settings, whichever door launches it; `slice_types` is TPU_TYPES (or
    TPU_TYPE), most wanted first. deploy/tpu_vm and deploy/gke each add their own."""

    asks_runtime = False  # a TPU type's software version is asked for (TPU VMs), not carried

    name: str
    slice_types: tuple[SliceType, ...]
    slice_counts: tuple[int, ...]
    capacity: str
    workdir: str
    config: str
    train_flags: str
    wheel: str
    pypi_mirror: str
    python_mirror: str
    price_per_chip_hour: float
    worker: str
    platform: str
    python_version: str
    uv_version: str
    poll_seconds: float
    max_retries: int
    ready_timeout: float
    stall_timeout: float
    coordinator_port: int
    init_timeout: float
    dry_run: bool = False

    @property
    def num_slices(self) -> int:
        """The most wanted number of slices (NUM_SLICES=4,2,1: 4)."""
        return self.slice_counts[0]

    @property
    def tpu_type(self) -> str:
        """The most wanted type ('' when none is set)."""
        return self.slice_types[0].name if self.slice_types else ""

    def require(self, *keys: str) -> None:
        """DeployError unless every named setting is set (and WORKDIR, if named, is gs://)."""
        missing = [k for k in keys if not (self.tpu_type if k == "TPU_TYPE"
                                           else getattr(self, k.lower()))]
        if missing:
            raise DeployError(f"set {', '.join(missing)} in deploy/pod.env or on the command line")
        if "WORKDIR" in keys and not self.workdir.startswith("gs://"):
            raise DeployError(f"WORKDIR={self.workdir!r}: use a gs:// path; a worker's disk dies "
                              "with the slice")


def _read_env_file(path: str) -> dict[str, str]:
    values = {}
    if os.path.exists(path):
        for line in open(path):
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                values[key.strip()] = value.strip()
    return values


def load_settings(path: str, env: dict, settings_type: type = RunSettings):
    """DEFAULTS, then the file at `path`, then `env`, read as `settings_type` (RunSettings or
    a door's subclass of it); every bad value named, one per line."""
    tpu_vms = settings_type.asks_runtime
    raw = {**DEFAULTS, **_read_env_file(path), **{k: env[k] for k in KEYS if k in env}}
    problems = []

    def number(key: str, kind=float, empty=None):
        value = raw.get(key, "")
        if not value and empty is not None:
            return empty
        try:
            return kind(value)
        except ValueError:
            problems.append(f"{key}={value!r}: not {'a whole' if kind is int else 'a'} number")
            return kind(0)

    name = raw.get("NAME", "")
    # multislice nodes are NAME-0 .. NAME-(N-1): the longest must follow the rule too
    most = max([int(n) for n in raw["NUM_SLICES"].split(",") if n.strip().isdigit()] or [1])
    longest = f"{name}-{most - 1}" if most > 1 else name
    if tpu_vms and name and not NAME_RULE.fullmatch(longest):
        problems.append(f"NAME={name!r}: use lowercase letters, digits and hyphens, a letter "
                        "first and no hyphen last, at most 63 characters"
                        + (f" with the node suffix ({longest})" if longest != name else "")
                        + " (the rule of TPU and Compute Engine names)")
    if raw["CAPACITY"] not in CAPACITY_FLAGS:
        problems.append(f"CAPACITY={raw['CAPACITY']!r}: use one of {', '.join(CAPACITY_FLAGS)}")
    if not (raw["WORKER"] == "all" or raw["WORKER"].isdigit()):
        problems.append(f"WORKER={raw['WORKER']!r}: use a worker's index or all")
    slice_counts = []
    for item in raw["NUM_SLICES"].split(","):
        if not item.strip().isdigit() or int(item) < 1:
            problems.append(f"NUM_SLICES={raw['NUM_SLICES']!r}: use a number of slices >= 1, or "
                            "several, most wanted first (4,2,1)")
            break
        slice_counts.append(int(item))
    if raw["FREE_TPU"] not in ("0", "1"):
        problems.append(f"FREE_TPU={raw['FREE_TPU']!r}: use 1 (stop the processes that hold "
                        "the TPU) or 0")
    if raw["GRACE_SECONDS"].lstrip("-").isdigit() and int(raw["GRACE_SECONDS"]) < 0:
        problems.append(f"GRACE_SECONDS={raw['GRACE_SECONDS']!r}: use a number of seconds >= 0")
    port = number("COORDINATOR_PORT", int)
    if raw["COORDINATOR_PORT"].isdigit() and not 0 < port < 65536:
        problems.append(f"COORDINATOR_PORT={raw['COORDINATOR_PORT']!r}: not a TCP port")
    slice_types = []
    for item in filter(None, (raw.get("TPU_TYPES") or raw.get("TPU_TYPE", "")).split(",")):
        tpu_type, _, zone = (part.strip() for part in item.partition("@"))
        try:
            runtime = runtime_for(tpu_type, raw.get("RUNTIME_VERSION", "")) if tpu_vms else ""
        except DeployError as e:
            problems.append(str(e))
            continue
        slice_types.append(SliceType(tpu_type, zone or raw.get("ZONE", ""), runtime))
    values = dict(
        project=raw.get("PROJECT", ""), zone=raw.get("ZONE", ""), name=raw.get("NAME", ""),
        slice_types=tuple(slice_types), queue_timeout=number("QUEUE_TIMEOUT", empty=0.0),
        capacity=raw["CAPACITY"], workdir=raw.get("WORKDIR", ""), config=raw.get("CONFIG", ""),
        train_flags=raw.get("TRAIN_FLAGS", ""), wheel=raw.get("WHEEL", ""),
        pypi_mirror=raw.get("PYPI_MIRROR", ""), python_mirror=raw.get("PYTHON_MIRROR", ""),
        price_per_chip_hour=number("PRICE_PER_CHIP_HOUR", empty=0.0), worker=raw["WORKER"],
        platform=raw["PLATFORM"], python_version=raw["PYTHON_VERSION"],
        uv_version=raw["UV_VERSION"], wait_timeout=number("WAIT_TIMEOUT"),
        poll_seconds=number("POLL_SECONDS"), max_retries=number("MAX_RETRIES", int),
        ready_timeout=number("READY_TIMEOUT"), ssh_timeout=number("SSH_TIMEOUT"),
        ssh_retries=number("SSH_RETRIES", int), describe_retries=number("DESCRIBE_RETRIES", int),
        log_sync_seconds=number("LOG_SYNC_SECONDS"), crash_grace=number("CRASH_GRACE"),
        stall_timeout=number("STALL_TIMEOUT"), slice_counts=tuple(slice_counts) or (1,),
        coordinator_port=port, init_timeout=number("INIT_TIMEOUT"),
        free_tpu=raw["FREE_TPU"] == "1", image=raw.get("IMAGE", ""),
        image_build_flags=raw.get("IMAGE_BUILD_FLAGS", ""),
        cluster=raw.get("CLUSTER", ""), namespace=raw["NAMESPACE"],
        grace_seconds=number("GRACE_SECONDS", int), dry_run=env.get("DRY_RUN") == "1")
    if problems:
        raise DeployError("\n".join(problems))
    return settings_type(**{f.name: values[f.name] for f in dataclasses.fields(settings_type)})
