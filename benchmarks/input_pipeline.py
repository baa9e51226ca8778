"""Input pipeline throughput: vitpod's grain pipeline against a plain single-process PIL loop.

grain reads ahead with a thread pool even in-process (workers=0): PIL releases the GIL while
decoding, so threads already use several cores; workers add processes on top.

    python benchmarks/input_pipeline.py --data_dir=/tmp/photos --image_size=224 \
        --batch_size=64 --workers=2 [--generate=600] [--baseline]

Prints one JSON line. Both do the same work per image: read the file, decode the JPEG, random
resized crop + flip to image_size; the baseline also normalises to float32 on the host (as a
plain loader does), vitpod ships uint8 and normalises on the device inside the step.
"""

import json
import math
import os
import time

import numpy as np
from absl import app, flags
from PIL import Image

flags.DEFINE_string("data_dir", "/tmp/vitpod-bench-photos", "ImageFolder (made if missing).")
flags.DEFINE_integer("generate", 600, "Photo-sized JPEGs to write when data_dir is missing.")
flags.DEFINE_integer("image_size", 224, "Output size.")
flags.DEFINE_integer("batch_size", 64, "Images per batch.")
flags.DEFINE_integer("workers", 2, "grain worker processes (0: in-process).")
flags.DEFINE_integer("batches", 100, "Batches to time, after --warmup batches.")
flags.DEFINE_integer("warmup", 20, "Batches before timing: grain's read-ahead buffer (500 "
                     "images) fills at start-up, so steady state comes after it.")
flags.DEFINE_bool("baseline", False, "Time the plain PIL loop instead, with phase shares.")
FLAGS = flags.FLAGS


def make_photos(root: str, count: int, classes: int = 4, seed: int = 0) -> None:
    """JPEGs of 300-500 px sides with smooth colour fields and noise, like small photos."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = rng.integers(300, 501, 2)
        yy, xx = np.mgrid[0:h, 0:w]
        base = rng.uniform(0, 255, 3)
        img = (base + 60 * np.sin(xx[..., None] / rng.uniform(10, 60) + rng.uniform(0, 6, 3))
               + 60 * np.cos(yy[..., None] / rng.uniform(10, 60)) + rng.normal(0, 12, (h, w, 3)))
        folder = os.path.join(root, f"class{i % classes}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
            os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def baseline(split, size: int, batch: int, batches: int) -> dict:
    """A plain loop: read, decode, crop+resize, flip, normalise, stack; timed per phase."""
    from vitpod.data import transforms

    rng, phases = np.random.default_rng(0), {"read+decode": 0.0, "crop+resize+flip": 0.0,
                                             "normalise+batch": 0.0}
    order = np.concatenate([rng.permutation(len(split.files))
                            for _ in range(math.ceil(batches * batch / len(split.files)))])
    n = 0
    start = time.perf_counter()
    for b in range(batches):
        images = []
        for i in order[b * batch:(b + 1) * batch]:
            t0 = time.perf_counter()
            with open(split.path(int(i)), "rb") as f:
                img = transforms.decode_rgb(f.read())
            t1 = time.perf_counter()
            arr = transforms.train_transform(img, size, (0.08, 1), (3 / 4, 4 / 3), True, rng)
            t2 = time.perf_counter()
            images.append(arr)
            phases["read+decode"] += t1 - t0
            phases["crop+resize+flip"] += t2 - t1
        t3 = time.perf_counter()
        np.stack([(a / 255.0 - 0.5) / 0.5 for a in images]).astype(np.float32)
        phases["normalise+batch"] += time.perf_counter() - t3
        n += len(images)
    total = time.perf_counter() - start
    return {"img_per_sec": n / total,
            "time_share": {k: round(v / total, 3) for k, v in phases.items()}}


def vitpod_pipeline(split, size: int, batch: int, batches: int, workers: int,
                    warmup: int) -> dict:
    from vitpod import config
    from vitpod.data import pipeline

    cfg = config.defaults().data
    cfg.image_size, cfg.crop_scale, cfg.hflip, cfg.num_workers = size, (0.08, 1.0), True, workers
    it = pipeline.train_batches(split, cfg, seed=0, global_batch=batch, start_step=0,
                                total_steps=warmup + batches)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    n = sum(len(next(it)["label"]) for _ in range(batches))
    return {"img_per_sec": n / (time.perf_counter() - start)}


def main(argv) -> None:
    from vitpod.data import imagefolder

    if not os.path.isdir(FLAGS.data_dir):
        make_photos(FLAGS.data_dir, FLAGS.generate)
    split = imagefolder.scan(FLAGS.data_dir)
    batches = FLAGS.batches
    shape = {"image_size": FLAGS.image_size, "batch_size": FLAGS.batch_size, "batches": batches}
    if FLAGS.baseline:
        result = {"impl": "plain PIL loop", **shape, **baseline(split, FLAGS.image_size,
                                                                 FLAGS.batch_size, batches)}
    else:
        result = {"impl": "vitpod grain", "workers": FLAGS.workers, **shape,
                  **vitpod_pipeline(split, FLAGS.image_size, FLAGS.batch_size, batches,
                                    FLAGS.workers, FLAGS.warmup)}
    result["img_per_sec"] = round(result["img_per_sec"], 1)
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
