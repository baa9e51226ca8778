"""`make gke-run` and `make gke-logs`: one run as a JobSet, applied, watched to DONE, deleted.

The JobSet itself restarts the run (a preempted or repaired node pool fails a Job, and JobSet
recreates every Job: `status.restarts` grows); the trainers resume from the workdir. This
side only watches: DONE in the workdir ends the run (the pods exit 0, the goodput report is
printed, the JobSet deleted); a JobSet that failed (a pod exit code its policy does not
restart, or MAX_RETRIES restarts spent) is reported in one line with the failing pod's log
tail, and deleted. kubectl talks to the cluster of its current context.

A spot node gives its pods about 15 s after its notice, best effort
(jobset.SPOT_NOTICE_SECONDS), too little to count on a save: with CAPACITY=spot, gke-run
warns when save_every_minutes is off, since a preempted run then redoes every step since its
last save.
"""

import json
import shlex
import subprocess
import time

from deploy import job
from deploy.bucket import Bucket
from deploy.gke import jobset, yamltext
from deploy.gke.settings import GkeSettings
from deploy.shell import Cli, DeployError, log
from deploy.tpu_types import gke_tpu
from vitpod import protocol

JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"
JOB_INDEX_LABEL = "jobset.sigs.k8s.io/job-index"
POD_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
ENDED = ("Succeeded", "Failed")
# Prints a config file's save_every_minutes (CONFIG is configs/X.py[:arg]).
_READ_SAVE_MINUTES = (
    "import importlib.util, sys\n"
    "path, _, arg = sys.argv[1].partition(':')\n"
    "spec = importlib.util.spec_from_file_location('config', path)\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(module)\n"
    "print(float((module.get_config(arg) if arg else module.get_config()).save_every_minutes))")


class GkeRun:
    """The JobSet of one run (NAME in NAMESPACE), through kubectl."""

    def __init__(self, settings: GkeSettings, kubectl: Cli | None = None,
                 gcloud: Cli | None = None):
        self.s = settings
        self.k = kubectl or Cli(settings.dry_run, timeout=120, tool="kubectl")
        self.bucket = Bucket(gcloud or Cli(settings.dry_run, timeout=120))
        self.sleep = self.k.sleep

    def kubectl(self, *args: str, retries: int = 3) -> tuple[int, str, str]:
        return self.k.call(f"--namespace={self.s.namespace}", *args, retries=retries)

    # --- what the cluster says ---------------------------------------------------------------
    def status(self) -> dict | None:
        """The JobSet's status; None when it does not exist. DeployError when unreadable."""
        code, out, err = self.kubectl("get", "jobset", self.s.name, "-o", "json")
        if code and "(NotFound)" in err:
            return None
        if code:
            raise DeployError(f"kubectl get jobset {self.s.name}: {err.strip() or code}")
        return json.loads(out or "{}").get("status", {}) if not self.s.dry_run else {}

    def pods(self) -> list[dict]:
        """The JobSet's pods, worker order (slice, then index in the slice)."""
        code, out, err = self.kubectl("get", "pods", "-l", f"{JOBSET_LABEL}={self.s.name}",
                                      "-o", "json")
        if code:
            raise DeployError(f"kubectl get pods: {err.strip() or code}")
        items = json.loads(out or "{}").get("items", []) if not self.s.dry_run else []
        return sorted(items, key=self.worker)

    def worker(self, pod: dict) -> int:
        labels = pod["metadata"].get("labels", {})
        vms = gke_tpu(self.s.tpu_type).vms_per_slice
        return int(labels.get(JOB_INDEX_LABEL, 0)) * vms + int(labels.get(POD_INDEX_LABEL, 0))

    def log_tail(self, pod: dict, lines: int) -> str:
        code, out, err = self.kubectl("logs", pod["metadata"]["name"], f"--tail={lines}",
                                      retries=2)
        return out if code == 0 else f"(kubectl logs: {err.strip() or code})\n"

    def show_tail(self, pod: dict, lines: int = 30) -> None:
        for line in self.log_tail(pod, lines).splitlines():
            print(f"[w{self.worker(pod)}] {line}", flush=True)

    # --- the run -----------------------------------------------------------------------------
    def apply(self) -> None:
        document = jobset.build(self.s)
        job.preflight(self.s, [(self.s.tpu_type, self.s.num_slices)])
        text, cmd = yamltext.dump(document), ["kubectl", f"--namespace={self.s.namespace}",
                                             "apply", "-f", "-"]
        if self.s.dry_run:
            print(" ".join(cmd) + " <<EOF\n" + text + "EOF", flush=True)
            return
        try:
            done = subprocess.run(cmd, input=text, capture_output=True, text=True, timeout=120)
        except FileNotFoundError:
            raise DeployError("kubectl is not installed or not on PATH") from None
        if done.returncode:
            raise DeployError(f"kubectl apply refused the JobSet: {done.stderr.strip()}")
        log(done.stdout.strip())

    def wait_running(self, expected: int) -> None:
        deadline, said = time.monotonic() + self.s.ready_timeout, ""
        while True:
            pods = self.pods()
            phases = [p.get("status", {}).get("phase", "Pending") for p in pods]
            if len(pods) == expected and all(p != "Pending" for p in phases):
                log(f"{expected} pod(s) of {self.s.name} started; follow with make gke-logs "
                    "WORKER=all")
                return
            note = f"{phases.count('Running')}/{expected} pod(s) running"
            if note != said:
                log(f"waiting for the pods: {note}")
                said = note
            if time.monotonic() > deadline:
                raise DeployError(f"{note} after READY_TIMEOUT={self.s.ready_timeout:g} s; the "
                                  f"JobSet is left as it is: kubectl describe jobset {self.s.name}")
            self.sleep(min(self.s.poll_seconds, 5))

    def run(self) -> None:
        s = self.s
        s.require("NAME", "TPU_TYPE", "WORKDIR", "CONFIG", "IMAGE")
        tpu = gke_tpu(s.tpu_type)
        expected = tpu.vms_per_slice * s.num_slices
        if s.capacity == "spot" and not (save_every_minutes(s) or 0) > 0:
            log(f"warning: CAPACITY=spot: a spot node gives its pods about "
                f"{jobset.SPOT_NOTICE_SECONDS} s, not GRACE_SECONDS, so a preemption may lose "
                "every step since the last save; set save_every_minutes (TRAIN_FLAGS="
                "--config.save_every_minutes=15) to bound that")
        self.apply()
        if s.dry_run:
            return
        self.wait_running(expected)
        outcome = self.watch()
        if outcome == "done":
            self.finish(expected)
            return
        self.delete()
        raise DeployError(outcome)

    def watch(self) -> str:
        """'done' at DONE; else why the run failed (after showing the failing pod's log)."""
        restarts, stall, look, record = 0, job.Stall(self.s.stall_timeout), 0.0, None
        while True:
            if self.bucket.exists(protocol.done_path(self.s.workdir)):
                return "done"
            if time.monotonic() >= look and stall.timeout > 0:  # the record, every 30 s
                look = time.monotonic() + 30
                record = self.newest_record()
            if stall.timeout > 0 and stall.stuck(record):
                for pod in self.pods():
                    self.show_tail(pod)
                return (f"no progress for {stall.timeout:g} s (STALL_TIMEOUT): the newest launch "
                        f"record {stall.seen_as()}; the trainers look hung (log tails above); "
                        "deleted the JobSet")
            status = self.status()
            if status is None:
                return f"the JobSet {self.s.name} is gone (deleted outside gke-run?)"
            if status.get("restarts", 0) > restarts:
                restarts = status["restarts"]
                log(f"the JobSet restarted its Jobs ({restarts}/{self.s.max_retries} restarts): "
                    "the trainers resume from the workdir")
            conditions = {c.get("type"): c for c in status.get("conditions", [])
                          if c.get("status") == "True"}
            if "Failed" in conditions:
                return self.failed(conditions["Failed"])
            if "Completed" in conditions and not self.bucket.exists(
                    protocol.done_path(self.s.workdir)):
                return (f"the JobSet completed but {protocol.done_path(self.s.workdir)} does "
                        "not exist: every pod exited 0 before the end of training")
            self.sleep(self.s.poll_seconds)

    def newest_record(self) -> str | None:
        """The newest launch's record (process 0 rewrites it at every log row), or None."""
        newest = job.newest_launch(self.bucket, self.s.workdir)
        return self.bucket.read(protocol.record_path(self.s.workdir, newest)) if newest else None

    def failed(self, condition: dict) -> str:
        pods = self.pods()
        codes = {self.worker(p): exit_code(p) for p in pods}
        bad = [p for p in pods if exit_code(p) not in (None, 0, jobset.PREEMPTED_EXIT_CODE)]
        for pod in bad[:1] or pods[:1]:
            self.show_tail(pod)
        shown = ", ".join(f"w{w} exit {c}" for w, c in sorted(codes.items()) if c is not None)
        return (f"the JobSet failed ({condition.get('reason', 'Failed')}: "
                f"{condition.get('message', '').strip()}); pods: {shown or 'none exited'}"
                + (f"; log tail of {bad[0]['metadata']['name']} above" if bad else "")
                + "; deleted the JobSet")

    def finish(self, expected: int) -> None:
        done = self.bucket.read(protocol.done_path(self.s.workdir))
        try:
            record = json.loads(done or "{}")
        except ValueError:
            record = None
        step = "?" if protocol.mismatch(record, protocol.DONE_SHAPE) else record["step"]
        log(f"{protocol.done_path(self.s.workdir)} exists: training finished at step {step}")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            phases = [p.get("status", {}).get("phase") for p in self.pods()]
            if len(phases) == expected and all(p in ENDED for p in phases):
                break
            self.sleep(min(self.s.poll_seconds, 5))
        self.report()
        self.delete()

    def report(self) -> None:
        """The goodput report (vitpod.report in the local venv, which reads the bucket); the
        pods are gone with the JobSet."""
        python = job.local_python()
        if not python:
            log("no goodput report: no .venv here (make install), or run python -m "
                f"vitpod.report --workdir={self.s.workdir} where vitpod is installed")
            return
        done = subprocess.run([python, "-m", "vitpod.report", *job.report_flags(self.s)],
                              timeout=600)
        if done.returncode:
            log(f"warning: vitpod.report exited {done.returncode}")

    def delete(self) -> None:
        code, _, err = self.kubectl("delete", "jobset", self.s.name, "--wait=true")
        if code and "(NotFound)" not in err:
            raise DeployError(f"kubectl delete jobset {self.s.name}: {err.strip() or code}")
        log(f"deleted the JobSet {self.s.name} and its pods")

    def logs(self) -> None:
        which = self.s.worker
        for pod in self.pods():
            if which == "all" or self.worker(pod) == int(which):
                self.show_tail(pod, 50 if which == "all" else 200)


def save_every_minutes(s: GkeSettings) -> float | None:
    """save_every_minutes as the trainers will have it: the last --config.save_every_minutes
    in TRAIN_FLAGS, else the config file's (read with the local .venv, as preflight reads it);
    None when it cannot be told."""
    value, flags = None, shlex.split(s.train_flags)
    for i, flag in enumerate(flags):
        key, eq, text = flag.partition("=")
        if key == "--config.save_every_minutes":
            value = text if eq else " ".join(flags[i + 1:i + 2])
    python = job.local_python()
    if value is None and python:
        try:
            done = subprocess.run([python, "-c", _READ_SAVE_MINUTES, s.config], cwd=job.ROOT,
                                  capture_output=True, text=True, timeout=120)
            value = done.stdout.strip() if done.returncode == 0 else None
        except subprocess.TimeoutExpired:
            pass
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def exit_code(pod: dict) -> int | None:
    """The container's exit code once the pod ended, else None."""
    for status in pod.get("status", {}).get("containerStatuses", []):
        terminated = status.get("state", {}).get("terminated")
        if terminated:
            return terminated.get("exitCode")
    return None
