"""The simulated spot capacity of one slice: takes it back once the run reaches a step.

    python -m deploy.sim.capacity NAME      (started by the simulated gcloud when NAME is ACTIVE)

Watches WORKDIR/metrics.jsonl in the bucket; at `preempt_at_step` it does what GCE does to a
spot TPU VM: the queued resource goes SUSPENDING, every process on every worker gets SIGTERM
(the trainers agree on a step, save and exit), SIGKILL after the grace period, then the
resource is SUSPENDED and the node NOT_FOUND, its disks gone. Of a multislice job only one
slice is taken back (`preempt_slice`, the last by default): its workers get the SIGTERM (the
trainers of every slice agree on the step), then its node reads PREEMPTED while the queued
resource reads ACTIVE again (what Google shows then is not documented: this is the case a
watcher that looks only at the queued resource would miss).
"""

import json
import signal
import sys
import time

from deploy.sim import cloud_state as sim


def reached_step(workdir: str) -> int:
    from google.cloud import storage as gcs

    bucket, _, prefix = workdir.removeprefix("gs://").partition("/")
    blob = gcs.Client(project="test-project").bucket(bucket).blob(
        f"{prefix.rstrip('/')}/metrics.jsonl")
    try:
        rows = blob.download_as_text().splitlines()
    except Exception:  # noqa: BLE001 - not written yet
        return 0
    return max((json.loads(r).get("step", 0) for r in rows if r.strip()), default=0)


def main(name: str) -> None:
    sc = sim.scenario()
    while True:
        with sim.locked_state() as state:
            res = state["resources"].get(name)
            if res is None or res.get("deleting") or res.get("state") != "ACTIVE":
                return
        step = reached_step(sc["watch_workdir"])
        if step >= sc["preempt_at_step"]:
            break
        time.sleep(0.25)
    with sim.locked_state() as state:
        if name not in state["resources"]:  # deleted meanwhile
            return
        res = state["resources"][name]
        nodes, node = res["nodes"], res["nodes"][sc["preempt_slice"]]
        res.update(state="SUSPENDING", lost={**res.get("lost", {}), node: "PREEMPTED"})
        state["preempted"] = state.get("preempted", 0) + 1
    count = sim.signal_node(node, signal.SIGTERM)
    sim.cloud_log(f"{node}: preempted at step {step}: SIGTERM to {count} processes, SUSPENDING")
    deadline = time.monotonic() + sc["grace_seconds"]
    while sim.node_processes(node) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = len(sim.node_processes(node))
    sim.tear_down(node)
    with sim.locked_state() as state:
        res = state["resources"].get(name)
        if res and len(nodes) > 1:
            res.update(state="ACTIVE", lost={**res.get("lost", {}), node: "PREEMPTED"})
        elif res:
            res["state"] = "SUSPENDED"
    sim.cloud_log((f"{node}: PREEMPTED, {name} ACTIVE again with its other slices" if
                   len(nodes) > 1 else f"{name}: SUSPENDED, node gone")
                  + (f" ({left} processes killed after the grace period)" if left else ""))


if __name__ == "__main__":
    main(sys.argv[1])
