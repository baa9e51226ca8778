"""Train-step throughput and MFU of vitpod's shard_map step, against this CPU's matmul peak.

    python benchmarks/train_step.py --variant=S/16 --image_size=224 --num_classes=1000 \
        --global_batch=16 --devices=8

Prints one JSON line: img_per_sec, flops_per_sec (model FLOPs: XLA's count for the step
with its layers unrolled, as `plan` counts them), matmul_peak_flops_per_sec (the best of a
large f32 matmul measured in the same run, before and after the steps) and mfu, their ratio;
also the minor page faults per step (fresh memory the step touches) and whether the blocks
ran as one scan or unrolled (`--scan_layers`).
--devices sets the fake CPU device count (all of them share this machine's cores).
"""

import json
import os
import resource
import sys
import time

from absl import app, flags

flags.DEFINE_string("variant", "S/16", "The model, as model.variant spells it (S/16, "
                    "w192-d12-h3-m768/16).")
flags.DEFINE_integer("image_size", 224, "")
flags.DEFINE_integer("num_classes", 1000, "")
flags.DEFINE_integer("global_batch", 16, "")
flags.DEFINE_integer("devices", 1, "Fake CPU devices (set before jax starts).")
flags.DEFINE_integer("steps", 5, "Timed steps after the compile and one warm-up step.")
flags.DEFINE_float("flops_per_step", 0, "Model FLOPs of one global step when known (from an "
                   "earlier run at this shape): skips counting them.")
flags.DEFINE_enum("scan_layers", "auto", ["auto", "true", "false"],
                  "Blocks as one lax.scan or unrolled; auto: vitpod's default (scan only with "
                  "FSDP or remat, so unrolled here).")
FLAGS = flags.FLAGS


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """Best f32 FLOP/s of an n x n matmul on the first device, the roofline for this CPU."""
    import jax
    import jax.numpy as jnp

    a = jax.device_put(jnp.ones((n, n), jnp.float32), jax.devices()[0])
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def main(argv) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={FLAGS.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.conftest import load_config
    from vitpod import model, optim, steps
    from vitpod.planning.compile import step_flops

    shape = model.parse_variant(FLAGS.variant)
    config = load_config("tiny", model__variant=FLAGS.variant,
                         data__image_size=FLAGS.image_size,
                         model__scan_layers={"true": True, "false": False}.get(FLAGS.scan_layers))
    mesh = jax.make_mesh((FLAGS.devices, 1), ("data", "fsdp"))
    tx = optim.make(config.optim, 100)
    state = steps.state_initializer(config, FLAGS.num_classes, tx, mesh)(None)
    graphdef, _ = model.abstract_model(config.model, FLAGS.image_size, FLAGS.num_classes)
    train_step = steps.make_train_step(graphdef, tx, mesh, config)
    rng = np.random.default_rng(0)
    size, b = FLAGS.image_size, FLAGS.global_batch
    batch = {"image": rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8),
             "label": rng.integers(0, FLAGS.num_classes, b).astype(np.int32),
             "valid": np.ones(b, np.float32)}
    batch = {k: jax.device_put(v, steps.batch_sharding(mesh)) for k, v in batch.items()}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=x.sharding), batch)
    flops = FLAGS.flops_per_step or step_flops(config, tx, mesh, FLAGS.num_classes,
                                               abstract) * FLAGS.devices
    peak = matmul_peak()
    state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
        state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / FLAGS.steps
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / FLAGS.steps
    peak = max(peak, matmul_peak())
    print(json.dumps({
        "impl": "vitpod shard_map step", "devices": FLAGS.devices, "global_batch": b,
        "image_size": size, "variant": FLAGS.variant, "patch_size": shape.patch_size,
        "hidden_size": shape.hidden_size, "num_layers": shape.num_layers,
        "scan_layers": FLAGS.scan_layers,
        "page_faults_per_step": round(faults), "step_seconds": round(seconds, 4),
        "img_per_sec": round(b / seconds, 2), "flops_per_step": flops,
        "flops_per_sec": round(flops / seconds), "matmul_peak_flops_per_sec": round(peak),
        "mfu": round(flops / seconds / peak, 3)}))


if __name__ == "__main__":
    app.run(main)
