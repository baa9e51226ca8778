"""Time to the first trained step (start-up + compile), with JAX's compile cache off and on.

    python benchmarks/first_step.py [--variant=S/16 --image_size=224]

Runs `python -m vitpod.train` for one step on the digits three times in fresh workdirs:
without a cache (baseline), then twice with JAX_COMPILATION_CACHE_DIR set (the second run
reads what the first wrote, as a relaunch after preemption would). Prints one JSON line.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

flags.DEFINE_string("variant", "mu/4", "Model variant.")
flags.DEFINE_integer("image_size", 16, "")
FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_step(data: str, workdir: str, cache: str | None) -> float:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    cmd = [sys.executable, "-m", "vitpod.train", "--config=configs/demo.py",
           f"--workdir={workdir}", f"--config.data.train_dir={data}/train",
           "--config.data.val_dir=", "--config.total_steps=1", "--config.optim.warmup_steps=0",
           f"--config.model.variant={FLAGS.variant}",
           f"--config.data.image_size={FLAGS.image_size}", "--config.batch_size=8"]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main(argv) -> None:
    sys.path.insert(0, ROOT)
    from vitpod import prepare

    with tempfile.TemporaryDirectory() as tmp:
        prepare.digits(os.path.join(tmp, "digits"))
        data, cache = os.path.join(tmp, "digits"), os.path.join(tmp, "cache")
        cold = one_step(data, os.path.join(tmp, "cold"), None)
        one_step(data, os.path.join(tmp, "fill"), cache)
        warm = one_step(data, os.path.join(tmp, "warm"), cache)
    print(json.dumps({"impl": "vitpod train, one step", "variant": FLAGS.variant,
                      "image_size": FLAGS.image_size, "seconds_without_cache": round(cold, 2),
                      "seconds_with_cache": round(warm, 2), "speedup": round(cold / warm, 2)}))


if __name__ == "__main__":
    app.run(main)
