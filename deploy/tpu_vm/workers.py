"""The workers of TPU VM nodes, reached with `gcloud compute tpus tpu-vm ssh|scp`, each with
its own call (`--worker=i`) so that each retries on its own and a failure names its worker.
One node is a slice; a multislice job is several nodes whose workers are numbered on, slice
after slice, as JAX numbers their processes.
"""

import concurrent.futures
import os
import subprocess
import threading

from deploy.shell import Cli, DeployError, log, reason
from deploy.tpu_vm.settings import TpuVmSettings
from deploy.tpu_vm.slices import Result
from vitpod import protocol

# A slice recreated under its name has new host keys; gcloud's default (no on the first
# connection, yes afterwards) would then refuse every worker.
HOST_KEYS = "--strict-host-key-checking=no"


def for_each_worker(workers: int, fn, threads: int = 32) -> dict[int, object]:
    """fn(i) for every worker index, in parallel; {i: result or the exception raised}."""
    with concurrent.futures.ThreadPoolExecutor(max(1, min(threads, workers))) as pool:
        futures = {i: pool.submit(fn, i) for i in range(workers)}
    results = {}
    for i, future in futures.items():
        try:
            results[i] = future.result()
        except Exception as e:  # noqa: BLE001 - reported per worker by the caller
            results[i] = e
    return results



def report_failures(what: str, results: dict[int, object]) -> None:
    """Log each worker whose call failed (an exception or a non-zero exit); raise naming them."""
    failed = {i: r for i, r in results.items() if isinstance(r, Exception) or r[0]}
    for i, r in sorted(failed.items()):
        why = str(r) if isinstance(r, Exception) else reason(r[2] or r[1], f"exit {r[0]}")
        log(f"worker {i}: {what} failed: {why}")
    if failed:
        raise DeployError(f"{what} failed on worker(s) {', '.join(map(str, sorted(failed)))} "
                          "(reasons above)")


_key_lock = threading.Lock()
_key_checked = False


def ssh_key_first(node: "TpuVmWorkers") -> None:
    """gcloud makes its ssh key (~/.ssh/google_compute_engine) on the first ssh or scp of this
    machine, and parallel first calls race to make it: without a key, one ssh to worker 0 of
    `node` goes first, alone. Checked once per process."""
    global _key_checked
    with _key_lock:
        if _key_checked:
            return
        _key_checked = True
        if os.path.exists(os.path.join(os.path.expanduser("~"), protocol.GCLOUD_SSH_KEY)):
            return
        log(f"no ~/{protocol.GCLOUD_SSH_KEY} yet: one ssh to worker 0 first (gcloud makes the "
            "key), then the others")
        code, out, err = node.run(0, "true", stream=False)
        if code:
            log(f"warning: that first ssh failed ({reason(err or out, f'exit {code}')}); going on")


def worker0_address(node: "TpuVmWorkers") -> tuple[str, str, str]:
    """Worker 0 of `node` from `tpu-vm describe`: its internal IP (networkEndpoints[0]), the
    node's network and CIDR block; '' for what describe does not say."""
    found = node.g.describe(*node._vm("describe", node.node),
                            retries=node.settings.describe_retries)
    if found is None:
        raise DeployError(f"no TPU VM named {node.node}: make pod-create first")
    endpoint = (found.get("networkEndpoints") or [{}])[0]
    network = found.get("networkConfig", {}).get("network", "").rsplit("/", 1)[-1]
    return endpoint.get("ipAddress", ""), network, found.get("cidrBlock", "")


class TpuVmWorkers:
    """Workers 0..count-1 of the TPU VM `node` in `zone`, printed as [w`first`+i]."""

    def __init__(self, gcloud: Cli, settings: TpuVmSettings, zone: str, count: int,
                 node: str = "", first: int = 0):
        self.g, self.settings, self.zone, self.count = gcloud, settings, zone, count
        self.node, self.first = node or settings.name, first

    def _vm(self, verb: str, *args: str) -> list[str]:
        return ["compute", "tpus", "tpu-vm", verb, *args, f"--project={self.settings.project}",
                f"--zone={self.zone}"]

    def run(self, i: int, command: str, stream: bool = True,
            retries: int | None = None) -> Result:
        return self.g.call(*self._vm("ssh", self.node, f"--worker={i}", HOST_KEYS,
                                     f"--command={command}"),
                           retries=retries or self.settings.ssh_retries,
                           prefix=f"[w{self.first + i}] ", stream=stream)

    def copy(self, i: int, target: str, *sources: str) -> Result:
        return self.g.call(*self._vm("scp", *sources, f"{self.node}:{target}", f"--worker={i}",
                                     HOST_KEYS),
                           retries=self.settings.ssh_retries, prefix=f"[w{self.first + i}] ")

    def on_each(self, what: str, call) -> dict[int, object]:
        results = self.each(call)
        report_failures(what, results)
        return results

    def each(self, call) -> dict[int, object]:
        ssh_key_first(self)
        return for_each_worker(self.count, call)

    def shell(self, worker: str) -> None:
        subprocess.run(["gcloud", *self._vm("ssh", self.node, f"--worker={worker}", HOST_KEYS)])

    def coordinator(self) -> tuple[str, str, str]:
        return worker0_address(self)


class MultisliceWorkers:
    """The workers of several nodes (one per slice) as one list, slice after slice: with every
    slice, worker i is worker i % per-slice of slice i // per-slice, as JAX numbers multislice
    processes. Built from the surviving slices only, it reaches those (to stop them)."""

    def __init__(self, nodes: list[TpuVmWorkers]):
        self.nodes = nodes
        self.slots = [(node, j) for node in nodes for j in range(node.count)]
        self.count = len(self.slots)

    def run(self, i: int, command: str, stream: bool = True,
            retries: int | None = None) -> Result:
        node, local = self.slots[i]
        return node.run(local, command, stream, retries)

    def copy(self, i: int, target: str, *sources: str) -> Result:
        node, local = self.slots[i]
        return node.copy(local, target, *sources)

    def on_each(self, what: str, call) -> dict[int, object]:
        results = self.each(call)
        report_failures(what, results)
        return results

    def each(self, call) -> dict[int, object]:
        ssh_key_first(self.nodes[0])
        return for_each_worker(self.count, call)

    def shell(self, worker: str) -> None:
        if not worker.isdigit() or int(worker) >= self.count:
            raise DeployError(f"WORKER={worker}: pick one worker, 0-{self.count - 1} (slice after "
                              "slice, as make pod-logs WORKER=all numbers them)")
        node, local = self.slots[int(worker)]
        node.shell(str(local))

    def coordinator(self) -> tuple[str, str, str]:
        return worker0_address(self.nodes[0])
