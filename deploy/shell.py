"""The command-line tools deploy/ runs (gcloud, kubectl): calls with retries and timeouts,
resources read as JSON; the one error type and the one error form of every deploy
entrypoint. Standard library only.

A gcloud error is NOT_FOUND only when gcloud says so; any other failure (network, quota,
auth) is retried and, if it persists, reported, never taken for a preemption.
"""

import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

from vitpod.errors import one_line

_print_lock = threading.Lock()


class DeployError(Exception):
    """A problem to report: one line, or one line per bad setting."""


class StateUnreadable(DeployError):
    """gcloud could not tell the slice's state (network, quota, auth): never a lost slice."""


def log(message: str) -> None:
    with _print_lock:
        print(f"[pod {datetime.datetime.now():%Y-%m-%d %H:%M:%S}] {message}", flush=True)


def is_not_found(stderr: str) -> bool:
    """gcloud's own answer that something does not exist (a resource, or objects in a bucket):
    final, unlike a failure to ask."""
    return any(s in stderr for s in ("NOT_FOUND", "was not found", "matched no objects",
                                     "(NotFound)"))  # the last: kubectl's


def reason(output: str, otherwise: object) -> str:
    """The last line a command printed, or `otherwise` when it printed nothing."""
    return one_line(output) if output.strip() else str(otherwise)


class Cli:
    """Runs gcloud (or prints it with dry_run); `sleep` is injectable for fast retries. `tool`:
    another CLI called the same way (kubectl for GKE)."""

    def __init__(self, dry_run: bool = False, sleep=time.sleep, timeout: float = 600,
                 tool: str = "gcloud"):
        self.dry_run, self.sleep, self.timeout, self.tool = dry_run, sleep, timeout, tool

    def call(self, *args: str, retries: int = 1, timeout: float | None = None,
             prefix: str = "", stream: bool = False) -> tuple[int, str, str]:
        """(exit code, stdout, stderr); retries any failure but NOT_FOUND, with backoff.
        `stream` prints output lines as they come, each after `prefix`."""
        cmd = [self.tool, *args]
        if self.dry_run:
            print(shlex.join(cmd) + "\n", end="", flush=True)  # one write: workers print at once
            return 0, "", ""
        for attempt in range(1, retries + 1):
            code, out, err = self._once(cmd, timeout or self.timeout, prefix, stream)
            if code == 0 or is_not_found(err) or attempt == retries:
                return code, out, err
            what = " ".join(args[2:4] if self.tool == "gcloud" else args[:2])
            log(f"{prefix}{self.tool} {what} failed ({reason(err, code)}); "
                f"retry {attempt}/{retries - 1}")
            self.sleep(min(60, 2 ** attempt))
        raise AssertionError("unreachable")

    def _once(self, cmd, timeout, prefix, stream) -> tuple[int, str, str]:
        try:
            # Its own process group: a timeout stops gcloud and the ssh it started.
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        except FileNotFoundError:
            raise DeployError(f"{self.tool} is not installed or not on PATH") from None
        lines = {"out": [], "err": []}

        def pump(name, pipe):
            for line in pipe:
                lines[name].append(line)
                if stream:
                    with _print_lock:
                        print(f"{prefix}{line}", end="", flush=True)

        pumps = [threading.Thread(target=pump, args=(n, p), daemon=True)
                 for n, p in (("out", proc.stdout), ("err", proc.stderr))]
        for t in pumps:
            t.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            code = proc.wait()
            lines["err"].append(f"timed out after {timeout:.0f} s\n")
        for t in pumps:
            t.join(timeout=5)
        return code, "".join(lines["out"]), "".join(lines["err"])

    def describe(self, *args: str, retries: int) -> dict | None:
        """The resource as JSON, or None when gcloud says NOT_FOUND. Other errors are retried
        and then raised: an unreadable state is not a lost slice."""
        code, out, err = self.call(*args, "--format=json", retries=retries, timeout=120)
        if self.dry_run:
            return {"state": {"state": "ACTIVE"}, "networkEndpoints": [{}]}
        if code == 0:
            try:
                return json.loads(out or "{}")
            except ValueError:
                err = f"gcloud printed no JSON: {one_line(out)}"
        elif is_not_found(err):
            return None
        raise StateUnreadable(f"cannot read the state of {args[4]} after {retries} tries "
                              f"({reason(err, f'gcloud exit {code}')}); the slice is left as "
                              "it is (not treated as preempted): check gcloud, then make "
                              "pod-status")


def exit_code(verb) -> int:
    """Run a command-line verb: 0, or its failure as `error: ...` lines on stderr and 1 (130
    on Ctrl-C). The one error form of every deploy entrypoint."""
    try:
        verb()
    except DeployError as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 1
    except (OSError, ValueError, KeyError, subprocess.CalledProcessError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
