"""The client side of the simulated `gcloud compute tpus tpu-vm ssh|scp`, as gcloud and OpenSSH
behave on the caller's machine.

- Its ssh key: the first call on a machine without $HOME/.ssh/google_compute_engine makes it
  (ssh-keygen, a moment's work); a call that starts meanwhile finds the file being made and
  fails as ssh-keygen does when asked to overwrite it. Made only in a home under SIM_DIR.
- Host keys, remembered per worker (gcloud's alias `tpu.NODE-WORKER`): a node made anew under
  the same name has new ones, and a client that checks them refuses a changed key
  (`--strict-host-key-checking`: yes and ask refuse, no warns and goes on; without the flag,
  no on the first connection and yes afterwards).
"""

import base64
import hashlib
import os
import sys
import time

from deploy.sim.cloud_state import fail, locked_state, sim_dir
from vitpod import protocol

STRICT_CHOICES = ("ask", "no", "yes")
KEYGEN_SECONDS = 2  # how long making the key takes: a parallel first call starts meanwhile


def make_client_key(verb: str) -> None:
    """gcloud's own key, made by the first ssh or scp on this machine before it connects."""
    home = os.environ.get("HOME", "")
    key = os.path.join(home, protocol.GCLOUD_SSH_KEY)
    making = key + ".making"
    if os.path.exists(key) and not os.path.exists(making):
        return
    if not os.path.realpath(home).startswith(os.path.realpath(sim_dir()) + os.sep):
        fail(f"sim gcloud: HOME={home} has no {protocol.GCLOUD_SSH_KEY}, and the rehearsal "
             "makes one only in a home under SIM_DIR, never in yours", 2)
    os.makedirs(os.path.dirname(key), exist_ok=True)
    try:
        os.close(os.open(making, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:  # another call is making it: ssh-keygen will not overwrite
        with locked_state() as state:
            state["keygen_races"] = state.get("keygen_races", 0) + 1
        fail(f"{key} already exists.\nOverwrite (y/n)? \nERROR: (gcloud.compute.tpus.tpu-vm."
             f"{verb}) [/usr/bin/ssh-keygen] exited with return code [1].", 1)
    print("WARNING: The private SSH key file for gcloud does not exist.\n"
          "WARNING: The public SSH key file for gcloud does not exist.\n"
          "WARNING: You do not have an SSH key for gcloud.\n"
          "WARNING: SSH keygen will be executed to generate a key.", file=sys.stderr)
    time.sleep(KEYGEN_SECONDS)
    with open(key, "w") as f:
        f.write("simulated private key\n")
    with open(key + ".pub", "w") as f:
        f.write("ssh-rsa c2ltdWxhdGVk sim\n")
    os.chmod(key, 0o600)
    print(f"Your identification has been saved in {key}", file=sys.stderr)
    with locked_state() as state:
        state["keys_made"] = state.get("keys_made", 0) + 1
    os.remove(making)


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
