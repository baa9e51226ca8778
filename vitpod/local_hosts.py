"""Run N local processes of `vitpod.train` as one multi-host job, on fake CPU devices.

    python -m vitpod.local_hosts --num_processes=2 --devices_per_process=4 -- \
        --config=configs/demo.py --workdir=runs/demo2x4

Each process gets its own D fake devices and joins a coordinator on a free loopback port.
With `--topology=v4:2x2x2` (and MEGASCALE_NUM_SLICES for several slices) the processes build
their mesh in the order that TPU type's chips have (libtpu's description, computed once here:
vitpod/device_order.py), so each host's rows of the batch interleave as they would there.
Logs are streamed with a `[pI]` prefix. If a process fails, or the others hang on after one
has exited, the rest are stopped and the launcher exits non-zero with the failing process's
last lines. SIGTERM or Ctrl-C to the launcher is forwarded to every process.
"""

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import flags

from vitpod import cli, device_order, protocol
from vitpod.errors import UserError


def define_flags() -> None:
    """This entrypoint's flags (defined only when run, so entrypoints import each other)."""
    flags.DEFINE_integer("num_processes", 2, "Processes to start.")
    flags.DEFINE_integer("devices_per_process", 4, "Fake CPU devices per process.")
    flags.DEFINE_float("timeout", 0, "Stop everything after this many seconds (0: none).")
    flags.DEFINE_float("straggler_timeout", 120, "After one process exits, stop the others if "
                       "they have not finished within this many seconds.")
    flags.DEFINE_string("module", "vitpod.train", "The entrypoint each process runs.")
    flags.DEFINE_string("topology", "", "Rehearse this TPU topology's device order (e.g. "
                        "v4:2x2x2, a v4-16: 2 processes x 4 devices); empty: process order.")


_TAIL = 20


def free_port() -> int:
    """A free TCP port on loopback, for a local coordinator (also the tests' and sims')."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """N child processes, their prefixed log streams and the last lines of each."""

    def __init__(self, module: str, args: list[str], num_processes: int, devices: int,
                 device_order: str = ""):
        port = free_port()
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
               + os.environ.get("XLA_FLAGS_EXTRA", "")}
        if device_order:
            env[protocol.DEVICE_ORDER_ENV] = device_order
        self.tails = [collections.deque(maxlen=_TAIL) for _ in range(num_processes)]
        self.procs, self.threads = [], []
        for i in range(num_processes):
            cmd = [sys.executable, "-m", module, *args, f"--coordinator_address=127.0.0.1:{port}",
                   f"--num_processes={num_processes}", f"--process_id={i}"]
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1)
            print(f"[launch] process {i}: pid {proc.pid}", flush=True)
            self.procs.append(proc)
            thread = threading.Thread(target=self._stream, args=(i, proc), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _stream(self, i: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.tails[i].append(line.rstrip())
            print(f"[p{i}] {line}", end="", flush=True)

    def signal_all(self, sig: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(sig)

    def stop(self, grace: float = 10) -> None:
        """SIGTERM (a chance to save), then SIGKILL whatever is left after `grace` seconds."""
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
        for proc in self.procs:
            proc.wait()
        for thread in self.threads:
            thread.join(timeout=5)

    def wait(self, timeout: float, straggler_timeout: float) -> int:
        """0 when all exit 0; else the first failure's code (or 124 for a hang), others stopped."""
        start, first_exit = time.monotonic(), None
        while True:
            codes = [p.poll() for p in self.procs]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                self.stop()
                return self._report(failed[0], f"exited with code {codes[failed[0]]}",
                                    codes[failed[0]])
            if all(c == 0 for c in codes):
                for thread in self.threads:
                    thread.join(timeout=5)
                return 0
            now = time.monotonic()
            if first_exit is None and any(c == 0 for c in codes):
                first_exit = now
            if first_exit is not None and now - first_exit > straggler_timeout:
                hung = codes.index(None)
                self.stop()
                return self._report(hung, f"still running {straggler_timeout:.0f} s after "
                                    "another process finished", 124)
            if timeout and now - start > timeout:
                self.stop()
                return self._report(codes.index(None), f"timed out after {timeout:.0f} s", 124)
            time.sleep(0.2)

    def _report(self, i: int, what: str, code: int) -> int:
        lines = "\n".join(f"  [p{i}] {line}" for line in self.tails[i])
        print(f"[launch] process {i} {what}; stopped the others. Its last lines:\n{lines}",
              file=sys.stderr, flush=True)
        return code or 1


def rehearsed_order(topology: str, processes: int, devices: int) -> str:
    """The device order of `topology` (times MEGASCALE_NUM_SLICES) for the job's processes;
    a UserError when its hosts and chips are not the job's processes and devices."""
    if not topology:
        return ""
    slices = int(os.environ.get(protocol.NUM_SLICES_ENV) or 1)
    order = device_order.computed(topology, slices)
    hosts, per_host = json.loads(order)["hosts"], json.loads(order)["devices_per_host"]
    if (hosts, per_host) != (processes, devices):
        raise UserError(f"--topology={topology} x {slices} slice(s) has {hosts} hosts of "
                        f"{per_host} chips; pass --num_processes={hosts} "
                        f"--devices_per_process={per_host}")
    print(f"[launch] device order of {slices} x {topology}: hosts interleave as on its chips",
          flush=True)
    return order


def main(argv: list[str]) -> None:
    args = argv[1:]
    if not args:
        raise UserError("pass the train flags after --, e.g. -- --config=configs/demo.py "
                        "--workdir=runs/x")
    for name in ("num_processes", "devices_per_process"):
        if flags.FLAGS[name].value < 1:
            raise UserError(f"--{name}={flags.FLAGS[name].value} must be >= 1")
    f = flags.FLAGS
    job = Job(f.module, args, f.num_processes, f.devices_per_process,
              rehearsed_order(f.topology, f.num_processes, f.devices_per_process))

    def forward(signum, _frame):
        print(f"[launch] got signal {signum}; forwarding to every process", flush=True)
        job.signal_all(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    sys.exit(job.wait(flags.FLAGS.timeout, flags.FLAGS.straggler_timeout))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
