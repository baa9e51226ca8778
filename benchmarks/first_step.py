"""Time to the first trained step (start-up + compile), with JAX's compile cache off and on.

    python benchmarks/first_step.py [--variant=S/16 --image_size=224]

What a relaunch after preemption costs before it trains again. Runs `python -m vitpod.train`
on the digits for 1 of 2 steps (`--stop_after=1`), copies the workdir, then relaunches each
copy and times it until its first step is logged (start-up, restore, compile, one step; not
the final save and exit): one copy without its compile cache and with
`--config.compile_cache=False` (baseline), one with vitpod's default, JAX's persistent cache
in WORKDIR/compile_cache, which the first launch filled. Prints one JSON line.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

flags.DEFINE_string("variant", "mu/4", "Model variant.")
flags.DEFINE_integer("image_size", 16, "")
FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_command(data: str, workdir: str, cache: bool) -> list[str]:
    return [sys.executable, "-m", "vitpod.train", "--config=configs/demo.py",
            f"--workdir={workdir}", f"--config.data.train_dir={data}/train",
            "--config.data.val_dir=", "--config.total_steps=2", "--config.optim.warmup_steps=0",
            f"--config.model.variant={FLAGS.variant}", f"--config.compile_cache={cache}",
            f"--config.data.image_size={FLAGS.image_size}", "--config.batch_size=8"]


def relaunch(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    first_step = None
    for line in proc.stderr:  # the progress line of step 2 marks the first trained step
        if first_step is None and "step 2/2" in line:
            first_step = time.perf_counter() - start
    if proc.wait() or first_step is None:
        raise SystemExit(f"relaunch failed: {' '.join(cmd)}")
    return first_step


def main(argv) -> None:
    sys.path.insert(0, ROOT)
    from vitpod import prepare

    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    with tempfile.TemporaryDirectory() as tmp:
        data, warm, cold = (os.path.join(tmp, d) for d in ("digits", "warm", "cold"))
        prepare.digits(data)
        subprocess.run(train_command(data, warm, True) + ["--stop_after=1"], cwd=ROOT, env=env,
                       check=True, capture_output=True)
        shutil.copytree(warm, cold, ignore=shutil.ignore_patterns("compile_cache"))
        cold = relaunch(train_command(data, cold, False), env)
        warm = relaunch(train_command(data, warm, True), env)
    print(json.dumps({"impl": "vitpod train, relaunch to first step", "variant": FLAGS.variant,
                      "image_size": FLAGS.image_size, "seconds_without_cache": round(cold, 2),
                      "seconds_with_cache": round(warm, 2), "speedup": round(cold / warm, 2)}))


if __name__ == "__main__":
    app.run(main)
