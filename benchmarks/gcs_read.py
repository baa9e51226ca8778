"""gs:// through a real GCS server on loopback (fake-gcs-server) against local disk.

    python benchmarks/gcs_read.py [--workers=0] [--objects=50000] [--classes=100]
        [--data_dir=... --image_size=224 --batch_size=64]  (input_pipeline.py's flags)

1. Input pipeline: images/s of vitpod's train pipeline reading photo-sized JPEGs from the
   emulator versus the same files on local disk (same process, same shapes).
2. Manifest build: seconds to scan an ImageFolder of `--objects` objects in `--classes`
   class folders in the bucket (class folders listed in parallel), against one sequential
   paged listing of the same prefix (what a plain `list_blobs` walk costs).

Prints one JSON line. The emulator runs on this machine, so this measures client overhead and
request concurrency, not network latency: against real GCS, per-object latency is higher and
the parallelism matters more.
"""

import json
import os
import shutil
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.input_pipeline import make_photos, vitpod_pipeline  # noqa: E402
from testkit import gcs as gcs_emulator  # noqa: E402

# --data_dir, --image_size, --batch_size, --batches, --warmup, --workers: input_pipeline's.
flags.DEFINE_integer("objects", 50000, "Objects in the manifest benchmark.")
flags.DEFINE_integer("classes", 100, "Class folders in the manifest benchmark.")
FLAGS = flags.FLAGS


def main(argv) -> None:
    if not os.path.isdir(FLAGS.data_dir):
        make_photos(FLAGS.data_dir, FLAGS.generate)
    root = tempfile.mkdtemp(prefix="vitpod-bench-gcs-")
    emulator = gcs_emulator.Emulator(root=root)
    os.environ.update(emulator.env(direct=True))  # not through the tests' fault proxy
    try:
        from vitpod import storage, upload
        from vitpod.data import imagefolder

        emulator.create_bucket("bench-photos")
        upload.upload_tree(FLAGS.data_dir, "gs://bench-photos/photos")
        shape = (FLAGS.image_size, FLAGS.batch_size, FLAGS.batches, FLAGS.workers, FLAGS.warmup)
        local = vitpod_pipeline(imagefolder.scan(FLAGS.data_dir), *shape)["img_per_sec"]
        remote = vitpod_pipeline(imagefolder.scan("gs://bench-photos/photos"),
                                 *shape)["img_per_sec"]

        emulator.create_bucket("bench-many")
        started = time.perf_counter()
        storage.parallel_map(
            lambda i: storage.write_bytes(
                f"gs://bench-many/many/class{i % FLAGS.classes:03d}/{i:07d}.jpg", b"x"),
            range(FLAGS.objects), threads=32)
        upload_seconds = time.perf_counter() - started
        started = time.perf_counter()
        split = imagefolder.scan("gs://bench-many/many")
        scan_seconds = time.perf_counter() - started
        assert len(split.files) == FLAGS.objects
        started = time.perf_counter()
        listed = storage.files_below("gs://bench-many/many")
        sequential_seconds = time.perf_counter() - started
        assert len(listed) == FLAGS.objects
    finally:
        emulator.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({
        "workers": FLAGS.workers, "image_size": FLAGS.image_size,
        "local_img_per_sec": round(local, 1), "gcs_img_per_sec": round(remote, 1),
        "gcs_over_local": round(remote / local, 2), "objects": FLAGS.objects,
        "classes": FLAGS.classes, "manifest_seconds": round(scan_seconds, 2),
        "sequential_listing_seconds": round(sequential_seconds, 2),
        "listing_speedup": round(sequential_seconds / scan_seconds, 2),
        "objects_uploaded_per_sec": round(FLAGS.objects / upload_seconds)}))


if __name__ == "__main__":
    app.run(main)
