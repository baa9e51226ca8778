"""CPU milliseconds per image of decode + augmentation, vitpod's pipeline against a plain PIL
loop doing the same work at full size (the baseline, run alongside).

    python benchmarks/decode_cpu.py --kind=camera --mode=train   # 1,600-3,000 px JPEGs

CPU time, not wall time: `time.process_time()` of this process, whose grain pipeline decodes
on its read threads (num_workers=0), so the figure is what a host spends per image whatever
its core count. Prints one JSON line.
"""

import io
import json
import os
import sys
import tempfile
import time

import numpy as np
from absl import app, flags
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vitpod import config as config_lib  # noqa: E402
from vitpod.data import pipeline, transforms  # noqa: E402
from vitpod.data.imagefolder import scan_splits  # noqa: E402
from vitpod.planning.input_budget import representative_jpegs  # noqa: E402

flags.DEFINE_enum("kind", "camera", ["camera", "photo"], "camera: 1,600-3,000 px sides; photo: "
                  "300-500 px.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "train: random resized crop and flip; "
                  "eval: resize and centre crop.")
flags.DEFINE_integer("images", 48, "Images to decode (each a distinct file).")
flags.DEFINE_integer("size", 224, "Output size.")
FLAGS = flags.FLAGS
MEAN = STD = np.float32(0.5)


def baseline(files: list[str], mode: str, size: int) -> float:
    """A plain single-process loop: full decode, the same geometry, flip, normalisation."""
    rng = np.random.default_rng(0)
    start = time.process_time()
    for path in files:
        with open(path, "rb") as f:
            img = Image.open(io.BytesIO(f.read())).convert("RGB")
        if mode == "train":
            box = transforms.random_resized_crop_box(img.width, img.height, (0.08, 1.0),
                                                     (3 / 4, 4 / 3), rng)
            out = img.resize((size, size), Image.BILINEAR, box=box)
            if rng.random() < 0.5:
                out = out.transpose(Image.FLIP_LEFT_RIGHT)
            arr = np.asarray(out)
        else:
            arr = transforms.eval_transform(img, size, 0.875)
        _ = (arr.astype(np.float32) / 255 - MEAN) / STD
    return (time.process_time() - start) * 1000 / len(files)


def entropy_floor(files: list[str]) -> float:
    """A decode at 1/8 scale and nothing else: what any DCT-scaled decode costs at least, since
    the entropy decoding of every coefficient does not shrink with the scale."""
    start = time.process_time()
    for path in files:
        with open(path, "rb") as f:
            img = Image.open(io.BytesIO(f.read()))
        img.draft(img.mode, (img.width // 8, img.height // 8))
        img.load()
    return (time.process_time() - start) * 1000 / len(files)


def vitpod(root: str, mode: str, size: int, reduced: bool, count: int) -> float:
    cfg = config_lib.defaults().data
    cfg.image_size, cfg.num_workers, cfg.reduced_decode = size, 0, reduced
    split = scan_splits(root, "")["train"]
    start = time.process_time()
    if mode == "train":
        batches = pipeline.train_batches(split, cfg, 0, 8, 0, count // 8)
    else:
        batches = pipeline.eval_batches(split, cfg, 8)
    seen = 0
    for batch in batches:
        _ = (batch["image"].astype(np.float32) / 255 - MEAN) / STD  # as the step does
        seen += len(batch["image"])
    return (time.process_time() - start) * 1000 / seen


def main(_) -> None:
    with tempfile.TemporaryDirectory() as root:
        lo, hi = (1600, 3000) if FLAGS.kind == "camera" else (300, 500)
        representative_jpegs(root, FLAGS.images, lo, hi)
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
        base = baseline(files, FLAGS.mode, FLAGS.size)
        floor = entropy_floor(files)
        full = vitpod(root, FLAGS.mode, FLAGS.size, False, FLAGS.images)
        reduced = vitpod(root, FLAGS.mode, FLAGS.size, True, FLAGS.images)
    print(json.dumps({"kind": FLAGS.kind, "mode": FLAGS.mode, "images": FLAGS.images,
                      "baseline_cpu_ms": round(base, 2), "full_decode_cpu_ms": round(full, 2),
                      "reduced_cpu_ms": round(reduced, 2), "floor_cpu_ms": round(floor, 2),
                      "floor_vs_baseline": round(floor / base, 3),
                      "reduced_vs_baseline": round(reduced / base, 3),
                      "reduced_vs_full": round(reduced / full, 3)}))


if __name__ == "__main__":
    app.run(main)
