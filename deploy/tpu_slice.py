"""A TPU slice as a queued resource: settings, what a type implies, and its life cycle
(create with fallback types, wait through the documented states, delete). Standard library
only.
"""

import json
import os
import time

from gcloud_cli import Gcloud, PodError, last_line, log

# Queued-resource states (CLOUD.md): waiting ones, and those after which the slice is gone.
WAITING = ("ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "CREATING")
NODE_GONE = ("PREEMPTED", "TERMINATED", "NOT_FOUND")
DEFAULTS = {"WORKER": "0", "PLATFORM": "tpu", "PYTHON_VERSION": "3.11.7", "UV_VERSION": "0.13.9",
            "WAIT_TIMEOUT": "7200", "POLL_SECONDS": "60", "MAX_RETRIES": "20",
            "READY_TIMEOUT": "900", "SSH_TIMEOUT": "900", "SSH_RETRIES": "4",
            "DESCRIBE_RETRIES": "8", "LOG_SYNC_SECONDS": "30", "CRASH_GRACE": "120",
            "CAPACITY": "spot"}
KEYS = ("PROJECT", "ZONE", "NAME", "TPU_TYPE", "TPU_TYPES", "QUEUE_TIMEOUT", "RUNTIME_VERSION",
        "CAPACITY", "WORKDIR", "CONFIG", "TRAIN_FLAGS", "WHEEL", "PYPI_MIRROR", "PYTHON_MIRROR",
        "PRICE_PER_CHIP_HOUR", *DEFAULTS)
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
            "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
CAPACITY_FLAGS = {"spot": ["--spot"], "reserved": ["--reserved"], "on-demand": []}
HERE = os.path.dirname(os.path.abspath(__file__))


def load_settings(path: str, env: dict) -> dict:
    settings = dict(DEFAULTS)
    if os.path.exists(path):
        for line in open(path):
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                settings[key.strip()] = value.strip()
    settings.update({k: env[k] for k in KEYS if k in env})
    if settings["CAPACITY"] not in CAPACITY_FLAGS:
        raise PodError(f"CAPACITY={settings['CAPACITY']!r}: use one of {', '.join(CAPACITY_FLAGS)}")
    if settings.get("TPU_TYPES"):  # fallbacks, most wanted first: v4-32,v4-16@us-central2-a
        settings["TPU_TYPE"] = settings["TPU_TYPES"].split(",")[0].split("@")[0].strip()
    for item in (settings.get("TPU_TYPES") or settings.get("TPU_TYPE", "")).split(","):
        runtime_for(item.split("@")[0].strip(), settings)  # a type without a default fails now
    return settings


def runtime_for(tpu_type: str, settings: dict) -> str:
    """The software version for a type: RUNTIME_VERSION when set, else its generation's."""
    if settings.get("RUNTIME_VERSION"):
        return settings["RUNTIME_VERSION"]
    generation = tpu_type.rsplit("-", 1)[0]
    if generation not in RUNTIMES:
        raise PodError(f"TPU_TYPE={tpu_type!r}: set RUNTIME_VERSION too (defaults exist for "
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


class Slice:
    """The queued resource NAME and its node, as the settings describe them."""

    def __init__(self, settings: dict, dry_run: bool = False, sleep=time.sleep):
        self.s, self.dry_run, self.sleep = settings, dry_run, sleep
        self.g = Gcloud(dry_run, sleep, float(settings["SSH_TIMEOUT"]))
        self.launch_id, self.bucket_location, self.warned = "", None, set()
        self.explicit_runtime = settings.get("RUNTIME_VERSION", "")
        self.types = [(item.split("@")[0].strip(), item.partition("@")[2].strip()
                       or settings.get("ZONE", ""))
                      for item in (settings.get("TPU_TYPES") or settings.get("TPU_TYPE", ""))
                      .split(",")]

    def need(self, *keys: str) -> None:
        missing = [k for k in keys if not self.s.get(k)]
        if missing:
            raise PodError(f"set {', '.join(missing)} in deploy/pod.env or on the command line")
        if "WORKDIR" in keys and not self.s["WORKDIR"].startswith("gs://"):
            raise PodError(f"WORKDIR={self.s['WORKDIR']!r}: use a gs:// path; a worker's disk "
                           "dies with the slice")

    def num(self, key: str) -> float:
        return float(self.s[key])

    def _where(self) -> list[str]:
        return [f"--project={self.s['PROJECT']}", f"--zone={self.s['ZONE']}"]

    def _qr(self, verb: str, *args: str) -> list[str]:
        return ["compute", "tpus", "queued-resources", verb, self.s["NAME"], *args, *self._where()]

    def _vm(self, verb: str, *args: str) -> list[str]:
        return ["compute", "tpus", "tpu-vm", verb, *args, *self._where()]

    # --- the slice's state -------------------------------------------------------------
    def qr_state(self) -> tuple[str, str]:
        """(state, failure message); ('NOT_FOUND', '') when there is no queued resource."""
        found = self.g.describe(*self._qr("describe"), retries=int(self.num("DESCRIBE_RETRIES")))
        if found is None:
            return "NOT_FOUND", ""
        state = found.get("state", {})
        message = state.get("failedData", {}).get("error", {}).get("message", "")
        return state.get("state", "UNKNOWN"), message

    def node(self) -> dict | None:
        return self.g.describe(*self._vm("describe", self.s["NAME"]),
                               retries=int(self.num("DESCRIBE_RETRIES")))

    def workers(self) -> int:
        """Workers of the slice, counted from its network endpoints (never from a table)."""
        node = self.node()
        if node is None:
            raise PodError(f"no TPU VM named {self.s['NAME']}: make pod-create first")
        # The slice we have, whichever of the fallback types it is.
        self.s["TPU_TYPE"] = node.get("acceleratorType") or self.s["TPU_TYPE"]
        return max(1, len(node.get("networkEndpoints", [])))

    def create(self) -> bool:
        """Make the queued resource ACTIVE: create it, wait through its states, and replace
        one that FAILED or was suspended (spot VMs cannot be restarted). With fallback types
        (TPU_TYPES), a request that FAILED or waited QUEUE_TIMEOUT s gives way to the next.
        True when the slice is new (its workers need setting up)."""
        self.need("PROJECT", "ZONE", "NAME", "TPU_TYPE")
        deadline = time.monotonic() + self.num("WAIT_TIMEOUT")
        failures, last, index, asked, made = 0, None, 0, None, self.dry_run
        queue_timeout = float(self.s.get("QUEUE_TIMEOUT") or 0)
        while True:
            state, message = ("ACTIVE", "") if self.dry_run else self.qr_state()
            if state != last:
                log(f"{self.s['NAME']}: {state}" + (f" ({message})" if message else ""))
                last = state
            if state == "ACTIVE" and (self.dry_run or self.node() is not None):
                if not self.dry_run:
                    log(f"{self.s['NAME']}: {self.workers()} worker(s) of {self.s['TPU_TYPE']}")
                return made
            if state in WAITING and asked is None:  # a request from before: time it from now
                asked = time.monotonic()
            waited = asked is not None and time.monotonic() - asked > queue_timeout > 0
            if state == "NOT_FOUND":
                if not made:  # the first request of this call: the most wanted type
                    self._use(index)
                self._create_request()
                asked, made = time.monotonic(), True
            elif state == "FAILED" or (state in WAITING and waited and len(self.types) > 1):
                failures += state == "FAILED"
                if failures > int(self.num("MAX_RETRIES")):
                    raise PodError(f"{self.s['NAME']} FAILED {failures} times, last: {message}")
                why = (f"FAILED: {message or 'no reason given'}" if state == "FAILED" else
                       f"waited {queue_timeout:g} s for capacity")
                self.delete()
                if len(self.types) > 1:
                    index = (index + 1) % len(self.types)
                    log(f"{self.types[index - 1][0]} {why}; asking for {self.types[index][0]}"
                        " instead")
                    self._use(index)
                else:
                    log(f"{self.s['NAME']} {why}; deleted it, asking again ({failures}/"
                        f"{self.s['MAX_RETRIES']})")
                self._create_request()
                asked, made, last = time.monotonic(), True, None
                continue
            elif state in ("SUSPENDED", "ACTIVE"):  # ACTIVE here: its node is gone
                log(f"{self.s['NAME']}: " + ("suspended (spot capacity taken back)" if
                    state == "SUSPENDED" else "ACTIVE but its node is gone") + "; replacing it")
                self.delete()
                last = None
                continue
            if time.monotonic() > deadline:
                raise PodError(f"{self.s['NAME']} still {state} after {self.s['WAIT_TIMEOUT']} s"
                               " (no capacity yet); raise WAIT_TIMEOUT or try another zone")
            self.sleep(self.num("POLL_SECONDS"))

    def _use(self, index: int) -> None:
        """Ask for fallback type `index` next (its zone, its generation's runtime)."""
        tpu_type, zone = self.types[index]
        self.s.update(TPU_TYPE=tpu_type, ZONE=zone, RUNTIME_VERSION=runtime_for(
            tpu_type, {"RUNTIME_VERSION": self.explicit_runtime}))
        if len(self.types) > 1 and not self.dry_run:
            self._warn_if_far(zone)

    def _warn_if_far(self, zone: str) -> None:
        """A slice in another region than the bucket pays egress for every image it reads."""
        if self.bucket_location is None:
            bucket = self.s.get("WORKDIR", "").removeprefix("gs://").split("/")[0]
            code, out, _ = self.g.call("storage", "buckets", "describe", f"gs://{bucket}",
                                       "--format=json", retries=2, timeout=120)
            self.bucket_location = json.loads(out).get("location", "").lower() if code == 0 \
                else ""
        region = zone.rsplit("-", 1)[0]
        if "-" in self.bucket_location and region != self.bucket_location \
                and zone not in self.warned:
            self.warned.add(zone)
            log(f"warning: zone {zone} is outside the bucket's region {self.bucket_location}:"
                " reading the data there costs egress")

    def _create_request(self) -> None:
        log(f"asking for {self.s['NAME']}: {self.s['TPU_TYPE']}, {self.s['CAPACITY']}, "
            f"{self.s['RUNTIME_VERSION']}")
        code, _, err = self.g.call(*self._qr(
            "create", f"--node-id={self.s['NAME']}", f"--accelerator-type={self.s['TPU_TYPE']}",
            f"--runtime-version={self.s['RUNTIME_VERSION']}",
            *CAPACITY_FLAGS[self.s["CAPACITY"]],
            # GA: the request turns FAILED when it waited this long (then the next type).
            *([f"--valid-until-duration={self.s['QUEUE_TIMEOUT']}s"]
              if float(self.s.get("QUEUE_TIMEOUT") or 0) > 0 else [])), retries=3)
        if code and "ALREADY_EXISTS" not in err:  # a retry after a request that got through
            raise PodError(f"creating {self.s['NAME']} failed: {last_line(err) or code}")

    def delete(self) -> None:
        """Delete the queued resource and its node; wait until the name is free again."""
        log(f"deleting {self.s['NAME']} (queued resource and its node)")
        code, _, err = self.g.call(*self._qr("delete", "--force", "--quiet", "--async"),
                                   retries=3)
        if code and "NOT_FOUND" not in err:
            raise PodError(f"deleting {self.s['NAME']} failed: {last_line(err) or code}")
        if self.dry_run:
            return
        last, deadline = None, time.monotonic() + self.num("WAIT_TIMEOUT")
        while (state := self.qr_state()[0]) != "NOT_FOUND":
            if state != last:
                log(f"{self.s['NAME']}: {state}")
                last = state
            if time.monotonic() > deadline:
                raise PodError(f"{self.s['NAME']} still {state} {self.s['WAIT_TIMEOUT']} s after "
                               "its deletion: check make pod-status / the console")
            self.sleep(min(self.num("POLL_SECONDS"), 10))
        log(f"{self.s['NAME']}: deleted")
