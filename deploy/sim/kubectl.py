"""A simulated `kubectl` for `make gke-sim`: the API server's side of a JobSet.

    kubectl [--namespace=NS] apply -f -                  (a JobSet manifest on stdin)
    kubectl get jobset NAME -o json | get pods -l jobset.sigs.k8s.io/jobset-name=NAME -o json
    kubectl logs POD [--tail=N] | delete jobset NAME

`apply` checks the manifest against the JobSet API's fields (deploy/gke/schema.py), as the API
server would refuse it, stores it in the simulation's state and starts its controller
(deploy/sim/jobset_controller.py), which runs the pods as local process groups. Everything
else reads that state; `delete` asks the controller to stop the pods (SIGTERM, SIGKILL after
the manifest's grace period) and waits until the JobSet is gone. `install(BIN_DIR)` puts a
`kubectl` running this module into BIN_DIR. One namespace: --namespace is accepted, not kept.
"""

import json
import os
import shlex
import subprocess
import sys
import time

import yaml

from deploy.gke.schema import JOBSET, schema_errors
from deploy.sim.cloud_state import cloud_log, fail, flag, locked_state, positional, sim_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KIND = "jobsets.jobset.x-k8s.io"
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"


def pod_dir(pod: str) -> str:
    return os.path.join(sim_dir(), "pods", pod)


def not_found(kind: str, name: str) -> None:
    fail(f'Error from server (NotFound): {kind} "{name}" not found')


def apply(args: list[str]) -> None:
    if flag(args, "f") != "-" and "-" not in positional(args):
        fail("sim kubectl: only `apply -f -` is simulated", 2)
    try:
        doc = yaml.safe_load(sys.stdin.read())
    except yaml.YAMLError as e:
        fail(f"error: error parsing STDIN: {e}")
    if not isinstance(doc, dict) or doc.get("kind") != "JobSet":
        fail("sim kubectl: only a JobSet is simulated", 2)
    name = doc.get("metadata", {}).get("name", "")
    errors = schema_errors(doc, JOBSET)
    if errors:
        fail(f'The JobSet "{name}" is invalid: ' + "; ".join(errors))
    with locked_state() as state:
        jobsets = state.setdefault("jobsets", {})
        if name in jobsets:
            if jobsets[name]["manifest"] == doc:
                print(f"jobset.jobset.x-k8s.io/{name} unchanged")
                return
            fail(f'The JobSet "{name}" is invalid: spec.replicatedJobs: field is immutable')
        jobsets[name] = {"manifest": doc, "restarts": 0, "conditions": [], "pods": {},
                         "deleting": False, "created": time.time()}
    os.makedirs(os.path.join(sim_dir(), "pods"), exist_ok=True)
    with open(os.path.join(sim_dir(), f"controller-{name}.log"), "a") as out:
        proc = subprocess.Popen([sys.executable, "-m", "deploy.sim.jobset_controller", name],
                                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)
    with locked_state() as state:
        state["jobsets"][name]["controller"] = proc.pid
    cloud_log(f"jobset {name}: created, controller pid {proc.pid}")
    print(f"jobset.jobset.x-k8s.io/{name} created")


def jobset_json(name: str, js: dict) -> dict:
    pods = js["pods"].values()
    counts = {phase: sum(p["phase"] == phase for p in pods)
              for phase in ("Running", "Succeeded", "Failed")}
    return {**js["manifest"], "status": {
        "restarts": js["restarts"], "conditions": js["conditions"],
        "replicatedJobsStatus": [{"name": r["name"], "ready": counts["Running"],
                                  "active": counts["Running"], "succeeded": counts["Succeeded"],
                                  "failed": counts["Failed"], "suspended": 0}
                                 for r in js["manifest"]["spec"]["replicatedJobs"]]}}


def pod_json(name: str, pod: dict) -> dict:
    if pod["phase"] == "Running":
        state = {"running": {"startedAt": pod["started"]}}
    else:
        state = {"terminated": {"exitCode": pod["exit"], "reason": "Completed"
                                if pod["exit"] == 0 else "Error"}}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": pod["labels"]},
            "status": {"phase": pod["phase"],
                       "containerStatuses": [{"name": pod["container"], "state": state}]}}


def get(args: list[str]) -> None:
    what = positional(args)
    if "json" not in (flag(args, "o") or (args[args.index("-o") + 1] if "-o" in args else "")):
        fail("sim kubectl: only -o json is simulated", 2)
    with locked_state() as state:
        jobsets = state.get("jobsets", {})
    if what[0] in ("jobset", "jobsets"):
        if what[1] not in jobsets:
            not_found(KIND, what[1])
        print(json.dumps(jobset_json(what[1], jobsets[what[1]])))
    elif what[0] in ("pod", "pods"):
        selector = args[args.index("-l") + 1] if "-l" in args else flag(args, "selector")
        key, _, value = selector.partition("=")
        items = [pod_json(n, p) for js in jobsets.values() for n, p in js["pods"].items()
                 if not selector or p["labels"].get(key) == value]
        print(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    else:
        fail(f"sim kubectl: get {what[0]} is not simulated", 2)


def logs(args: list[str]) -> None:
    words = [a for a in positional(args) if a != "-f"]
    path = os.path.join(pod_dir(words[0]), "log")
    if not os.path.exists(path):
        not_found("pods", words[0])
    lines = open(path, errors="replace").read().splitlines()
    tail = int(flag(args, "tail", "-1"))
    print("\n".join(lines[-tail:] if tail >= 0 else lines))


def delete(args: list[str]) -> None:
    kind, name = positional(args)[:2]
    if kind not in ("jobset", "jobsets"):
        fail(f"sim kubectl: delete {kind} is not simulated", 2)
    with locked_state() as state:
        js = state.get("jobsets", {}).get(name)
        if js is None:
            not_found(KIND, name)
        js["deleting"] = True
        grace = max((r["template"]["spec"]["template"]["spec"].get(
            "terminationGracePeriodSeconds", 30) for r in js["manifest"]["spec"][
            "replicatedJobs"]), default=30)
    deadline = time.monotonic() + grace + 60
    while time.monotonic() < deadline:
        with locked_state() as state:
            if name not in state.get("jobsets", {}):
                print(f'jobset.jobset.x-k8s.io "{name}" deleted')
                return
        time.sleep(0.25)
    fail(f"error: timed out waiting for the deletion of jobset {name}")


def main(argv: list[str]) -> None:
    args = [a for a in argv if not a.startswith(("--namespace=", "-n="))]
    cloud_log(f"kubectl {shlex.join(args)}")
    verbs = {"apply": apply, "get": get, "logs": logs, "delete": delete}
    if not args or args[0] not in verbs:
        fail(f"sim kubectl: {' '.join(args[:2])} is not simulated", 2)
    verbs[args[0]](args[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
