#!/usr/bin/env python3
"""Cloud TPU slices for vitpod: create (queued resources), set up, check, launch, watch, delete.

    python deploy/pod.py {create|setup|check|launch|watch|status|logs|ssh|delete|run}

Settings come from deploy/pod.env (or $POD_ENV), overridden by environment variables of the
same names (make passes `make pod-run TPU_TYPE=v4-32` through). DRY_RUN=1 prints every
command instead of running it. Commands run without a local shell; the strings a worker's
shell runs (`ssh --command`) are built from shlex-quoted parts, so no value can inject code.
Every per-worker call runs for each worker in parallel, with retries, and names the workers
that failed. Standard library only: this runs on any machine with Python 3.11 and gcloud.
"""

import glob
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

from gcloud_cli import PodError, StateUnreadable, for_each_worker, last_line, log
from pod_watch import LOG, VENV, WatchedSlice
from tpu_slice import HERE, load_settings, slice_devices

CONFIGS = "vitpod-configs"  # in each worker's home


class Pod(WatchedSlice):
    """A slice and the run on it: per-worker set-up, launch, watch, the preemption loop."""

    # --- per-worker work -----------------------------------------------------------------
    def on_workers(self, what: str, call, workers: int | None = None) -> dict[int, object]:
        """call(i) -> (code, out, err) on every worker; PodError naming each that failed."""
        n = workers or (1 if self.dry_run else self.workers())
        results = for_each_worker(n, call)
        failed = {i: r for i, r in results.items() if isinstance(r, Exception) or r[0]}
        for i, r in sorted(failed.items()):
            why = str(r) if isinstance(r, Exception) else last_line(r[2] or r[1]) or f"exit {r[0]}"
            log(f"worker {i}: {what} failed: {why}")
        if failed:
            raise PodError(f"{what} failed on worker(s) {', '.join(map(str, sorted(failed)))} "
                           "(reasons above)")
        return results

    def scp(self, i: int, target: str, *sources: str):
        return self.g.call(*self._vm("scp", *sources, f"{self.s['NAME']}:{target}",
                                     f"--worker={i}"), retries=int(self.num("SSH_RETRIES")),
                           prefix=f"[w{i}] ")

    def _env(self, **extra: str) -> str:
        pairs = {k: self.s.get(k, "") for k in ("PYTHON_VERSION", "UV_VERSION", "PLATFORM",
                                                 "PYPI_MIRROR", "PYTHON_MIRROR")}
        return " ".join(f"{k}={shlex.quote(str(v))}" for k, v in {**pairs, **extra}.items())

    def setup(self) -> None:
        """uv, a uv-managed Python and the wheel with pinned deps on every worker; then check."""
        self.need("PROJECT", "ZONE", "NAME")
        wheel = self._wheel()
        files = {wheel: os.path.basename(wheel),
                 os.path.join(HERE, "constraints.txt"): "vitpod-constraints.txt",
                 os.path.join(HERE, "worker.sh"): "vitpod-worker.sh",
                 os.path.join(HERE, "worker_check.py"): "vitpod-check.py"}
        staged = os.path.join(os.path.dirname(wheel), "worker-files")
        os.makedirs(staged, exist_ok=True)
        for src, name in files.items():  # scp keeps names: stage the files as workers see them
            if not self.dry_run:
                with open(src, "rb") as f, open(os.path.join(staged, name), "wb") as g:
                    g.write(f.read())
        sources = [os.path.join(staged, name) for name in files.values()]
        log(f"setting up every worker: uv {self.s['UV_VERSION']}, Python "
            f"{self.s['PYTHON_VERSION']}, {os.path.basename(wheel)}[tpu] with "
            "deploy/constraints.txt")
        n = 1 if self.dry_run else self.workers()
        self.on_workers("copying the wheel", lambda i: self.scp(i, "~/", *sources), n)
        command = (f"{self._env()} bash vitpod-worker.sh setup "
                   f"{shlex.quote(os.path.basename(wheel))}")
        self.on_workers("setup", lambda i: self.ssh(i, command), n)
        self.check(n)

    def _wheel(self) -> str:
        if self.s.get("WHEEL"):  # a wheel built before: install it as it is
            return self.s["WHEEL"]
        root, dist = os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "dist")
        build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", dist, root]
        if self.dry_run:
            print(shlex.join(build))
            return os.path.join(dist, "vitpod-VERSION-py3-none-any.whl")
        subprocess.run(build, check=True)
        return max(glob.glob(os.path.join(dist, "vitpod-*.whl")), key=os.path.getmtime)

    def check(self, workers: int | None = None) -> None:
        """Every worker: its Python, `import vitpod`, the devices JAX sees against the slice."""
        self.need("PROJECT", "ZONE", "NAME", "TPU_TYPE")
        n = workers or (1 if self.dry_run else self.workers())
        devices = slice_devices(self.s["TPU_TYPE"])
        local = devices // n if devices and devices % n == 0 else 0
        command = (f"cd ~ && if [ ! -f vitpod-worker.sh ]; then echo 'FAILED: vitpod was never "
                   "set up here: run make pod-setup'; exit 1; fi; "
                   f"{self._env(LOCAL_DEVICES=str(local))} bash vitpod-worker.sh check")
        self.on_workers("pod-check", lambda i: self.ssh(i, command, retries=2), n)
        log(f"pod-check: all {n} worker(s) ok" + (f", {local} {self.s['PLATFORM']} devices "
                                                  "each" if local else ""))

    def launch(self, timeline: dict | None = None) -> None:
        """Start the trainer on every worker, then wait until all report ready. `timeline`
        (from `run`: when the slice was asked for, ACTIVE, set up) goes to the workdir."""
        self.need("PROJECT", "ZONE", "NAME", "WORKDIR", "CONFIG", "TPU_TYPE")
        n = 1 if self.dry_run else self.workers()
        config_file, _, arg = self.s["CONFIG"].partition(":")
        self.on_workers("copying the config",
                        lambda i: self.scp(i, f"~/{CONFIGS}/", config_file), n)
        remote_config = f"{CONFIGS}/{os.path.basename(config_file)}" + (f":{arg}" if arg else "")
        devices = slice_devices(self.s["TPU_TYPE"])
        train = [f"{VENV}/bin/python", "-m", "vitpod.train", f"--config={remote_config}",
                 f"--workdir={self.s['WORKDIR']}", f"--expect_platform={self.s['PLATFORM']}",
                 *([f"--expect_devices={devices}"] if devices else []),
                 *shlex.split(self.s.get("TRAIN_FLAGS", ""))]
        self.launch_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        log(f"launch {self.launch_id} on {n} worker(s): {shlex.join(train)}")

        def start(i: int):
            # JAX_PLATFORMS makes JAX fail instead of falling back to the CPU.
            env = (f"JAX_PLATFORMS={shlex.quote(self.s['PLATFORM'])} "
                   f"VITPOD_LAUNCH_ID={self.launch_id} VITPOD_WORKER={i} "
                   f"VITPOD_TPU_TYPE={shlex.quote(self.s['TPU_TYPE'])}")
            return self.ssh(i, f"cd ~ && {env} {VENV}/bin/python -m vitpod.podworker start "
                            f"--workdir={shlex.quote(self.s['WORKDIR'])} "
                            f"--sync_seconds={shlex.quote(self.s['LOG_SYNC_SECONDS'])} -- "
                            f"{shlex.join(train)}")

        if timeline is not None:
            self.write_timeline({**timeline, "launched": time.time()})
        try:
            self.on_workers("starting the trainer", start, n)
            if not self.dry_run:
                self.wait_ready(n)
        except PodError:
            self.stop_workers(n)
            raise
        log(f"follow with: make pod-logs WORKER=all; logs also go to "
            f"{self.s['WORKDIR']}/logs/{self.launch_id}/")

    def preflight(self) -> None:
        """The config against every slice type's device count (vitpod.preflight, in the local
        venv) before a slice is created: a fallback that cannot run it would be billed to fail."""
        root = os.path.dirname(HERE)
        python = os.path.join(root, ".venv", "bin", "python")
        counts = [(t, slice_devices(t)) for t, _ in self.types]
        if not os.path.exists(python) or not all(n for _, n in counts):
            log("config not checked against the slice types (no .venv here: make install; or "
                "a type whose device count is unknown)")
            return
        flags = [f for f in shlex.split(self.s.get("TRAIN_FLAGS", "")) if f.startswith("--config.")]
        check = [python, "-m", "vitpod.preflight", f"--config={self.s['CONFIG']}",
                 "--slices=" + ",".join(f"{t}={n}" for t, n in counts), *flags]
        done = subprocess.run(check, capture_output=True, text=True, timeout=300)
        for line in done.stdout.splitlines():
            log(f"preflight: {line}")
        if done.returncode:
            why = last_line(done.stderr).removeprefix("error: ") or f"exit {done.returncode}"
            raise PodError(f"preflight: {why} (nothing created)")

    def run(self) -> None:
        """Create, set up, launch, watch; replace a lost slice and resume; delete when DONE."""
        self.need("PROJECT", "ZONE", "NAME", "TPU_TYPE", "WORKDIR", "CONFIG")
        self.preflight()
        retries, lost = int(self.num("MAX_RETRIES")), 0
        while True:
            asked = time.time()
            new = self.create()
            active = time.time()
            if new:  # a new slice: its workers are bare
                self.setup()
            self.launch({"slice": self.s["TPU_TYPE"], "asked": asked, "active": active,
                         "set_up": time.time(), "new_slice": new})
            if self.dry_run:
                return
            try:
                outcome = self.watch()
            except StateUnreadable:
                raise  # the slice may be fine: leave it, and say so
            except PodError as crash:
                log(f"the run crashed: {crash}")
                log("deleting the slice (logs stay in the workdir)")
                self.delete()
                raise
            if outcome == "done":
                log(f"{self.s['WORKDIR']}/DONE exists: training finished "
                    f"({lost} relaunch(es))")
                self.wait_exited()
                self.report()
                self.delete()
                return
            lost += 1
            if lost > retries:
                raise PodError(f"gave up after {retries} relaunches (MAX_RETRIES); the "
                               "workdir keeps the progress: make pod-run again to continue")
            if outcome == "stopped":
                log(f"relaunching on the same slice ({lost}/{retries})")
            else:
                log(f"slice lost ({outcome}); replacing it ({lost}/{retries})")
                self.delete()

    def write_timeline(self, timeline: dict) -> None:
        """WORKDIR/launches/LAUNCH/pod.json: how long this launch waited for its slice and its
        set-up, which the trainers cannot see (vitpod.workdir.goodput splits the gap with it)."""
        url = f"{self.s['WORKDIR'].rstrip('/')}/launches/{self.launch_id}/pod.json"
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(timeline, f)
        try:
            code, _, err = self.g.call("storage", "cp", f.name, url, retries=2, timeout=120)
        finally:
            os.remove(f.name)
        if code:
            log(f"warning: could not write {url} ({last_line(err) or code}); the report will "
                "not split the time between launches")

    def report(self) -> None:
        """The run's goodput (python -m vitpod.report), computed on worker 0."""
        price = self.s.get("PRICE_PER_CHIP_HOUR", "")
        self.ssh(0, f"cd ~ && {VENV}/bin/python -m vitpod.report "
                    f"--workdir={shlex.quote(self.s['WORKDIR'])}"
                    + (f" --price_per_chip_hour={shlex.quote(price)}" if price else ""),
                 retries=2)

    # --- for people -----------------------------------------------------------------------
    def status(self) -> None:
        state, message = self.qr_state()
        print(f"{self.s['NAME']}: {state}" + (f" ({message})" if message else ""))

    def logs(self) -> None:
        if self.s["WORKER"] == "all":
            for_each_worker(self.workers(), lambda i: self.ssh(i, f"tail -n 50 ~/{LOG}",
                                                                retries=2))
        else:
            self.ssh(int(self.s["WORKER"]), f"tail -n 200 -f ~/{LOG}", retries=1)

    def shell(self) -> None:
        subprocess.run(["gcloud", *self._vm("ssh", self.s["NAME"],
                                            f"--worker={self.s['WORKER']}")])


def main(argv: list[str]) -> int:
    verbs = {"create": "create", "setup": "setup", "check": "check", "launch": "launch",
             "watch": "watch", "status": "status", "logs": "logs", "ssh": "shell",
             "delete": "delete", "run": "run"}
    if len(argv) != 2 or argv[1] not in verbs:
        print(f"usage: {argv[0]} {{{'|'.join(verbs)}}}", file=sys.stderr)
        return 2
    try:
        path = os.environ.get("POD_ENV", os.path.join(HERE, "pod.env"))
        pod = Pod(load_settings(path, dict(os.environ)), os.environ.get("DRY_RUN") == "1")
        outcome = getattr(pod, verbs[argv[1]])()
        if argv[1] == "watch":
            log(f"watch: {outcome}")
    except PodError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError, KeyError, subprocess.CalledProcessError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
