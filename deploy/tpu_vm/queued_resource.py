"""A TPU slice as one queued resource and its node, or a multislice job as one queued resource
and a node per slice: created with fallback types and slice counts, waited through its
documented states, deleted. Standard library only.

Queued-resource states: https://cloud.google.com/tpu/docs/queued-resources
Multislice (`--node-count`, `--node-prefix`; nodes PREFIX-0 ..):
https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/create
"""

import json
import time

from deploy.settings import CAPACITY_FLAGS, SliceType, slice_workers
from deploy.shell import Cli, DeployError, log, reason
from deploy.tpu_vm.settings import TpuVmSettings
from deploy.tpu_vm.slices import Health
from deploy.tpu_vm.workers import MultisliceWorkers, TpuVmWorkers

# Waiting ones, and the node's states after which the slice is gone.
WAITING = ("ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "CREATING")
NODE_GONE = ("PREEMPTED", "TERMINATED", "NOT_FOUND")
# The queued resource's states after which the slice must be replaced.
LOST = ("FAILED", "SUSPENDED", "NOT_FOUND", "DELETING")
# A preempted spot VM's processes get SIGTERM, and the VM stops about this long after
# (Compute Engine, "Spot VMs"): the trainers' time to save.
SPOT_NOTICE_SECONDS = 30


class QueuedResource:
    """The queued resource NAME: which type, zone and number of slices it asked for last, and
    what it got. The requests it may make, most wanted first: each of TPU_TYPES with each of
    NUM_SLICES (TPU_TYPES=v5litepod-32,v5litepod-16 NUM_SLICES=2,1: 2 x 32, 1 x 32, 2 x 16,
    1 x 16)."""

    def __init__(self, settings: TpuVmSettings, gcloud: Cli):
        self.settings, self.g, self.sleep = settings, gcloud, gcloud.sleep
        self.name = settings.name
        types = settings.slice_types or (SliceType("", settings.zone, ""),)
        self.options = [(t, n) for t in types for n in settings.slice_counts]
        self.asked, self.asked_slices = self.options[0]  # what it asks for (type, zone; slices)
        self.obtained, self.obtained_slices = "", 0  # what the nodes report, once read
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

    def _node(self, name: str) -> dict | None:
        return self.g.describe("compute", "tpus", "tpu-vm", "describe", name, *self._where(),
                               retries=self.settings.describe_retries)

    def node_names(self) -> list[str]:
        """Its nodes, as the queued resource lists them: NAME, or PREFIX-0 .. for multislice."""
        if self.settings.dry_run:
            return self._names(self.asked_slices)
        found = self.g.describe(*self._qr("describe"), retries=self.settings.describe_retries)
        spec = ((found or {}).get("tpu", {}).get("nodeSpec") or [{}])[0]
        multi = spec.get("multisliceParams") or {}
        if multi.get("nodeCount"):
            return self._names(int(multi["nodeCount"]), multi.get("nodeIdPrefix") or self.name)
        return [spec.get("nodeId") or self.name]

    def _names(self, slices: int, prefix: str = "") -> list[str]:
        prefix = prefix or self.name
        return [self.name] if slices == 1 else [f"{prefix}-{k}" for k in range(slices)]

    def health(self) -> Health:
        state, message = self.state()
        if state in LOST:
            return Health(lost=f"queued resource {state}" + (f": {message}" if message else ""))
        if state == "ACTIVE":
            names = self.node_names()
            for name in names:  # one slice lost is the whole job lost
                node = self._node(name)
                node_state = "NOT_FOUND" if node is None else node.get("state", "")
                if node_state in NODE_GONE:
                    return Health(lost=f"node {node_state}" if len(names) == 1 else
                                  f"node {name} of {len(names)} slices {node_state}")
            return Health(up=True)
        return Health(note=f"{self.name}: {state}" + (" (preemption notice); waiting"
                                                      if state == "SUSPENDING" else "; waiting"))

    def workers(self, reachable_only: bool = False) -> TpuVmWorkers | MultisliceWorkers:
        """Every worker of every slice, numbered slice after slice; with `reachable_only`,
        those of the slices still there (to stop them when another was lost)."""
        if self.settings.dry_run:  # the workers the type has, where that is known
            known = slice_workers(self.asked.name)
            count = known or 1
            if not known and "dry-run workers" not in self.warned:
                self.warned.add("dry-run workers")
                log(f"{self.name}: a dry run does not know how many workers a "
                    f"{self.asked.name} has (a real run counts them with gcloud's describe); "
                    "the commands are shown for worker 0")
            nodes = [TpuVmWorkers(self.g, self.settings, self.asked.zone, count, name, k * count)
                     for k, name in enumerate(self.node_names())]
            return nodes[0] if len(nodes) == 1 else MultisliceWorkers(nodes)
        names, nodes, first = self.node_names(), [], 0
        for name in names:
            node = self._node(name)
            if node is None or node.get("state") in NODE_GONE:
                if reachable_only:
                    continue
                raise DeployError(f"no TPU VM named {name}: make pod-create first")
            # The slice we have, whichever of the fallback types it is.
            self.obtained = node.get("acceleratorType") or ""
            count = max(1, len(node.get("networkEndpoints", [])))
            nodes.append(TpuVmWorkers(self.g, self.settings, self.asked.zone, count, name,
                                      first))
            first += count
        self.obtained_slices = len(names)
        if len(names) == 1 and nodes:
            return nodes[0]
        if not reachable_only and len({n.count for n in nodes}) > 1:
            raise DeployError(f"the slices of {self.name} have different numbers of workers ("
                              f"{', '.join(f'{n.node}: {n.count}' for n in nodes)}): make "
                              "pod-delete, then create them again")
        return MultisliceWorkers(nodes)

    def accelerator_type(self) -> str:
        return self.obtained or self.asked.name

    def slice_count(self) -> int:
        return self.obtained_slices or self.asked_slices

    def _label(self, option: tuple[SliceType, int]) -> str:
        return option[0].name if option[1] == 1 else f"{option[1]} x {option[0].name}"

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
            if state == "ACTIVE" and all(self._node(n) for n in self.node_names()):
                count = self.workers().count
                got = SliceType(self.accelerator_type(), "", ""), self.slice_count()
                log(f"{self.name}: {count} worker(s) of {self._label(got)}")
                return made
            if state in WAITING and asked is None:  # a request from before: time it from now
                asked = time.monotonic()
            waited = asked is not None and time.monotonic() - asked > s.queue_timeout > 0
            if state == "NOT_FOUND":
                if not made:  # the first request of this call: the most wanted type
                    self._use(index)
                self._create_request()
                asked, made = time.monotonic(), True
            elif state == "FAILED" or (state in WAITING and waited and len(self.options) > 1):
                failures += state == "FAILED"
                if failures > s.max_retries:
                    raise DeployError(f"{self.name} FAILED {failures} times, last: {message}")
                why = (f"FAILED: {message or 'no reason given'}" if state == "FAILED" else
                       f"waited {s.queue_timeout:g} s for capacity")
                self.delete()
                if len(self.options) > 1:
                    index = (index + 1) % len(self.options)
                    log(f"{self._label(self.options[index - 1])} {why}; asking for "
                        f"{self._label(self.options[index])} instead")
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
                raise DeployError(f"{self.name} still {state} after {s.wait_timeout:g} s"
                                  " (no capacity yet); raise WAIT_TIMEOUT or try another zone")
            self.sleep(s.poll_seconds)

    def _use(self, index: int) -> None:
        """Ask for fallback `index` next (its type's zone and runtime, its number of slices)."""
        (self.asked, self.asked_slices), self.obtained = self.options[index], ""
        self.obtained_slices = 0
        if len(self.options) > 1 and not self.settings.dry_run:
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
        n = self.asked_slices
        log(f"asking for {self.name}: {self._label((asked, n))}, {s.capacity}, {asked.runtime}")
        nodes = [f"--node-id={self.name}"] if n == 1 else [f"--node-count={n}",
                                                           f"--node-prefix={self.name}"]
        code, _, err = self.g.call(*self._qr(
            "create", *nodes, f"--accelerator-type={asked.name}",
            f"--runtime-version={asked.runtime}", *CAPACITY_FLAGS[s.capacity],
            # GA: the request turns FAILED when it waited this long (then the next type).
            *([f"--valid-until-duration={s.queue_timeout:g}s"] if s.queue_timeout > 0 else [])),
            retries=3)
        if code and "ALREADY_EXISTS" not in err:  # a retry after a request that got through
            raise DeployError(f"creating {self.name} failed: {reason(err, code)}")

    def delete(self) -> None:
        """Delete the queued resource and its node; wait until the name is free again."""
        log(f"deleting {self.name} (queued resource and its nodes)")
        code, _, err = self.g.call(*self._qr("delete", "--force", "--quiet", "--async"),
                                   retries=3)
        if code and "NOT_FOUND" not in err:
            raise DeployError(f"deleting {self.name} failed: {reason(err, code)}")
        if self.settings.dry_run:
            return
        s, last = self.settings, None
        deadline = time.monotonic() + s.wait_timeout
        while (state := self.state()[0]) != "NOT_FOUND":
            if state != last:
                log(f"{self.name}: {state}")
                last = state
            if time.monotonic() > deadline:
                raise DeployError(f"{self.name} still {state} {s.wait_timeout:g} s after its "
                                  "deletion: check make pod-status / the console")
            self.sleep(min(s.poll_seconds, 10))
        log(f"{self.name}: deleted")
