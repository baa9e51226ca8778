#!/usr/bin/env python3
"""Cloud TPU slices for vitpod: create (queued resources), set up, launch, watch, delete.

    python deploy/pod.py {create|setup|launch|status|logs|ssh|delete|run}

Settings come from deploy/pod.env (or $POD_ENV), overridden by environment variables of the
same names (make passes `make pod-run TPU_TYPE=v4-32` through). DRY_RUN=1 prints every
command instead of running it. Commands run without a local shell; the one string a worker's
shell runs (`ssh --command`) is built from shlex-quoted parts, so no value can inject code.
Standard library only: this runs on any machine with Python 3.11 and gcloud.
"""

import datetime
import glob
import os
import shlex
import subprocess
import sys
import time

KEYS = ("PROJECT", "ZONE", "NAME", "TPU_TYPE", "RUNTIME_VERSION", "CAPACITY", "WORKDIR",
        "CONFIG", "TRAIN_FLAGS", "WAIT_TIMEOUT", "POLL_SECONDS", "MAX_RETRIES", "WORKER",
        "WHEEL")
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
            "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
CAPACITY_FLAGS = {"spot": ["--spot"], "reserved": ["--reserved"], "on-demand": []}
WAITING = ("ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "CREATING")
LOST = ("FAILED", "SUSPENDING", "SUSPENDED")
VENV, LOG, CONFIGS = "vitpod-venv", "vitpod.log", "vitpod-configs"


class PodError(Exception):
    """A problem to report in one line."""


def load_settings(path: str, env: dict) -> dict:
    settings = {"WORKER": "0"}
    if os.path.exists(path):
        for line in open(path):
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                settings[key.strip()] = value.strip()
    settings.update({k: env[k] for k in KEYS if k in env})
    if settings.get("CAPACITY", "spot") not in CAPACITY_FLAGS:
        raise PodError(f"CAPACITY={settings['CAPACITY']!r}: use one of {', '.join(CAPACITY_FLAGS)}")
    if not settings.get("RUNTIME_VERSION"):
        generation = settings.get("TPU_TYPE", "").rsplit("-", 1)[0]
        if generation not in RUNTIMES:
            raise PodError(f"TPU_TYPE={settings.get('TPU_TYPE')!r}: set RUNTIME_VERSION too "
                           f"(defaults exist for {', '.join(RUNTIMES)})")
        settings["RUNTIME_VERSION"] = RUNTIMES[generation]
    return settings


class Pod:
    def __init__(self, settings: dict, dry_run: bool = False, sleep=time.sleep):
        self.s, self.dry_run, self.sleep = settings, dry_run, sleep

    def need(self, *keys: str) -> None:
        missing = [k for k in keys if not self.s.get(k)]
        if missing:
            raise PodError(f"set {', '.join(missing)} in deploy/pod.env or on the command line")

    def log(self, message: str) -> None:
        print(f"[pod {datetime.datetime.now():%H:%M:%S}] {message}", flush=True)

    def gcloud(self, *args: str, retries: int = 1, quiet: bool = False):
        """Run gcloud; returns (exit code, stdout). Retries transient failures."""
        cmd = ["gcloud", *args]
        if self.dry_run:
            print(shlex.join(cmd), flush=True)
            return 0, ""
        for attempt in range(1, retries + 1):
            result = subprocess.run(cmd, capture_output=quiet, text=True)
            if result.returncode == 0 or attempt == retries:
                return result.returncode, result.stdout or ""
            self.log(f"gcloud {args[2] if len(args) > 2 else args[0]} failed "
                     f"(attempt {attempt}/{retries}); retrying")
            self.sleep(min(30, 2 ** attempt))
        raise AssertionError("unreachable")

    def _where(self) -> list[str]:
        return [f"--project={self.s['PROJECT']}", f"--zone={self.s['ZONE']}"]

    def _qr(self, verb: str, *args: str) -> list[str]:
        return ["compute", "tpus", "queued-resources", verb, self.s["NAME"], *args, *self._where()]

    def _vm(self, verb: str, *args: str) -> list[str]:
        return ["compute", "tpus", "tpu-vm", verb, *args, *self._where()]

    def state(self) -> str | None:
        """The queued resource's state, or None when there is none."""
        code, out = self.gcloud(*self._qr("describe", "--format=value(state.state)"), quiet=True)
        return out.strip() or None if code == 0 else None

    def create(self) -> None:
        self.need("PROJECT", "ZONE", "NAME", "TPU_TYPE")
        state = self.state()
        while state == "DELETING":  # the previous slice is still going away
            self.sleep(float(self.s.get("POLL_SECONDS", 60)))
            state = self.state()
        if state == "ACTIVE":
            self.log(f"{self.s['NAME']} is already ACTIVE: reusing it")
            return
        if state in LOST:
            raise PodError(f"{self.s['NAME']} exists in state {state}; make pod-delete first")
        if state is None:
            self.log(f"creating {self.s['NAME']}: {self.s['TPU_TYPE']}, {self.s['CAPACITY']}")
            code, _ = self.gcloud(*self._qr(
                "create", f"--node-id={self.s['NAME']}",
                f"--accelerator-type={self.s['TPU_TYPE']}",
                f"--runtime-version={self.s['RUNTIME_VERSION']}",
                *CAPACITY_FLAGS[self.s["CAPACITY"]]))
            if code:
                raise PodError(f"creating {self.s['NAME']} failed (gcloud exit {code}); see above")
        self.wait_active()

    def wait_active(self) -> None:
        if self.dry_run:
            return
        deadline = time.monotonic() + float(self.s.get("WAIT_TIMEOUT", 7200))
        last = None
        while True:
            state = self.state()
            if state != last:
                self.log(f"{self.s['NAME']}: {state}")
                last = state
            if state == "ACTIVE":
                return
            if state in LOST or state is None:
                raise PodError(f"{self.s['NAME']} became {state} while waiting for capacity; "
                               "make pod-delete, then retry (or another zone / capacity)")
            if time.monotonic() > deadline:
                raise PodError(f"{self.s['NAME']} still {state} after {self.s['WAIT_TIMEOUT']} s "
                               "(no capacity yet); raise WAIT_TIMEOUT or try another zone")
            self.sleep(float(self.s.get("POLL_SECONDS", 60)))

    def ssh_all(self, command: str, retries: int = 3) -> None:
        code, _ = self.gcloud(*self._vm("ssh", self.s["NAME"], "--worker=all",
                                        f"--command={command}"), retries=retries)
        if code:
            raise PodError(f"a command on the workers failed (gcloud exit {code}); see above")

    def scp_all(self, source: str, target: str, *flags: str) -> None:
        code, _ = self.gcloud(*self._vm("scp", *flags, source, f"{self.s['NAME']}:{target}",
                                        "--worker=all"), retries=3)
        if code:
            raise PodError(f"copying {source} to the workers failed after 3 attempts")

    def setup(self) -> None:
        self.need("PROJECT", "ZONE", "NAME")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        dist = os.path.join(root, "dist")
        build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", dist, root]
        if self.s.get("WHEEL"):  # a wheel built before: install it as it is
            wheel = self.s["WHEEL"]
        elif self.dry_run:
            print(shlex.join(build))
            wheel = os.path.join(dist, "vitpod-VERSION-py3-none-any.whl")
        else:
            subprocess.run(build, check=True)
            wheel = max(glob.glob(os.path.join(dist, "vitpod-*.whl")), key=os.path.getmtime)
        self.scp_all(wheel, "~/")
        name = os.path.basename(wheel)
        self.ssh_all(f"python3 -m venv {VENV} && {VENV}/bin/pip install --quiet --upgrade pip "
                     f"&& {VENV}/bin/pip install --quiet --force-reinstall "
                     f"{shlex.quote(name + '[tpu]')}")

    def launch(self) -> None:
        self.need("PROJECT", "ZONE", "NAME", "WORKDIR", "CONFIG")
        config_file, _, arg = self.s["CONFIG"].partition(":")
        self.ssh_all(f"mkdir -p {CONFIGS}")
        self.scp_all(config_file, f"~/{CONFIGS}/")
        remote_config = f"{CONFIGS}/{os.path.basename(config_file)}" + (f":{arg}" if arg else "")
        train = [f"{VENV}/bin/python", "-m", "vitpod.train", f"--config={remote_config}",
                 f"--workdir={self.s['WORKDIR']}", *shlex.split(self.s.get("TRAIN_FLAGS", ""))]
        stop_stale = ("(pkill -f 'vitpod[.]train' || true); sleep 3; "
                      "(sudo fuser -k /dev/accel* /dev/vfio/[0-9]* 2>/dev/null || true); "
                      "sudo rm -f /tmp/libtpu_lockfile")
        self.ssh_all(f"cd ~ && {stop_stale}; nohup {shlex.join(train)} > {LOG} 2>&1 "
                     "< /dev/null &")
        self.log(f"launched on every worker; follow with: make pod-logs (WORKER=n), "
                 f"or gcloud compute tpus tpu-vm ssh {shlex.quote(self.s['NAME'])} --worker=0 "
                 f"{shlex.join(self._where())} --command='tail -f ~/{LOG}'")

    def status(self) -> None:
        self.gcloud(*self._qr("describe"))

    def logs(self) -> None:
        self.gcloud(*self._vm("ssh", self.s["NAME"], f"--worker={self.s['WORKER']}",
                              f"--command=tail -n 200 -f ~/{LOG}"))

    def ssh(self) -> None:
        self.gcloud(*self._vm("ssh", self.s["NAME"], f"--worker={self.s['WORKER']}"))

    def delete(self) -> None:
        self.log(f"deleting {self.s['NAME']} (queued resource and its node)")
        self.gcloud(*self._qr("delete", "--force", "--quiet"))

    def done(self) -> bool:
        code, _ = self.gcloud("storage", "ls", f"{self.s['WORKDIR'].rstrip('/')}/DONE",
                              quiet=True)
        return code == 0

    def preempted(self) -> str:
        """Why the slice is gone ('' while it runs)."""
        state = self.state()
        if state != "ACTIVE":
            return f"queued resource {state}"
        code, out = self.gcloud(*self._vm("describe", self.s["NAME"], "--format=value(state)"),
                                quiet=True)
        return f"node {out.strip()}" if code == 0 and out.strip() == "PREEMPTED" else ""

    def run(self) -> None:
        """Create, set up, launch, watch; recreate on preemption; delete when DONE."""
        self.need("PROJECT", "ZONE", "NAME", "TPU_TYPE", "WORKDIR", "CONFIG")
        retries = int(self.s.get("MAX_RETRIES", 20))
        for attempt in range(retries + 1):
            self.create()
            self.setup()
            self.launch()
            if self.dry_run:
                return
            while True:
                if self.done():
                    self.log(f"{self.s['WORKDIR']}/DONE exists: training finished")
                    self.delete()
                    return
                lost = self.preempted()
                if lost:
                    self.log(f"preempted ({lost}); recreating, attempt {attempt + 1}/{retries}")
                    self.delete()
                    break
                self.sleep(float(self.s.get("POLL_SECONDS", 60)))
        raise PodError(f"gave up after {retries} recreations (MAX_RETRIES); the workdir keeps "
                       "the progress: make pod-run again to continue")


def main(argv: list[str]) -> int:
    verbs = ("create", "setup", "launch", "status", "logs", "ssh", "delete", "run")
    if len(argv) != 2 or argv[1] not in verbs:
        print(f"usage: {argv[0]} {{{'|'.join(verbs)}}}", file=sys.stderr)
        return 2
    try:
        path = os.environ.get("POD_ENV", os.path.join(os.path.dirname(__file__), "pod.env"))
        pod = Pod(load_settings(path, dict(os.environ)), os.environ.get("DRY_RUN") == "1")
        getattr(pod, argv[1])()
    except PodError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
