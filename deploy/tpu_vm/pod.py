"""Cloud TPU slices for vitpod: create (queued resources), set up, check, launch, watch, delete.

    python3 -m deploy.tpu_vm {create|setup|check|launch|watch|status|logs|ssh|delete|run}

Run from the repository root. Settings come from deploy/pod.env (or $POD_ENV), overridden by
environment variables of the same names (make passes `make pod-run TPU_TYPE=v4-32` through).
DRY_RUN=1 prints every command instead of running it. Commands run without a local shell;
the strings a worker's shell runs (`ssh --command`) are built from shlex-quoted parts, so no
value can inject code. Every per-worker call runs for each worker in parallel, with retries,
and names the workers that failed. Standard library only: this runs on any machine with
Python 3.11 and gcloud.
"""

import shlex
import time

from deploy import job
from deploy.shell import Cli, DeployError, StateUnreadable, log
from deploy.tpu_vm import setup as worker_setup
from deploy.tpu_vm.launch import PYTHON, Launch
from deploy.tpu_vm.queued_resource import SPOT_NOTICE_SECONDS, QueuedResource
from deploy.tpu_vm.settings import TpuVmSettings
from deploy.tpu_vm.slices import Slice, Workers
from vitpod import protocol


class Pod:
    """A slice and the run on it: set-up, launches, the loop that replaces a lost slice."""

    def __init__(self, settings: TpuVmSettings, slice_: Slice, gcloud: Cli):
        self.settings, self.slice, self.g = settings, slice_, gcloud

    def create(self) -> bool:
        return self.slice.create()

    def delete(self) -> None:
        self.slice.delete()

    def setup(self) -> None:
        """uv, a uv-managed Python and the wheel with pinned deps on every worker; then check."""
        self.settings.require("PROJECT", "ZONE", "NAME")
        workers = self.slice.workers()
        worker_setup.setup(self.settings, workers)
        self.check(workers)

    def check(self, workers: Workers | None = None) -> None:
        self.settings.require("PROJECT", "ZONE", "NAME", "TPU_TYPE")
        workers = workers or self.slice.workers()
        worker_setup.check(self.settings, workers, self.slice.accelerator_type(),
                           self.slice.slice_count())

    def launch(self) -> Launch:
        launch = Launch(self.settings, self.g, self.slice)
        launch.start()
        return launch

    def watch(self) -> str:
        return Launch(self.settings, self.g, self.slice).watch()

    def run(self) -> None:
        """Create, set up, launch, watch; replace a lost slice and resume; delete when DONE."""
        s = self.settings
        s.require("PROJECT", "ZONE", "NAME", "TPU_TYPE", "WORKDIR", "CONFIG")
        # Every type and count it may get, before one is created: a fallback that cannot run
        # the config would be billed to fail.
        job.preflight(s, [(t.name, n) for t in s.slice_types for n in s.slice_counts])
        lost = 0
        while True:
            asked = time.time()
            new = self.slice.create()
            active = time.time()
            if new:  # a new slice: its workers are bare
                self.setup()
            launch = Launch(s, self.g, self.slice)
            launch.start({"slice": self.slice.accelerator_type(), "asked": asked,
                          "active": active, "set_up": time.time(), "new_slice": new})
            if s.dry_run:
                return
            try:
                outcome = launch.watch()
            except StateUnreadable:
                raise  # the slice may be fine: leave it, and say so
            except DeployError as crash:
                log(f"the run crashed: {crash}")
                log("deleting the slice (logs stay in the workdir)")
                self.slice.delete()
                raise
            if outcome == "done":
                log(f"{protocol.done_path(s.workdir)} exists: training finished ({lost} "
                    "relaunch(es))")
                launch.wait_exited()
                self.report()
                self.slice.delete()
                return
            lost += 1
            if lost > s.max_retries:
                raise DeployError(f"gave up after {s.max_retries} relaunches (MAX_RETRIES); the "
                               "workdir keeps the progress: make pod-run again to continue")
            if outcome == "stopped":
                log(f"relaunching on the same slice ({lost}/{s.max_retries})")
            else:
                log(f"slice lost ({outcome}); replacing it ({lost}/{s.max_retries})")
                launch.wait_saved(SPOT_NOTICE_SECONDS, gone=("SUSPENDED", "NOT_FOUND"))
                if self.slice.slice_count() > 1:  # the others would wait in a collective
                    log("stopping the trainers of the slices still there")
                    launch.stop(self.slice.workers(reachable_only=True))
                self.slice.delete()

    def report(self) -> None:
        """The run's goodput (python -m vitpod.report), computed on worker 0."""
        s = self.settings
        self.slice.workers().run(0, f"cd ~ && {PYTHON} -m vitpod.report "
                                    f"{shlex.join(job.report_flags(s))}", retries=2)

    # --- for people ----------------------------------------------------------------------------
    def status(self) -> None:
        state, message = self.slice.state()
        print(f"{self.slice.name}: {state}" + (f" ({message})" if message else ""))

    def logs(self) -> None:
        workers, which = self.slice.workers(), self.settings.worker
        if which == "all":
            workers.each(lambda i: workers.run(i, f"tail -n 50 ~/{protocol.LOG}", retries=2))
        else:
            workers.run(int(which), f"tail -n 200 -f ~/{protocol.LOG}", retries=1)

    def shell(self) -> None:
        self.slice.workers().shell(self.settings.worker)


def _on_pod(verb):
    """verb(pod), given the settings: the pod on the queued resource NAME."""
    def call(settings: TpuVmSettings):
        cli = Cli(settings.dry_run, timeout=settings.ssh_timeout)
        outcome = verb(Pod(settings, QueuedResource(settings, cli), cli))
        if verb is Pod.watch:
            log(f"watch: {outcome}")
    return call


VERBS = {name: _on_pod(verb) for name, verb in {
    "create": Pod.create, "setup": Pod.setup, "check": Pod.check, "launch": Pod.launch,
    "watch": Pod.watch, "status": Pod.status, "logs": Pod.logs, "ssh": Pod.shell,
    "delete": Pod.delete, "run": Pod.run}.items()}
