"""`make pod-check` on one worker (copied into its home, run by the venv's Python).

Prints one line: `ok: Python 3.11.7, vitpod 0.1.0, no other process holds the TPU, jax 0.10.2,
4 tpu devices`, or `FAILED: ` and every problem found (exit 1). With --free_tpu, processes that
hold the TPU's device files are stopped (SIGTERM, then SIGKILL) and libtpu's lock file removed
first; --tpu_only does only that (pod-launch with FREE_TPU=1). Standard library only until it
imports what it checks.
"""

import argparse
import glob
import os
import platform
import shutil
import signal
import subprocess
import sys
import time

try:
    from vitpod import protocol
    from vitpod.errors import one_line
except ImportError:  # no vitpod here (what this reports): the message's last line, as one_line
    protocol = None

    def one_line(text: object) -> str:
        lines = [line.strip() for line in str(text).splitlines() if line.strip()]
        return lines[-1] if lines else "unknown error"

GRACE = 5  # seconds a stopped holder of the TPU gets before SIGKILL


def _why(error: BaseException) -> str:
    return f"{type(error).__name__}: {one_line(error)}"


# --- who holds the TPU ---------------------------------------------------------------------
def _as_root(command: list[str]) -> list[str]:
    """`command` under `sudo -n` unless this is root (TPU VM users have passwordless sudo)."""
    return command if os.geteuid() == 0 or not shutil.which("sudo") else ["sudo", "-n", *command]


def _lsof(files: list[str]) -> dict[int, str] | None:
    """{pid: command name} of the processes lsof finds using `files`; None without lsof."""
    if not shutil.which("lsof"):
        return None
    try:
        done = subprocess.run(_as_root(["lsof", "-w", "-F", "pc", "--", *files]),
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode not in (0, 1) or "sudo:" in done.stderr:
        return None
    found, pid = {}, None
    for line in done.stdout.splitlines():
        if line[:1] == "p" and line[1:].isdigit():
            pid = int(line[1:])
            found[pid] = ""
        elif line[:1] == "c" and pid is not None:
            found[pid] = line[1:]
    return found


def _proc_scan(files: list[str]) -> dict[int, str]:
    """The same from /proc: open files and mappings of the processes this user may read."""
    wanted = {os.path.realpath(f) for f in files}
    found = {}
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            targets = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
            with open(f"/proc/{pid}/maps") as maps:
                targets.update(line.split(None, 5)[-1].strip() for line in maps)
        except OSError:
            continue
        if targets & wanted:
            found[int(pid)] = ""
    return found


def _command(pid: int, name: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            text = " ".join(w.decode(errors="replace") for w in f.read().split(b"\0") if w)
    except OSError:
        text = ""
    text = text or name or "?"
    return text if len(text) <= 80 else text[:77] + "..."


def tpu_holders() -> list[tuple[int, str]]:
    """(pid, command) of every other process that has a TPU device file open or mapped."""
    files = sorted({f for p in protocol.tpu_device_globs(os.environ) for f in glob.glob(p)})
    if not files:
        return []
    found = _lsof(files)
    if found is None:
        found = _proc_scan(files)
    found.pop(os.getpid(), None)
    return sorted((pid, _command(pid, name)) for pid, name in found.items())


def _running(pid: int, started: int | None) -> bool:
    """Whether `pid` still runs as the process that started at `started` (not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z" and int(fields[19]) == started


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:  # another user's (root's): as root
        subprocess.run(_as_root(["kill", "-s", sig.name.removeprefix("SIG"), str(pid)]),
                       capture_output=True, timeout=30)


def _wait_gone(started: dict[int, int | None], seconds: float) -> dict[int, int | None]:
    deadline = time.monotonic() + seconds
    while True:
        left = {pid: t for pid, t in started.items() if _running(pid, t)}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def free_tpu(holders: list[tuple[int, str]]) -> tuple[list[str], list[str]]:
    """SIGTERM the holders, SIGKILL those left after GRACE s, remove libtpu's lock file:
    (what was done, what is still wrong)."""
    done, problems = [], []
    started = {pid: protocol.process_start_ticks(pid) for pid, _ in holders}
    for pid in started:
        _signal(pid, signal.SIGTERM)
    left = _wait_gone(started, GRACE)
    for pid in left:
        _signal(pid, signal.SIGKILL)
    left = _wait_gone(left, 5)
    stopped = [h for h in holders if h[0] not in left]
    if stopped:
        done.append(f"stopped {_named(stopped)}, which held the TPU")
    if left:
        problems.append(f"{_named([h for h in holders if h[0] in left])} still hold(s) the TPU "
                        "after SIGKILL: stop it as root")
    lock = protocol.libtpu_lockfile(os.environ)
    if os.path.lexists(lock):
        try:
            os.remove(lock)
        except PermissionError:
            subprocess.run(_as_root(["rm", "-f", lock]), capture_output=True, timeout=30)
        except FileNotFoundError:
            pass
        if os.path.lexists(lock):
            problems.append(f"cannot remove {lock}: remove it as root")
        else:
            done.append(f"removed {lock}")
    return done, problems


def _named(holders: list[tuple[int, str]]) -> str:
    return ", ".join(f"pid {pid} ({command})" for pid, command in holders)


def tpu(found: list[str], problems: list[str], free: bool) -> bool:
    """The TPU's holders into `found` or `problems` (stopped first with `free`); True while
    another process holds it."""
    holders = tpu_holders()
    if holders and not free:
        problems.append(f"the TPU is held by {_named(holders)}: pass FREE_TPU=1 to stop them, "
                        "or stop them yourself (JAX was not started)")
        return True
    done, still = free_tpu(holders) if free else ([], [])
    found.extend(done)
    problems.extend(still)
    if not holders and any(glob.glob(p) for p in protocol.tpu_device_globs(os.environ)):
        found.append("no other process holds the TPU")
    return bool(still)


# --- the check ------------------------------------------------------------------------------
def check(python: str, want_platform: str, local_devices: int,
          free: bool = False) -> tuple[list[str], list[str]]:
    found, problems = [f"Python {platform.python_version()}"], []
    if not (platform.python_version() + ".").startswith(python + "."):
        problems.append(f"Python {platform.python_version()}, not the {python} vitpod was "
                        "tested with: make pod-setup")
    try:
        from importlib.metadata import version

        import vitpod  # noqa: F401

        found.append(f"vitpod {version('vitpod')}")
    except Exception as e:  # noqa: BLE001 - any failure is the answer
        problems.append(f"cannot import vitpod ({_why(e)}): make pod-setup")
    if protocol is not None and tpu(found, problems, free):
        return found, problems  # JAX would fall back to the CPU, or fail
    try:
        import jax

        devices = jax.local_devices()
        found.append(f"jax {jax.__version__}, {len(devices)} {devices[0].platform} devices")
        if devices[0].platform != want_platform:
            problems.append(f"JAX sees {devices[0].platform}, not {want_platform}: another "
                            "process may hold the accelerator, or jax lacks the tpu extra")
        elif local_devices and len(devices) != local_devices:
            problems.append(f"JAX sees {len(devices)} local devices, the slice implies "
                            f"{local_devices} per worker")
    except Exception as e:  # noqa: BLE001
        problems.append(f"JAX could not start the {want_platform} backend ({_why(e)})")
    if not problems:  # what decoding costs on this host: plan measured it on another machine
        try:
            from vitpod import config
            from vitpod.planning import input_budget

            ms, _ = input_budget.cpu_ms_per_image(config.defaults().data)
            found.append(f"{ms:.1f} CPU ms per 224 px training image, {os.cpu_count()} CPUs")
        except Exception as e:  # noqa: BLE001
            problems.append(f"the decode measurement failed ({_why(e)})")
    return found, problems


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--python")
    parser.add_argument("--platform")
    parser.add_argument("--local_devices", type=int, default=0)
    parser.add_argument("--free_tpu", action="store_true",
                        help="stop the processes that hold the TPU, remove libtpu's lock file")
    parser.add_argument("--tpu_only", action="store_true", help="only the TPU's holders")
    args = parser.parse_args()
    if args.tpu_only:
        found, problems = [], []
        if protocol is None:
            problems.append("cannot import vitpod: make pod-setup")
        else:
            tpu(found, problems, args.free_tpu)
    elif not (args.python and args.platform):
        parser.error("--python and --platform are needed (or --tpu_only)")
    else:
        found, problems = check(args.python, args.platform, args.local_devices, args.free_tpu)
    if problems:
        print(f"FAILED: {'; '.join(problems)} (found {', '.join(found) or 'nothing else'})")
        return 1
    print(f"ok: {', '.join(found) or 'no TPU device files here'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
