"""Eval throughput: the sharded evaluation (training's, and the evaluate command's) against a
host-side loop.

    python benchmarks/eval_throughput.py [--variant=Ti/16 --image_size=224 --devices=8]

Both evaluate the same params on the same ImageFolder of photo-sized JPEGs (made by
input_pipeline.py's generator) with the same grain eval pipeline: `evaluation.eval_split`
runs the `shard_map` eval step over all devices and sums on the device; the baseline is a
host-side loop (one device, logits copied to the host, sums in numpy). Each is timed on its
second pass (the first compiles). Prints one JSON line.
"""

import json
import os
import sys
import time

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.input_pipeline import make_photos  # noqa: E402

# --data_dir, --generate, --image_size, --batch_size, --workers: input_pipeline's flags.
flags.DEFINE_string("variant", "Ti/16", "Model variant.")
flags.DEFINE_integer("devices", 8, "Fake CPU devices (set before jax starts).")
FLAGS = flags.FLAGS


def timed(fn) -> tuple[float, dict]:
    fn()  # compile, and fill the OS file cache
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def host_loop(classifier, split, data_cfg, batch_size: int) -> dict:
    """The baseline: logits to the host, accuracy and top-5 summed in numpy."""
    from vitpod.data import pipeline

    correct = top5 = count = 0
    for batch in pipeline.eval_batches(split, data_cfg, batch_size):
        keep = batch["valid"] == 1
        logits, labels = classifier.logits(batch["image"])[keep], batch["label"][keep]
        correct += int((logits.argmax(-1) == labels).sum())
        top5 += int(((logits > logits[np.arange(len(labels)), labels][:, None]).sum(-1) < 5).sum())
        count += len(labels)
    return {"accuracy": correct / max(count, 1), "top5_accuracy": top5 / max(count, 1),
            "count": count}


def main(argv) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={FLAGS.devices}"
    if not os.path.isdir(FLAGS.data_dir):
        make_photos(FLAGS.data_dir, FLAGS.generate)
    import jax

    from vitpod import config, evaluation, inference, model, optim, steps
    from vitpod import mesh as mesh_lib
    from vitpod.data import imagefolder

    cfg = config.defaults()
    cfg.model.variant, cfg.data.image_size = FLAGS.variant, FLAGS.image_size
    cfg.data.num_workers, cfg.data.eval_batch_size = FLAGS.workers, FLAGS.batch_size
    split = imagefolder.scan(FLAGS.data_dir, "val")
    classes = len(split.classes)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    state = steps.state_initializer(cfg, classes, optim.make(cfg.optim, 10), mesh)(None)
    graphdef, _ = model.abstract_model(cfg.model, cfg.data.image_size, classes)
    eval_step = steps.make_eval_step(graphdef, mesh, cfg.data)
    sharded, out = timed(lambda: evaluation.eval_split(eval_step, state["params"], split,
                                                       cfg.data, FLAGS.batch_size, mesh))
    params = jax.device_put(jax.device_get(state["params"]), jax.devices()[0])
    classifier = inference.Classifier(cfg.model, cfg.data, split.classes, params, "bench")
    host, base = timed(lambda: host_loop(classifier, split, cfg.data, FLAGS.batch_size))
    assert out["count"] == base["count"] == len(split.files)
    n = len(split.files)
    print(json.dumps({"variant": FLAGS.variant, "image_size": FLAGS.image_size,
                      "devices": FLAGS.devices, "images": n,
                      "sharded_img_per_sec": round(n / sharded, 1),
                      "host_loop_img_per_sec": round(n / host, 1),
                      "speedup": round(host / sharded, 2),
                      "same_accuracy": abs(out["accuracy"] - base["accuracy"]) < 1e-6}))


if __name__ == "__main__":
    app.run(main)
