"""A simulated `gcloud` for `make pod-sim`: the cloud's control plane is played, everything it
would run is executed.

Queued resources move through their documented states (one state per `describe`, so a
rehearsal is deterministic); an ACTIVE slice has one worker per host, each a home directory
under $SIM_DIR/nodes whose `python3` is a Python 3.10 stand-in without venv, as on Google's
TPU images. `tpu-vm scp` copies into those homes, `tpu-vm ssh --command` runs the command with
bash in them (as OpenSSH would connect: deploy/sim/ssh.py), `storage ls|cat|cp` read and write
the bucket of a GCS server on loopback.
Worker processes carry cloud_state.NODE_ENV in their environment, which is how the simulated
preemption and `delete` find them. Knobs for a rehearsal or a test: $SIM_DIR/scenario.json (see
cloud_state.SCENARIO). `install(BIN_DIR)` puts a `gcloud` that runs this module into BIN_DIR.
"""

import json
import os
import shutil
import subprocess
import sys
import time

from deploy.sim.cloud_state import (
    NODE_ENV,
    cloud_log,
    device_order_env,
    fail,
    flag,
    image_env,
    locked_state,
    node_dir,
    node_tag,
    not_found,
    positional,
    scenario,
    sim_dir,
    tear_down,
)
from deploy.sim.ssh import check_host_keys, make_client_key, new_host_keys
from deploy.sim.storage_cli import storage
from vitpod import protocol

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def hosts(tpu_type: str, chips_per_host: int) -> int:
    generation, _, size = tpu_type.rpartition("-")
    chips = int(size) // 2 if generation in ("v4", "v5p") else int(size)
    return max(1, chips // chips_per_host)


def queued_resources(verb: str, args: list[str]) -> None:
    name, sc = positional(args)[0], scenario()
    with locked_state() as state:
        res = state["resources"].get(name)
        if verb == "create":
            if res is not None:
                fail(f"ERROR: (gcloud.compute.tpus.queued-resources.create) ALREADY_EXISTS: "
                     f"'{name}' already exists")
            failing = sc["fail_creations"][state.get("creations", 0):]
            state["creations"] = state.get("creations", 0) + 1
            valid = flag(args, "valid-until-duration").rstrip("s")
            count, prefix = int(flag(args, "node-count", "1")), flag(args, "node-prefix", name)
            state["resources"][name] = {
                "nodes": [flag(args, "node-id", name)] if count == 1 else
                [f"{prefix}-{k}" for k in range(count)], "prefix": prefix,
                "type": flag(args, "accelerator-type"), "polls": 0, "zone": flag(args, "zone"),
                "spot": "--spot" in args, "fail": failing[0] if failing else "",
                "valid_until": time.time() + float(valid) if valid else None}
            cloud_log(f"{name}: create {state['resources'][name]}")
            return
        if res is None:
            not_found("queuedResources", name, f"queued-resources.{verb}")
        if verb == "delete":
            if "--force" not in args and res.get("state") == "ACTIVE":
                fail("ERROR: the queued resource has a node: pass --force")
            res.update(deleting=True, polls=0)
            for node in res["nodes"]:
                tear_down(node)
            cloud_log(f"{name}: delete")
            return
        if verb == "describe":
            if state.get("describe_errors", 0) < sc["describe_errors"]:
                state["describe_errors"] = state.get("describe_errors", 0) + 1
                fail("ERROR: (gcloud.compute.tpus.queued-resources.describe) There was a "
                     "problem refreshing your current auth tokens: Connection reset by peer")
            now = advance(state, name, res, sc)
            if now is None:
                not_found("queuedResources", name, "queued-resources.describe")
            spec = {"node": {"acceleratorType": res["type"]}}
            spec.update({"nodeId": res["nodes"][0]} if len(res["nodes"]) == 1 else {
                "multisliceParams": {"nodeCount": len(res["nodes"]),
                                     "nodeIdPrefix": res["prefix"]}})
            out = {"name": name, "state": {"state": now}, "tpu": {"nodeSpec": [spec]}}
            if now == "FAILED":
                out["state"]["failedData"] = {"error": {"code": 8, "message": res["fail"]}}
            print(json.dumps(out))
            return
    fail(f"sim gcloud: queued-resources {verb} is not simulated", 2)


def advance(state: dict, name: str, res: dict, sc: dict) -> str | None:
    """The state this describe reports, moving the resource on by one poll."""
    res["polls"] += 1
    if res.get("deleting"):
        if res["polls"] > sc["delete_polls"]:
            del state["resources"][name]
            return None
        return "DELETING"
    if res.get("state") in ("ACTIVE", "SUSPENDING", "SUSPENDED", "FAILED"):
        return res["state"]
    granted = state.setdefault("granted", {})  # slices of each type granted so far
    no_capacity = granted.get(res["type"], 0) + len(res["nodes"]) > sc["capacity_limits"].get(
        res["type"], 10**9)
    if res["polls"] <= sc["wait_polls"] or no_capacity:
        if res["valid_until"] and time.time() > res["valid_until"]:
            res.update(state="FAILED", fail="the request expired (--valid-until-duration) "
                       "before capacity was found")
            return "FAILED"
        return "WAITING_FOR_RESOURCES"
    if res["polls"] <= sc["wait_polls"] + sc["provision_polls"]:
        return "PROVISIONING"
    if res["fail"]:
        res["state"] = "FAILED"
        return "FAILED"
    make_node(state, name, res, sc)
    return "ACTIVE"


def make_node(state: dict, name: str, res: dict, sc: dict) -> None:
    """Fresh nodes (one per slice): empty worker homes; the capacity watcher if asked."""
    res.update(state="ACTIVE", workers=hosts(res["type"], sc["chips_per_host"]), lost={})
    n = len(res["nodes"])
    state["granted"][res["type"]] = state["granted"].get(res["type"], 0) + n
    state.setdefault("slices", []).append(
        (f"{n} x " if n > 1 else "") + f"{res['type']} ({res['workers']} workers"
        + (" each)" if n > 1 else ")"))
    for node in res["nodes"]:
        new_host_keys(state, node)
        shutil.rmtree(node_dir(node), ignore_errors=True)
        for i in range(res["workers"]):  # its chips as device files, as on a v4 host
            os.makedirs(os.path.join(node_dir(node), f"w{i}", "dev"))
            for chip in range(sc["chips_per_host"]):
                open(os.path.join(node_dir(node), f"w{i}", "dev", f"accel{chip}"), "w").close()
    if sc["preempt_at_step"] and res["spot"] and not state.get("preempted"):
        subprocess.Popen([sys.executable, "-m", "deploy.sim.capacity", name], cwd=ROOT,
                         start_new_session=True, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=open(
                             os.path.join(sim_dir(), "capacity.log"), "a"))
    cloud_log(f"{name}: ACTIVE with {n} node(s) of {res['workers']} worker(s)")


# --- TPU VMs -------------------------------------------------------------------------------
def resource_of(state: dict, node: str) -> dict | None:
    return next((r for r in state["resources"].values() if node in r.get("nodes", [])), None)


def active_node(name: str, command: str) -> dict:
    with locked_state() as state:
        res = resource_of(state, name)
    # node_gone: the node vanished while the queued resource still reads ACTIVE, as happens
    # after some preemptions; tests set it in the state. `lost`: a node taken back (it reads
    # PREEMPTED, then NOT_FOUND); during the notice (SUSPENDING) its nodes can still be
    # described, the preempted one as PREEMPTED, but not reached.
    readable = ("ACTIVE", "SUSPENDING") if command == "describe" else ("ACTIVE",)
    if res is None or res.get("state") not in readable or res.get("deleting") or res.get(
            "node_gone") or (res.get("lost", {}).get(name) and command != "describe"):
        not_found("nodes", name, f"tpu-vm.{command}")
    return res


def workers_of(args: list[str], res: dict) -> list[int]:
    which = flag(args, "worker", "0")
    if which == "all":
        return list(range(res["workers"]))
    if not which.isdigit() or int(which) >= res["workers"]:
        fail(f"ERROR: --worker={which}: the node has workers 0-{res['workers'] - 1}")
    return [int(which)]


def worker_env(name: str, res: dict, i: int) -> dict:
    """What a process on worker i sees: a clean login environment of the image, plus the
    channels that stand in for the metadata server and the emulator's endpoints."""
    sc, nodes, home = scenario(), res["nodes"], os.path.join(node_dir(name), f"w{i}")
    # A multislice job: the runtime's slice values; the megascale coordinator is worker 0 of
    # slice 0 (every simulated host is 127.0.0.1).
    slices = protocol.slices_env(len(nodes), nodes.index(name), "127.0.0.1") \
        if len(nodes) > 1 else {}
    return {**image_env(home), protocol.SIM_ROOT_ENV: home,
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={sc['chips_per_host']}",
            **protocol.sim_metadata_env("127.0.0.1", res["workers"], i), **slices,
            **device_order_env(res["type"], len(nodes)), NODE_ENV: node_tag(name, i)}


def tpu_vm(verb: str, args: list[str]) -> None:
    name = positional(args)[0] if verb != "scp" else positional(args)[-1].split(":")[0]
    if verb == "describe":
        res = active_node(name, verb)
        # Every worker is this machine; TEST-NET-1 (RFC 5737) stands for a blocked worker 0.
        ips = ["127.0.0.1"] * res["workers"]
        ips[0] = "192.0.2.1" if scenario()["unreachable_coordinator"] else ips[0]
        print(json.dumps({"name": name, "state": res["lost"].get(name) or "READY",
                          "acceleratorType": res["type"],
                          "networkEndpoints": [{"ipAddress": ip, "port": 8470} for ip in ips],
                          "networkConfig": {"network": "projects/sim/global/networks/default"},
                          "cidrBlock": "127.0.0.0/8"}))
        return
    res = active_node(name, verb)
    if verb in ("scp", "ssh"):
        make_client_key(verb)
    if verb == "scp":
        with locked_state() as state:
            failing = state.get("scp_failures", 0) < scenario()["scp_failures"]
            state["scp_failures"] = state.get("scp_failures", 0) + failing
        if failing:
            fail("ssh: connect to host 127.0.0.1 port 22: Connection refused\n"
                 "ERROR: (gcloud.compute.tpus.tpu-vm.scp) [/usr/bin/scp] exited with return "
                 "code [255].", 255)
        check_host_keys(verb, flag(args, "strict-host-key-checking"), name, workers_of(args, res))
        *sources, target = positional(args)
        target = target.split(":", 1)[1].removeprefix("~/").removeprefix("~")
        for i in workers_of(args, res):
            dest = os.path.join(node_dir(name), f"w{i}", target)
            if target.endswith("/") or target == "":
                os.makedirs(dest, exist_ok=True)
            for src in sources:
                if os.path.isdir(src):
                    shutil.copytree(src, os.path.join(dest, os.path.basename(src)),
                                    dirs_exist_ok=True)
                else:
                    shutil.copy(src, dest)
        return
    if verb == "ssh":
        command = flag(args, "command")
        if not command:
            fail("sim gcloud: an interactive ssh is not simulated; pass --command", 2)
        check_host_keys(verb, flag(args, "strict-host-key-checking"), name, workers_of(args, res))
        procs = [subprocess.Popen(["bash", "-c", command], cwd=os.path.join(node_dir(name),
                                                                             f"w{i}"),
                                  env=worker_env(name, res, i), stdin=subprocess.DEVNULL)
                 for i in workers_of(args, res)]
        sys.exit(max(p.wait() for p in procs))
    fail(f"sim gcloud: tpu-vm {verb} is not simulated", 2)


# --- storage ---------------------------------------------------------------------------------
def main(args: list[str]) -> None:
    with locked_state() as state:
        state["calls"].append(args)
    if args[:3] == ["compute", "tpus", "queued-resources"] and len(args) > 3:
        queued_resources(args[3], args[4:])
    elif args[:3] == ["compute", "tpus", "tpu-vm"] and len(args) > 3:
        tpu_vm(args[3], args[4:])
    elif args[:1] == ["storage"] and len(args) > 2:
        storage(args[1], args[2:])
    else:
        fail(f"sim gcloud: {' '.join(args[:4])} is not simulated", 2)


if __name__ == "__main__":
    main(sys.argv[1:])
