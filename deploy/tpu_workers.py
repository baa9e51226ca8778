"""The workers of one TPU VM node, reached with `gcloud compute tpus tpu-vm ssh|scp`, each with
its own call (`--worker=i`) so that each retries on its own and a failure names its worker.
"""

import subprocess

from deploy.gcloud_cli import Gcloud, PodError, for_each_worker, log, reason
from deploy.settings import Settings
from deploy.slices import Result


class TpuVmWorkers:
    """Workers 0..count-1 of the TPU VM `name` in `zone`."""

    def __init__(self, gcloud: Gcloud, settings: Settings, zone: str, count: int):
        self.g, self.settings, self.zone, self.count = gcloud, settings, zone, count

    def _vm(self, verb: str, *args: str) -> list[str]:
        return ["compute", "tpus", "tpu-vm", verb, *args, f"--project={self.settings.project}",
                f"--zone={self.zone}"]

    def run(self, i: int, command: str, stream: bool = True,
            retries: int | None = None) -> Result:
        return self.g.call(*self._vm("ssh", self.settings.name, f"--worker={i}",
                                     f"--command={command}"),
                           retries=retries or self.settings.ssh_retries, prefix=f"[w{i}] ",
                           stream=stream)

    def copy(self, i: int, target: str, *sources: str) -> Result:
        return self.g.call(*self._vm("scp", *sources, f"{self.settings.name}:{target}",
                                     f"--worker={i}"), retries=self.settings.ssh_retries,
                           prefix=f"[w{i}] ")

    def on_each(self, what: str, call) -> dict[int, object]:
        results = self.each(call)
        failed = {i: r for i, r in results.items() if isinstance(r, Exception) or r[0]}
        for i, r in sorted(failed.items()):
            why = str(r) if isinstance(r, Exception) else reason(r[2] or r[1], f"exit {r[0]}")
            log(f"worker {i}: {what} failed: {why}")
        if failed:
            raise PodError(f"{what} failed on worker(s) {', '.join(map(str, sorted(failed)))} "
                           "(reasons above)")
        return results

    def each(self, call) -> dict[int, object]:
        return for_each_worker(self.count, call)

    def shell(self, worker: str) -> None:
        subprocess.run(["gcloud", *self._vm("ssh", self.settings.name, f"--worker={worker}")])
