"""The JobSet controller of `make gke-sim`, with the kubelet's part: runs one JobSet's pods as
local process groups and restarts or fails it as JobSet v1alpha2 does.

    python -m deploy.sim.jobset_controller NAME    (started by the simulated `kubectl apply`)

For each replicated Job, each of its `replicas` Jobs (a slice) and each completion index, a
pod: the container's command in a folder of its own (SIM_DIR/pods/POD, its output in `log`),
with the container's env plus what GKE gives a TPU pod: TPU_WORKER_ID, TPU_WORKER_HOSTNAMES
(loopback addresses here, where GKE lists the JobSet's DNS names), with several slices the
MEGASCALE_* values; and what makes JAX take the CPU for a TPU VM: JAX_FORCE_TPU_INIT=1,
JAX_PLATFORMS=cpu and one fake device per chip the pod asks for. With a scenario
`container_image`, each pod is a buildah working container of that image
(deploy/sim/container.py) running the manifest's command in the image's working directory
and environment plus the container's and GKE's; without one, the image is a folder
(scenario `image_root`) that stands for the container's IMAGE_HOME. Signals go to a
container's processes, not to `buildah run`, which reports its command's exit code (a signal
as 128 + N, as a runtime does).

A pod that exits non-zero fails its Job (backoffLimit 0): through the Job's podFailurePolicy
(reason PodFailurePolicy) when a FailJob rule matches its exit code, else BackoffLimitExceeded.
A failed Job fails the JobSet when a FailJobSet rule names its reason, else every pod is
deleted (SIGTERM, SIGKILL after terminationGracePeriodSeconds) and recreated (Recreate,
restarts + 1) up to maxRestarts. At the scenario's `preempt_at_step` (the workdir's
metrics.jsonl, as deploy/sim/capacity.py watches) every pod is deleted that way once, as when
a spot node pool is preempted, with the notice GKE gives there (SPOT_NOTICE_SECONDS, not
terminationGracePeriodSeconds): their exit codes decide as above.
"""

import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import time

from deploy.gke.jobset import IMAGE_HOME, SPOT_NOTICE_SECONDS
from deploy.sim import container as containers
from deploy.sim.capacity import reached_step
from deploy.sim.cloud_state import (
    NODE_ENV,
    cloud_log,
    device_order_env,
    locked_state,
    node_processes,
    node_tag,
    scenario,
)
from deploy.sim.kubectl import JOBSET_LABEL, pod_dir
from vitpod import protocol

LABELS = {"job": "jobset.sigs.k8s.io/replicatedjob-name", "index": "jobset.sigs.k8s.io/job-index",
          "pod": "batch.kubernetes.io/job-completion-index",
          "attempt": "jobset.sigs.k8s.io/restart-attempt"}


# What `buildah run` (chroot isolation) says and exits 1 with when its command died of a signal.
BUILDAH_SIGNALED = re.compile(r"subprocess exited on (.+)")


def container_code(returncode: int, log: str = "") -> int:
    """A container's exit code: a process killed by signal N exits 128 + N (from the last
    lines of `log`, where buildah ran it)."""
    if returncode == 1 and log:
        with open(log, errors="replace") as f:
            said = BUILDAH_SIGNALED.findall(f.read()[-2000:])
        names = {signal.strsignal(s).lower(): s for s in signal.Signals if signal.strsignal(s)}
        if said and said[0].strip() in names:
            return 128 + names[said[0].strip()]
    return 128 - returncode if returncode < 0 else returncode


def pod_env(container: dict, tpu_chips: int, worker: int, hosts: int, slices: int,
            slice_id: int, home: str) -> dict[str, str]:
    """The pod's environment: a folder image's HOME and PATH (a container image has its own),
    the container's env, GKE's TPU values, the stand-ins for the chips."""
    sc = scenario()
    keep = {k: v for k, v in os.environ.items() if k in ("LANG", "LC_ALL", "TZ", "USER")}
    if sc.get("container_image"):
        keep = {}
    else:
        venv_bin = os.path.join(sc["image_root"], protocol.VENV, "bin")
        keep.update(HOME=home, PATH=f"{venv_bin}:/usr/local/bin:/usr/bin:/bin")
    env = {**keep, **sc["worker_env"],
           **{e["name"]: e.get("value", "") for e in container.get("env", [])},
           # What GKE gives a pod of a multi-host TPU slice (DNS names there):
           protocol.WORKER_HOSTNAMES_ENV: ",".join(["127.0.0.1"] * hosts),
           "TPU_WORKER_ID": str(worker),
           # Stand-ins for the chips: JAX takes the CPU as a TPU VM's.
           "JAX_FORCE_TPU_INIT": "1", protocol.PLATFORMS_ENV: "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={tpu_chips}"}
    if slices > 1:
        env.update(protocol.slices_env(slices, slice_id, "127.0.0.1"))
    return {**env, **device_order_env(sc.get("tpu_type", ""), slices)}


class Controller:
    def __init__(self, name: str):
        self.name, self.procs, self.sc = name, {}, scenario()
        self.preempted = not self.sc.get("preempt_at_step")
        self.next_check = 0.0

    def manifest(self) -> dict:
        with locked_state() as state:
            return state["jobsets"][self.name]["manifest"]

    def create_pods(self, attempt: int) -> None:
        pods = {}
        for rjob in self.manifest()["spec"]["replicatedJobs"]:
            job = rjob["template"]["spec"]
            spec = job["template"]["spec"]
            (container,) = spec["containers"]
            chips = int(container.get("resources", {}).get("limits", {}).get("google.com/tpu", 1))
            for j in range(rjob.get("replicas", 1)):
                for i in range(job.get("completions", 1)):
                    pod = f"{self.name}-{rjob['name']}-{j}-{i}-{secrets.token_hex(3)[:5]}"
                    home = pod_dir(pod)
                    os.makedirs(home)
                    env = {**pod_env(container, chips, i, job.get("parallelism", 1),
                                     rjob.get("replicas", 1), j, home),
                           NODE_ENV: node_tag(self.name, pod)}
                    if self.sc.get("container_image"):
                        command = containers.run_argv(
                            containers.create(self.sc["container_image"], pod),
                            container["command"], env)
                        env = {**os.environ, NODE_ENV: env[NODE_ENV]}  # buildah's own
                    else:
                        root = self.sc["image_root"]
                        command = [a.replace(IMAGE_HOME, root) for a in container["command"]]
                    with open(os.path.join(home, "log"), "w") as log:
                        proc = subprocess.Popen(command, cwd=home, env=env, stdout=log,
                                                stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)
                    self.procs[pod] = proc
                    pods[pod] = {"labels": {JOBSET_LABEL: self.name, LABELS["job"]: rjob["name"],
                                            LABELS["index"]: str(j), LABELS["pod"]: str(i),
                                            LABELS["attempt"]: str(attempt)},
                                 "job": f"{self.name}-{rjob['name']}-{j}", "rjob": rjob["name"],
                                 "container": container["name"], "phase": "Running",
                                 "exit": None, "pid": proc.pid, "started": time.time(),
                                 "grace": spec.get("terminationGracePeriodSeconds", 30)}
        with locked_state() as state:
            state["jobsets"][self.name]["pods"] = pods
        cloud_log(f"jobset {self.name}: attempt {attempt}: {len(pods)} pod(s) started: "
                  + " ".join(pods))

    def signal(self, pod: str, sig: int) -> None:
        """`sig` to a pod's processes: its group, or in a container those buildah runs."""
        proc = self.procs[pod]
        pids = ([p for p in node_processes(self.name, pod) if p != proc.pid]
                if self.sc.get("container_image") else [])
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        if not pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)

    def reap(self) -> dict[str, int]:
        """Exit codes of the pods that ended since the last look; written to the state."""
        ended = {p: container_code(proc.returncode, os.path.join(pod_dir(p), "log"))
                 for p, proc in list(self.procs.items()) if proc.poll() is not None}
        for pod in ended:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.procs[pod].pid, signal.SIGKILL)  # the container is gone
            if self.sc.get("container_image"):
                containers.remove(pod)
            del self.procs[pod]
        if ended:
            with locked_state() as state:
                pods = state["jobsets"][self.name]["pods"]
                for pod, code in ended.items():
                    pods[pod].update(exit=code, phase="Succeeded" if code == 0 else "Failed")
            cloud_log(f"jobset {self.name}: " + ", ".join(f"{p} exited {c}"
                                                          for p, c in ended.items()))
        return ended

    def delete_pods(self, why: str, notice: float | None = None) -> dict[str, int]:
        """SIGTERM to every running pod, SIGKILL after its grace period (or `notice`, when
        shorter: a node's shutdown); their exit codes."""
        with locked_state() as state:
            grace = max((p["grace"] for p in state["jobsets"][self.name]["pods"].values()),
                        default=30)
        grace = grace if notice is None else min(grace, notice)
        cloud_log(f"jobset {self.name}: {why}: SIGTERM to {len(self.procs)} pod(s)")
        for pod in self.procs:
            self.signal(pod, signal.SIGTERM)
        deadline, codes = time.monotonic() + grace, {}
        while self.procs and time.monotonic() < deadline:
            codes.update(self.reap())
            time.sleep(0.2)
        if self.procs:
            cloud_log(f"jobset {self.name}: SIGKILL to {len(self.procs)} pod(s) after the "
                      f"{grace} s grace period")
            for pod, proc in self.procs.items():
                self.signal(pod, signal.SIGKILL)
                proc.wait()
            codes.update(self.reap())
        return codes

    def job_failure(self, codes: dict[str, int]) -> tuple[str, str] | None:
        """(reason, what) of the first Job a failed pod fails, or None (all exited 0)."""
        with locked_state() as state:
            pods = state["jobsets"][self.name]["pods"]
        rjobs = {r["name"]: r["template"]["spec"] for r in self.manifest()["spec"][
            "replicatedJobs"]}
        for pod, code in codes.items():
            if code == 0:
                continue
            what = f"job {pods[pod]['job']}: pod {pod} exit code {code}"
            for rule in rjobs[pods[pod]["rjob"]].get("podFailurePolicy", {}).get("rules", []):
                on = rule.get("onExitCodes")
                if on and (code in on["values"]) == (on["operator"] == "In"):
                    if rule["action"] == "FailJob":
                        return "PodFailurePolicy", what
                    break
            return "BackoffLimitExceeded", what
        return None

    def decide(self, failure: tuple[str, str]) -> bool:
        """Restart the JobSet (True) or fail it (False) for a failed Job."""
        reason, what = failure
        policy = self.manifest()["spec"].get("failurePolicy", {})
        for rule in policy.get("rules", []):
            if reason in rule.get("onJobFailureReasons", [reason]) and \
                    rule["action"] == "FailJobSet":
                return self.fail(f'applying FailJobSet failure policy rule "{rule["name"]}": '
                                 f"{what} ({reason})")
        with locked_state() as state:
            restarts = state["jobsets"][self.name]["restarts"]
        if restarts >= policy.get("maxRestarts", 0):
            return self.fail(f"jobset failed due to reaching max number of restarts: {what}")
        self.delete_pods(f"restarting ({what})")
        with locked_state() as state:
            state["jobsets"][self.name]["restarts"] = restarts + 1
        self.create_pods(restarts + 1)
        return True

    def fail(self, message: str) -> bool:
        self.delete_pods("failed")
        with locked_state() as state:
            state["jobsets"][self.name]["conditions"] = [
                {"type": "Failed", "status": "True", "reason": "FailedJobs", "message": message,
                 "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}]
        cloud_log(f"jobset {self.name}: Failed: {message}")
        return False

    def preempt_due(self) -> bool:
        if self.preempted or time.monotonic() < self.next_check:
            return False
        self.next_check = time.monotonic() + 1
        step = reached_step(self.sc["watch_workdir"])
        if step < self.sc["preempt_at_step"]:
            return False
        self.preempted = True
        with locked_state() as state:
            state["preempted"] = state.get("preempted", 0) + 1
        cloud_log(f"jobset {self.name}: node pools preempted at step {step}")
        return True

    def run(self) -> None:
        self.create_pods(0)
        active = True
        while True:
            with locked_state() as state:
                js = state.get("jobsets", {}).get(self.name)
                if js is None or js["deleting"]:
                    break
            if active:
                codes = (self.delete_pods("preempted", SPOT_NOTICE_SECONDS)
                         if self.preempt_due() else self.reap())
                failure = self.job_failure(codes) if codes else None
                if failure:
                    active = self.decide(failure)
                elif codes and not self.procs:
                    with locked_state() as state:
                        state["jobsets"][self.name]["conditions"] = [
                            {"type": "Completed", "status": "True", "reason": "AllJobsCompleted",
                             "message": "jobset completed successfully"}]
                    cloud_log(f"jobset {self.name}: Completed")
                    active = False
            time.sleep(0.25)
        self.delete_pods("deleted")
        with locked_state() as state:
            js = state.get("jobsets", {}).pop(self.name, None)
            state.setdefault("deleted", {})[self.name] = {"restarts": js["restarts"] if js else 0}
        cloud_log(f"jobset {self.name}: deleted")


if __name__ == "__main__":
    Controller(sys.argv[1]).run()
