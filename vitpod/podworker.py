"""What runs on each TPU worker around `vitpod.train`: a pid file, a log copied to the workdir,
and markers that tell `make pod-launch` which workers started, got ready and exited.

    python -m vitpod.podworker start --workdir=gs://B/run -- python -m vitpod.train ...
    python -m vitpod.podworker stop

`start` stops the trainer of an earlier launch (by its pid file, never by a name pattern: on
one machine, as in `make pod-sim`, a pattern would kill other workers and other runs), then
starts a supervisor in its own session, detached from the ssh call, and returns. The
supervisor runs the command with its output in the log file, copies the log to the workdir
as it grows (a preempted VM takes its disk with it) and marks the worker started and exited
(`train` marks it joining at its start and ready once `jax.distributed` is up and its devices
are checked). Where logs and markers go, and the launch id and worker index this reads from
the environment, are `vitpod.protocol`'s; without that environment nothing is marked.
"""

import argparse
import os
import signal
import subprocess
import sys
import time

from vitpod import protocol, storage
from vitpod.workdir.markers import mark


def _our_group(pidfile: str) -> int | None:
    """The process group in `pidfile` while our supervisor's group still runs (pids get
    reused: a group of strangers under that number, or our own, is left alone).

    The file holds the supervisor's pid (its group's id), the launch and the supervisor's
    start time. While any process of that group lives, Linux reuses neither number; so a live
    leader must have the recorded start time, and members without a leader are ours.
    """
    try:
        pgid_text, _, started = (open(pidfile).read().split() + ["", ""])[:3]
        pgid = int(pgid_text)
    except (OSError, ValueError):
        return None
    if pgid == os.getpgrp() or not _members(pgid):
        return None
    leader = protocol.process_start_ticks(pgid)
    if leader is not None and str(leader) != started:
        return None  # the number now names another process: not ours to signal
    return pgid


def stop(pidfile: str, grace: float) -> str:
    """SIGTERM the earlier launch's process group (a chance to save), SIGKILL after `grace`."""
    pid = _our_group(pidfile)
    said = "no earlier trainer running"
    if pid is not None:
        _signal(pid, signal.SIGTERM, group=True)
        if _wait_gone(pid, grace):
            said = f"stopped the earlier trainer (process group {pid})"
        else:
            # The trainer first, so that the supervisor still marks its exit and copies the log.
            for member in _members(pid):
                if member != pid:
                    _signal(member, signal.SIGKILL)
            if not _wait_gone(pid, 10):
                _signal(pid, signal.SIGKILL, group=True)
                _wait_gone(pid, 10)
            said = f"killed the earlier trainer (process group {pid}) after {grace:.0f} s"
    if os.path.exists(pidfile):
        os.remove(pidfile)
    lock = protocol.libtpu_lockfile(os.environ)
    if pid is not None and os.path.exists(lock):
        try:  # left behind by a killed trainer, it makes the next one see "TPU in use"
            os.remove(lock)
        except OSError:
            pass
    return said


def _signal(pid: int, sig: int, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except ProcessLookupError:  # it exited meanwhile
        pass


def _wait_gone(pgid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`."""
    found = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:  # /proc/PID/stat: state and pgid follow the parenthesised command name
            stat = open(f"/proc/{pid}/stat").read()
            fields = stat[stat.rindex(")") + 2:].split()
        except (OSError, ValueError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(pid))
    return found


def start(args: argparse.Namespace) -> None:
    worker = os.environ.get(protocol.WORKER_ENV, "?")
    launch_id = os.environ.get(protocol.LAUNCH_ENV, "")
    running = _our_group(args.pidfile)
    if running and launch_id and open(args.pidfile).read().split()[1:2] == [launch_id]:
        # A retried ssh whose first try got through: this launch already runs here.
        print(f"worker {worker}: launch {launch_id} already running (process group {running})")
        return
    print(f"worker {worker}: {stop(args.pidfile, args.grace)}", flush=True)
    supervisor = [sys.executable, "-m", "vitpod.podworker", "supervise",
                  f"--workdir={args.workdir}", f"--log={args.log}",
                  f"--sync_seconds={args.sync_seconds}", "--", *args.command]
    # Its own session: the ssh call that started it may end, and `stop` signals the group.
    proc = subprocess.Popen(supervisor, start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(args.pidfile, "w") as f:
        f.write(f"{proc.pid} {launch_id or '-'} {protocol.process_start_ticks(proc.pid)}\n")
    print(f"worker {worker}: started, process group {proc.pid}, log "
          f"{os.path.abspath(args.log)}", flush=True)


def supervise(args: argparse.Namespace) -> int:
    # A preemption's SIGTERM reaches the whole group: the trainer saves and exits, and this
    # process stays to copy the last lines of its log.
    signal.signal(signal.SIGTERM, lambda *_: None)
    launch_id, worker = os.environ.get(protocol.LAUNCH_ENV), os.environ.get(protocol.WORKER_ENV)
    remote = (protocol.log_path(args.workdir, launch_id, worker)
              if launch_id and worker is not None else None)
    code = 127  # the trainer could not be started
    try:
        with open(args.log, "wb") as log:
            trainer = subprocess.Popen(args.command, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT)
        _try(mark, args.workdir, protocol.STARTED, pid=trainer.pid)
        copied = -1
        while True:
            try:
                code = trainer.wait(timeout=args.sync_seconds)
            except subprocess.TimeoutExpired:
                code = None
            copied = _copy_log(args.log, remote, copied)
            if code is not None:
                break
    finally:  # whatever happened, the launch learns that this worker's trainer is gone
        _try(mark, args.workdir, protocol.EXITED, code=code)
    return 0


def _try(fn, *args, **kwargs) -> None:
    """Markers and log copies must never stop the trainer; retried once, then reported."""
    for attempt in range(2):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            if attempt:
                print(f"{getattr(fn, '__name__', fn)} failed: {e}", file=sys.stderr)
            time.sleep(1)


def _copy_log(log: str, remote: str | None, copied: int) -> int:
    size = os.path.getsize(log)
    if remote and size != copied:
        try:
            with open(log, "rb") as f:
                storage.write_bytes(remote, f.read())
        except Exception as e:  # noqa: BLE001 - a log copy must never stop the trainer
            print(f"could not copy the log to {remote}: {e}", file=sys.stderr)
            return copied
    return size


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitpod.podworker")
    parser.add_argument("verb", choices=("start", "stop", "supervise"))
    parser.add_argument("--workdir", default="")
    parser.add_argument("--log", default=protocol.LOG)
    parser.add_argument("--pidfile", default=protocol.PIDFILE)
    parser.add_argument("--grace", type=float, default=60,
                        help="seconds a stopped trainer gets to save before SIGKILL")
    parser.add_argument("--sync_seconds", type=float, default=30)
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.command = command
    if args.verb == "stop":
        print(f"worker {os.environ.get(protocol.WORKER_ENV, '?')}: "
              f"{stop(args.pidfile, args.grace)}")
        return 0
    if not args.command or not args.workdir:
        parser.error(f"{args.verb} needs --workdir and a command after --")
    if args.verb == "start":
        start(args)
        return 0
    return supervise(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
