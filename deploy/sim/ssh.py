"""The client side of the simulated `gcloud compute tpus tpu-vm ssh|scp`, as OpenSSH behaves
under gcloud on the caller's machine: host keys are remembered per worker (gcloud's alias
`tpu.NODE-WORKER`), a node made anew under the same name has new ones, and a client that checks
them refuses a changed key (`--strict-host-key-checking`: yes and ask refuse, no warns and goes
on; without the flag, no on the first connection and yes afterwards).
"""

import base64
import hashlib
import os
import sys

from deploy.sim.cloud_state import locked_state

STRICT_CHOICES = ("ask", "no", "yes")


def fail(message: str, code: int) -> None:
    print(message, file=sys.stderr)
    sys.exit(code)


def new_host_keys(state: dict, name: str) -> None:
    """A node made (again) under `name`: its workers' host keys are new."""
    keys = state.setdefault("host_keys", {})
    keys[name] = keys.get(name, 0) + 1


def _fingerprint(alias: str, key: int) -> str:
    digest = hashlib.sha256(f"{alias}:{key}".encode()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _changed(alias: str, key: int, line: int) -> str:
    """OpenSSH's warning for a host whose key is not the one the client remembers."""
    known = os.path.join(os.environ.get("HOME", "~"), ".ssh", "google_compute_known_hosts")
    rule = "@" * 59
    return (f"{rule}\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n{rule}\n"
            "IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!\n"
            "Someone could be eavesdropping on you right now (man-in-the-middle attack)!\n"
            "It is also possible that a host key has just been changed.\n"
            f"The fingerprint for the ECDSA key sent by the remote host is\n"
            f"{_fingerprint(alias, key)}.\nPlease contact your system administrator.\n"
            f"Add correct host key in {known} to get rid of this message.\n"
            f"Offending ECDSA key in {known}:{line}\n"
            f"  remove with:\n  ssh-keygen -f \"{known}\" -R \"{alias}\"")


def check_host_keys(verb: str, strict: str, name: str, workers: list[int]) -> None:
    """Connect to `workers` of node `name` as OpenSSH would: exit 255 on a key it refuses."""
    if strict and strict not in STRICT_CHOICES:
        fail(f"ERROR: (gcloud.compute.tpus.tpu-vm.{verb}) argument --strict-host-key-checking: "
             f"Invalid choice: '{strict}'.\n\nValid choices are [{', '.join(STRICT_CHOICES)}].",
             2)
    with locked_state() as state:
        key = state.get("host_keys", {}).get(name, 1)
        known = state.setdefault("known_hosts", {})
        for i in workers:
            alias = f"tpu.{name}-{i}"
            seen = known.get(alias)
            checking = strict or ("no" if seen is None else "yes")
            if seen is None:
                if checking != "no":
                    fail(f"No ECDSA host key is known for {alias} and you have requested strict "
                         "checking.\nHost key verification failed.", 255)
                known[alias] = key  # "Permanently added ... to the list of known hosts"
            elif seen != key:
                line = list(known).index(alias) + 1
                if checking != "no":
                    fail(f"{_changed(alias, key, line)}\nHost key for {alias} has changed and you "
                         "have requested strict checking.\nHost key verification failed.", 255)
                # StrictHostKeyChecking=no: it warns, keeps the old entry, and connects.
                print(f"{_changed(alias, key, line)}\nPassword authentication is disabled to "
                      "avoid man-in-the-middle attacks.\nKeyboard-interactive authentication is "
                      "disabled to avoid man-in-the-middle attacks.", file=sys.stderr)
