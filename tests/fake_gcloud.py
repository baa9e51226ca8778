#!/usr/bin/env python3
"""A stand-in for `gcloud` in tests: records each call and plays scripted TPU states.

State lives in the JSON file $FAKE_GCLOUD (read and written on every call):
  qr_states   states `queued-resources describe` returns after a create, in order; the
              last repeats. A delete removes the resource; the next create starts the
              list over from `qr_next_after_delete` (default 0).
  exists      whether the queued resource exists now
  done_after  `storage ls .../DONE` succeeds from this call on (null: never)
  fail_scp    how many scp calls fail before they succeed
  node_state  what `tpu-vm describe` prints
  calls       every argv so far (appended)
"""

import json
import os
import sys

path = os.environ["FAKE_GCLOUD"]
with open(path) as f:
    s = json.load(f)
args = sys.argv[1:]
s["calls"].append(args)
code, out, err = 0, "", ""
verb = args[3] if len(args) > 3 else ""
if args[:3] == ["compute", "tpus", "queued-resources"]:
    if verb == "create":
        s["exists"], s["qr_index"] = True, s.get("qr_next_after_delete", 0)
    elif verb == "delete":
        s["exists"] = False
    elif verb == "describe":
        if not s["exists"]:
            code, err = 1, "ERROR: (gcloud) NOT_FOUND: resource not found"
        else:
            i = min(s.get("qr_index", 0), len(s["qr_states"]) - 1)
            out = s["qr_states"][i] + "\n"
            s["qr_index"] = s.get("qr_index", 0) + 1
elif args[:3] == ["compute", "tpus", "tpu-vm"]:
    if verb == "scp" and s.get("fail_scp", 0) > 0:
        s["fail_scp"] -= 1
        code, err = 1, "ssh: connect to host: Connection timed out"
    elif verb == "describe":
        out = s.get("node_state", "READY") + "\n"
elif args[:2] == ["storage", "ls"]:
    s["storage_calls"] = s.get("storage_calls", 0) + 1
    done = s.get("done_after")
    if done is None or s["storage_calls"] < done:
        code, err = 1, "ERROR: One or more URLs matched no objects."
    else:
        out = args[2] + "\n"
with open(path, "w") as f:
    json.dump(s, f)
sys.stdout.write(out)
sys.stderr.write(err)
sys.exit(code)
