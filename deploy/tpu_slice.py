"""A TPU slice as one queued resource and its node: created with fallback types, waited through
its documented states, deleted. Standard library only.

Queued-resource states: https://cloud.google.com/tpu/docs/queued-resources
"""

import json
import time

from deploy.gcloud_cli import Gcloud, PodError, log, reason
from deploy.settings import CAPACITY_FLAGS, Settings, SliceType
from deploy.slices import Health
from deploy.tpu_workers import TpuVmWorkers

# Waiting ones, and the node's states after which the slice is gone.
WAITING = ("ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "CREATING")
NODE_GONE = ("PREEMPTED", "TERMINATED", "NOT_FOUND")
# The queued resource's states after which the slice must be replaced.
LOST = ("FAILED", "SUSPENDED", "NOT_FOUND", "DELETING")


class QueuedResource:
    """The queued resource NAME: which type and zone it asked for last, and what it got."""

    def __init__(self, settings: Settings, gcloud: Gcloud):
        self.settings, self.g, self.sleep = settings, gcloud, gcloud.sleep
        self.name = settings.name
        self.types = settings.slice_types or (SliceType("", settings.zone, ""),)
        self.asked = self.types[0]  # the type (and zone) the slice is asked for in
        self.obtained = ""  # the type the node reports, once read
        self.bucket_location, self.warned = None, set()

    def _where(self) -> list[str]:
        return [f"--project={self.settings.project}", f"--zone={self.asked.zone}"]

    def _qr(self, verb: str, *args: str) -> list[str]:
        return ["compute", "tpus", "queued-resources", verb, self.name, *args, *self._where()]

    # --- what it is --------------------------------------------------------------------------
    def state(self) -> tuple[str, str]:
        found = self.g.describe(*self._qr("describe"), retries=self.settings.describe_retries)
        if found is None:
            return "NOT_FOUND", ""
        state = found.get("state", {})
        message = state.get("failedData", {}).get("error", {}).get("message", "")
        return state.get("state", "UNKNOWN"), message

    def _node(self) -> dict | None:
        return self.g.describe("compute", "tpus", "tpu-vm", "describe", self.name,
                               *self._where(), retries=self.settings.describe_retries)

    def health(self) -> Health:
        state, message = self.state()
        if state in LOST:
            return Health(lost=f"queued resource {state}" + (f": {message}" if message else ""))
        if state == "ACTIVE":
            node = self._node()
            node_state = "NOT_FOUND" if node is None else node.get("state", "")
            return Health(lost=f"node {node_state}") if node_state in NODE_GONE else Health(
                up=True)
        return Health(note=f"{self.name}: {state}" + (" (preemption notice); waiting"
                                                      if state == "SUSPENDING" else "; waiting"))

    def workers(self) -> TpuVmWorkers:
        if self.settings.dry_run:
            return TpuVmWorkers(self.g, self.settings, self.asked.zone, 1)
        node = self._node()
        if node is None:
            raise PodError(f"no TPU VM named {self.name}: make pod-create first")
        # The slice we have, whichever of the fallback types it is.
        self.obtained = node.get("acceleratorType") or ""
        return TpuVmWorkers(self.g, self.settings, self.asked.zone,
                            max(1, len(node.get("networkEndpoints", []))))

    def accelerator_type(self) -> str:
        return self.obtained or self.asked.name

    # --- its life cycle ----------------------------------------------------------------------
    def create(self) -> bool:
        """Make the queued resource ACTIVE: create it, wait through its states, and replace
        one that FAILED or was suspended (spot VMs cannot be restarted). With fallback types
        (TPU_TYPES), a request that FAILED or waited QUEUE_TIMEOUT s gives way to the next.
        True when the slice is new (its workers need setting up)."""
        s = self.settings
        s.require("PROJECT", "ZONE", "NAME", "TPU_TYPE")
        if s.dry_run:  # the request it would send first
            self._use(0)
            self._create_request()
            log(f"{self.name}: ACTIVE")
            return True
        deadline = time.monotonic() + s.wait_timeout
        failures, last, index, asked, made = 0, None, 0, None, False
        while True:
            state, message = self.state()
            if state != last:
                log(f"{self.name}: {state}" + (f" ({message})" if message else ""))
                last = state
            if state == "ACTIVE" and self._node() is not None:
                count = self.workers().count
                log(f"{self.name}: {count} worker(s) of {self.accelerator_type()}")
                return made
            if state in WAITING and asked is None:  # a request from before: time it from now
                asked = time.monotonic()
            waited = asked is not None and time.monotonic() - asked > s.queue_timeout > 0
            if state == "NOT_FOUND":
                if not made:  # the first request of this call: the most wanted type
                    self._use(index)
                self._create_request()
                asked, made = time.monotonic(), True
            elif state == "FAILED" or (state in WAITING and waited and len(self.types) > 1):
                failures += state == "FAILED"
                if failures > s.max_retries:
                    raise PodError(f"{self.name} FAILED {failures} times, last: {message}")
                why = (f"FAILED: {message or 'no reason given'}" if state == "FAILED" else
                       f"waited {s.queue_timeout:g} s for capacity")
                self.delete()
                if len(self.types) > 1:
                    index = (index + 1) % len(self.types)
                    log(f"{self.types[index - 1].name} {why}; asking for "
                        f"{self.types[index].name} instead")
                    self._use(index)
                else:
                    log(f"{self.name} {why}; deleted it, asking again ({failures}/"
                        f"{s.max_retries})")
                self._create_request()
                asked, made, last = time.monotonic(), True, None
                continue
            elif state in ("SUSPENDED", "ACTIVE"):  # ACTIVE here: its node is gone
                log(f"{self.name}: " + ("suspended (spot capacity taken back)" if
                    state == "SUSPENDED" else "ACTIVE but its node is gone") + "; replacing it")
                self.delete()
                last = None
                continue
            if time.monotonic() > deadline:
                raise PodError(f"{self.name} still {state} after {s.wait_timeout:g} s"
                               " (no capacity yet); raise WAIT_TIMEOUT or try another zone")
            self.sleep(s.poll_seconds)

    def _use(self, index: int) -> None:
        """Ask for fallback type `index` next (its zone, its generation's runtime)."""
        self.asked, self.obtained = self.types[index], ""
        if len(self.types) > 1 and not self.settings.dry_run:
            self._warn_if_far(self.asked.zone)

    def _warn_if_far(self, zone: str) -> None:
        """A slice in another region than the bucket pays egress for every image it reads."""
        if self.bucket_location is None:
            bucket = self.settings.workdir.removeprefix("gs://").split("/")[0]
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
        s, asked = self.settings, self.asked
        log(f"asking for {self.name}: {asked.name}, {s.capacity}, {asked.runtime}")
        code, _, err = self.g.call(*self._qr(
            "create", f"--node-id={self.name}", f"--accelerator-type={asked.name}",
            f"--runtime-version={asked.runtime}", *CAPACITY_FLAGS[s.capacity],
            # GA: the request turns FAILED when it waited this long (then the next type).
            *([f"--valid-until-duration={s.queue_timeout:g}s"] if s.queue_timeout > 0 else [])),
            retries=3)
        if code and "ALREADY_EXISTS" not in err:  # a retry after a request that got through
            raise PodError(f"creating {self.name} failed: {reason(err, code)}")

    def delete(self) -> None:
        """Delete the queued resource and its node; wait until the name is free again."""
        log(f"deleting {self.name} (queued resource and its node)")
        code, _, err = self.g.call(*self._qr("delete", "--force", "--quiet", "--async"),
                                   retries=3)
        if code and "NOT_FOUND" not in err:
            raise PodError(f"deleting {self.name} failed: {reason(err, code)}")
        if self.settings.dry_run:
            return
        s, last = self.settings, None
        deadline = time.monotonic() + s.wait_timeout
        while (state := self.state()[0]) != "NOT_FOUND":
            if state != last:
                log(f"{self.name}: {state}")
                last = state
            if time.monotonic() > deadline:
                raise PodError(f"{self.name} still {state} {s.wait_timeout:g} s after its "
                               "deletion: check make pod-status / the console")
            self.sleep(min(s.poll_seconds, 10))
        log(f"{self.name}: deleted")
