"""One launch of the trainers on a slice: its id, starting them, their readiness markers in the
workdir, watching the run (DONE, a crash on a live slice, a lost slice), stopping them.

Markers in the bucket, not ssh probes: the bucket outlives a worker and is read in one listing.
"""

import json
import os
import shlex
import time

from deploy import job
from deploy.bucket import Bucket
from deploy.settings import slice_devices
from deploy.shell import Cli, DeployError, log
from deploy.tpu_vm.settings import TpuVmSettings
from deploy.tpu_vm.slices import Slice, Workers
from vitpod import protocol

PYTHON = f"{protocol.VENV}/bin/python"  # on a worker, from its home


class Launch:
    """The trainers of one launch (`id`) on `slice`; an id of '' in `watch` means the newest."""

    def __init__(self, settings: TpuVmSettings, gcloud: Cli, slice_: Slice, launch_id: str = ""):
        self.settings, self.slice, self.id = settings, slice_, launch_id
        self.bucket, self.sleep = Bucket(gcloud), gcloud.sleep
        self.worker_count = 0

    def start(self, timeline: dict | None = None) -> None:
        """Start the trainer on every worker, then wait until all report ready. `timeline`
        (from pod-run: when the slice was asked for, ACTIVE, set up) goes to the workdir."""
        s = self.settings
        s.require("PROJECT", "ZONE", "NAME", "WORKDIR", "CONFIG", "TPU_TYPE")
        workers = self.slice.workers()
        self.worker_count = workers.count
        tpu_type, slices = self.slice.accelerator_type(), self.slice.slice_count()
        config_file, _, arg = s.config.partition(":")
        workers.on_each("copying the config",
                        lambda i: workers.copy(i, f"~/{protocol.CONFIGS}/", config_file))
        remote_config = protocol.join(protocol.CONFIGS, os.path.basename(config_file)) + (
            f":{arg}" if arg else "")
        label = job.slice_label(tpu_type, slices)
        train = job.train_command(s, PYTHON, remote_config, (slice_devices(tpu_type) or 0) * slices)
        self.id = protocol.new_launch_id()
        log(f"launch {self.id} on {workers.count} worker(s)"
            + (f" of {slices} slices" if slices > 1 else "") + f": {shlex.join(train)}")

        def start(i: int):
            env = {protocol.PLATFORMS_ENV: s.platform, **protocol.launch_env(
                self.id, i, label, s.coordinator_port, s.init_timeout)}
            return workers.run(i, "cd ~ && " + " ".join(
                f"{k}={shlex.quote(v)}" for k, v in env.items()) + f" {PYTHON} -m "
                f"vitpod.podworker start --workdir={shlex.quote(s.workdir)} "
                f"--sync_seconds={s.log_sync_seconds:g} -- {shlex.join(train)}")

        if s.free_tpu:  # our earlier trainer by its pid file (a chance to save), then the rest
            workers.on_each("freeing the TPU", lambda i: workers.run(
                i, f"cd ~ && {protocol.WORKER_ENV}={i} {PYTHON} -m vitpod.podworker stop && "
                   f"{PYTHON} {protocol.CHECK_SCRIPT} --tpu_only --free_tpu"))
        if timeline is not None:
            self.write_timeline({**timeline, "launched": time.time()})
        try:
            workers.on_each("starting the trainer", start)
            if not s.dry_run:
                self.wait_ready(workers)
        except DeployError:
            self.stop(workers)
            raise
        log(f"follow with: make pod-logs WORKER=all; logs also go to "
            f"{protocol.log_dir(s.workdir, self.id)}/")

    def write_timeline(self, timeline: dict) -> None:
        """This launch's timeline beside its record: how long it waited for its slice and its
        set-up, which the trainers cannot see (vitpod.workdir.goodput splits the gap with it)."""
        url = protocol.timeline_path(self.settings.workdir, self.id)
        failed = self.bucket.write_json(url, timeline)
        if failed:
            log(f"warning: could not write {url} ({failed}); the report will not split the "
                "time between launches")

    def markers(self) -> dict[str, set[int]]:
        """Which workers of this launch wrote which marker: {'started': {0, 1}, ...}."""
        found = {marker: set() for marker in protocol.MARKERS}
        listed = self.bucket.list(protocol.launch_dir(self.settings.workdir, self.id) + "/")
        for worker, marker in filter(None, map(protocol.parse_marker, listed or [])):
            found[marker].add(worker)
        return found

    def wait_ready(self, workers: Workers) -> None:
        s, n = self.settings, workers.count
        deadline, everyone = time.monotonic() + s.ready_timeout, set(range(n))
        while True:
            m = self.markers()
            if m[protocol.READY] >= everyone:
                log(f"all {n} worker(s) ready: jax.distributed is up, devices checked")
                return
            early = sorted(m[protocol.EXITED] - m[protocol.READY])
            if early:
                self.show_tail(workers, early)
                raise DeployError(f"worker(s) {', '.join(map(str, early))} exited before the job "
                                  "was ready (log tail above); stopped the others")
            if time.monotonic() > deadline:
                # The first stage a worker missed: it never started, its trainer never got as
                # far as joining the job, or (all joined) JAX is stuck waiting for a host.
                silent = sorted(everyone - m[protocol.STARTED])
                late = sorted(everyone - m[protocol.JOINING])
                stuck = silent or late or sorted(everyone - m[protocol.READY])
                self.show_tail(workers, stuck)
                what = ("never started" if silent else
                        "started, but the trainer never got to joining the job" if late else
                        "joined, but JAX did not come up (it waits for every host)")
                raise DeployError(f"worker(s) {', '.join(map(str, stuck))} {what} within "
                                  f"READY_TIMEOUT={s.ready_timeout:g} s; stopped the others")
            self.sleep(min(s.poll_seconds, 5))

    def show_tail(self, workers: Workers, which, lines: int = 20) -> None:
        for i in which:
            workers.run(i, f"tail -n {lines} ~/{protocol.LOG}", retries=1)

    def stop(self, workers: Workers) -> None:
        log("stopping the trainer on every worker (by pid file)")
        workers.each(lambda i: workers.run(
            i, f"cd ~ && test ! -x {PYTHON} || {protocol.WORKER_ENV}={i} {PYTHON} -m "
               "vitpod.podworker stop", retries=2))

    # --- watching the run --------------------------------------------------------------------
    def done(self) -> bool:
        return self.bucket.exists(protocol.done_path(self.settings.workdir))

    def watch(self) -> str:
        """Poll until the run is DONE ('done'), the slice is lost (why), or the trainers
        stopped on a slice that is still up ('stopped'); a crash raises with its log tail."""
        exited_since, last = None, None
        self.id = self.id or self.newest()
        stall = job.Stall(self.settings.stall_timeout)
        while True:
            if self.done():
                return "done"
            health = self.slice.health()
            if health.lost:
                return health.lost
            if health.up:
                exited = self.markers()[protocol.EXITED] if self.id else set()
                if exited and exited_since is None:
                    exited_since = time.monotonic()
                if exited_since and time.monotonic() - exited_since > self.settings.crash_grace:
                    stopped = self._stopped_on_live_slice(sorted(exited), self.slice.workers())
                    if stopped:
                        return stopped
                if not exited and self.id and stall.stuck(self.bucket.read(
                        protocol.record_path(self.settings.workdir, self.id))):
                    self._stop_stalled(stall)
            elif health.note != last:  # SUSPENDING: the trainers' grace to save; others: wait
                log(health.note)
            last = health.note
            self.sleep(self.settings.poll_seconds)

    def _stop_stalled(self, stall: "job.Stall") -> None:
        """A launch whose record has not moved: hung (a collective waiting for a host that
        will never come), and billing. Stopped like a crash, with every worker's log tail."""
        workers = self.slice.workers()
        self.show_tail(workers, range(workers.count), 30)
        self.stop(workers)
        raise DeployError(f"no progress for {stall.timeout:g} s (STALL_TIMEOUT): launch "
                          f"{self.id}'s {protocol.RECORD} {stall.seen_as()}; the trainers look "
                          f"hung, stopped them (log tail above, full logs in "
                          f"{protocol.log_dir(self.settings.workdir, self.id)}/)")

    def newest(self) -> str:
        """The latest launch in the workdir (for `pod-watch` of a run launched before)."""
        workdir = self.settings.workdir
        return job.newest_launch(self.bucket, workdir)

    def wait_exited(self, seconds: float = 120) -> None:
        """Give the workers time to exit and copy the end of their logs to the workdir."""
        deadline, n = time.monotonic() + seconds, self.slice.workers().count
        while len(self.markers()[protocol.EXITED]) < n and time.monotonic() < deadline:
            self.sleep(min(self.settings.poll_seconds, 5))

    def wait_saved(self, notice: float, gone: tuple[str, ...]) -> None:
        """A slice read as lost may still be in its preemption notice, its trainers saving:
        deleting it now would cut that save short. Wait until every worker marked its exit,
        the slice's state is one of `gone` (its VMs are stopped), or `notice` seconds passed."""
        deadline = time.monotonic() + notice
        while self.id and time.monotonic() < deadline:
            if len(self.markers()[protocol.EXITED]) >= self.worker_count:
                return
            if self.slice.state()[0] in gone:
                return
            self.sleep(min(self.settings.poll_seconds, 2))

    def _stopped_on_live_slice(self, exited: list[int], workers: Workers) -> str:
        """'stopped' when every trainer exited 0; raises for a crash; '' while a marker
        cannot be read yet (a failed `storage cat` is not a crash)."""
        codes = {}
        for i in exited:
            out = self.bucket.read(protocol.marker_path(self.settings.workdir, self.id, i,
                                                        protocol.EXITED))
            try:
                codes[i] = json.loads(out)["code"] if out is not None else None
            except (ValueError, KeyError):
                codes[i] = None
        if None in codes.values():
            return ""
        if len(exited) == workers.count and all(c == 0 for c in codes.values()):
            log("every trainer stopped with a checkpoint while the slice stays ACTIVE")
            return "stopped"
        bad = [i for i, c in codes.items() if c != 0] or exited
        self.show_tail(workers, bad, 30)
        self.stop(workers)
        raise DeployError(f"the trainer crashed on worker(s) {', '.join(map(str, bad))} (exit "
                          f"{', '.join(str(codes[i]) for i in bad)}; log tail above, full logs in "
                          f"{protocol.log_dir(self.settings.workdir, self.id)}/)")
