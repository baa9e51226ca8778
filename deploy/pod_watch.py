"""A slice and the launch on it, watched: the workers' readiness markers, the run's end, a
crash on a live slice, the queued resource's state (the half of deploy/pod.py that reads).

A launch writes markers to WORKDIR/launches/LAUNCH/worker-N.{started,joining,ready,exited};
only gcloud's own NOT_FOUND means a slice is gone (tpu_slice.py).
"""

import json
import time

from gcloud_cli import PodError, for_each_worker, log
from tpu_slice import NODE_GONE, Slice

VENV, LOG = "vitpod-venv", "vitpod.log"  # in each worker's home


class WatchedSlice(Slice):
    """ssh to a worker, and what a launch's markers and the slice's state say."""

    def ssh(self, i: int, command: str, stream: bool = True, retries: int | None = None):
        return self.g.call(*self._vm("ssh", self.s["NAME"], f"--worker={i}",
                                     f"--command={command}"),
                           retries=retries or int(self.num("SSH_RETRIES")),
                           prefix=f"[w{i}] ", stream=stream)

    def markers(self) -> dict[str, set[int]]:
        """Which workers of this launch wrote which marker: {'started': {0, 1}, ...}."""
        where = f"{self.s['WORKDIR'].rstrip('/')}/launches/{self.launch_id}/"
        code, out, _ = self.g.call("storage", "ls", where, retries=2, timeout=120)
        found = {"started": set(), "joining": set(), "ready": set(), "exited": set()}
        for line in out.splitlines() if code == 0 else []:
            name = line.rstrip("/").rsplit("/", 1)[-1]
            stem, _, what = name.partition(".")
            if what in found and stem.startswith("worker-") and stem[7:].isdigit():
                found[what].add(int(stem[7:]))
        return found

    def wait_ready(self, n: int) -> None:
        deadline, everyone = time.monotonic() + self.num("READY_TIMEOUT"), set(range(n))
        while True:
            m = self.markers()
            if m["ready"] >= everyone:
                log(f"all {n} worker(s) ready: jax.distributed is up, devices checked")
                return
            early = sorted(m["exited"] - m["ready"])
            if early:
                self.show_tail(early)
                raise PodError(f"worker(s) {', '.join(map(str, early))} exited before the job "
                               "was ready (log tail above); stopped the others")
            if time.monotonic() > deadline:
                # The first stage a worker missed: it never started, its trainer never got as
                # far as joining the job, or (all joined) JAX is stuck waiting for a host.
                silent = sorted(everyone - m["started"])
                late = sorted(everyone - m["joining"])
                stuck = silent or late or sorted(everyone - m["ready"])
                self.show_tail(stuck)
                what = ("never started" if silent else
                        "started, but the trainer never got to joining the job" if late else
                        "joined, but JAX did not come up (it waits for every host)")
                raise PodError(f"worker(s) {', '.join(map(str, stuck))} {what} within "
                               f"READY_TIMEOUT={self.s['READY_TIMEOUT']} s; stopped the others")
            self.sleep(min(self.num("POLL_SECONDS"), 5))

    def show_tail(self, workers, lines: int = 20) -> None:
        for i in workers:
            self.ssh(i, f"tail -n {lines} ~/{LOG}", retries=1)

    def stop_workers(self, n: int) -> None:
        log("stopping the trainer on every worker (by pid file)")
        for_each_worker(n, lambda i: self.ssh(
            i, f"cd ~ && test ! -x {VENV}/bin/python || VITPOD_WORKER={i} {VENV}/bin/python -m "
               "vitpod.podworker stop", retries=2))

    # --- watching a run --------------------------------------------------------------------
    def done(self) -> bool:
        code, _, _ = self.g.call("storage", "ls", f"{self.s['WORKDIR'].rstrip('/')}/DONE",
                                 retries=2, timeout=120)
        return code == 0

    def watch(self) -> str:
        """Poll until the run is DONE ('done'), the slice is lost (why), or the trainers
        stopped on a slice that is still up ('stopped'); a crash raises with its log tail."""
        exited_since, last = None, None
        self.launch_id = self.launch_id or self.newest_launch()
        while True:
            if self.done():
                return "done"
            state, message = self.qr_state()
            if state in ("FAILED", "SUSPENDED", "NOT_FOUND", "DELETING"):
                return f"queued resource {state}" + (f": {message}" if message else "")
            if state == "ACTIVE":
                node = self.node()
                node_state = "NOT_FOUND" if node is None else node.get("state", "")
                if node_state in NODE_GONE:
                    return f"node {node_state}"
                exited = self.markers()["exited"] if self.launch_id else set()
                if exited and exited_since is None:
                    exited_since = time.monotonic()
                if exited_since and time.monotonic() - exited_since > self.num("CRASH_GRACE"):
                    stopped = self._stopped_on_live_slice(sorted(exited), self.workers())
                    if stopped:
                        return stopped
            elif state != last:  # SUSPENDING: the trainers' grace to save; others: wait
                log(f"{self.s['NAME']}: {state}" + (" (preemption notice); waiting"
                                                    if state == "SUSPENDING" else "; waiting"))
            last = state
            self.sleep(self.num("POLL_SECONDS"))

    def newest_launch(self) -> str:
        """The latest launch in the workdir (for `pod-watch` of a run launched before)."""
        code, out, _ = self.g.call("storage", "ls", f"{self.s['WORKDIR'].rstrip('/')}/launches/",
                                   retries=2, timeout=120)
        names = [line.rstrip("/").rsplit("/", 2)[-2] for line in out.splitlines()
                 if code == 0 and line.count("/launches/")]
        return max(names, default="")

    def wait_exited(self, seconds: float = 120) -> None:
        """Give the workers time to exit and copy the end of their logs to the workdir."""
        deadline, n = time.monotonic() + seconds, self.workers()
        while len(self.markers()["exited"]) < n and time.monotonic() < deadline:
            self.sleep(min(self.num("POLL_SECONDS"), 5))

    def _stopped_on_live_slice(self, exited: list[int], n: int) -> str:
        """'stopped' when every trainer exited 0; raises for a crash; '' while a marker
        cannot be read yet (a failed `storage cat` is not a crash)."""
        where = f"{self.s['WORKDIR'].rstrip('/')}/launches/{self.launch_id}"
        codes = {}
        for i in exited:
            code, out, _ = self.g.call("storage", "cat", f"{where}/worker-{i}.exited", retries=2)
            try:
                codes[i] = json.loads(out)["code"] if code == 0 else None
            except (ValueError, KeyError):
                codes[i] = None
        if None in codes.values():
            return ""
        if len(exited) == n and all(c == 0 for c in codes.values()):
            log("every trainer stopped with a checkpoint while the slice stays ACTIVE")
            return "stopped"
        bad = [i for i, c in codes.items() if c != 0] or exited
        self.show_tail(bad, 30)
        self.stop_workers(n)
        raise PodError(f"the trainer crashed on worker(s) {', '.join(map(str, bad))} (exit "
                       f"{', '.join(str(codes[i]) for i in bad)}; log tail above, full logs in "
                       f"{self.s['WORKDIR']}/logs/{self.launch_id}/)")
