"""Packed shards against an ImageFolder, both in a bucket (fake-gcs-server), with and without
injected latency.

    python benchmarks/packed_read.py [--workers=0] [--read_threads=16] [--latency=30,200]
        [--data_dir=... --image_size=224 --batch_size=64 --batches=40]

The same photo-sized JPEGs are uploaded as an ImageFolder and packed (`prepare pack`), and
the train pipeline reads each with data.shuffle=blocks (the same batches for both): images/s,
pipeline CPU ms per image (process CPU time of this process and its decode workers), and at
the proxy the requests and 429s per image (and, from fresh readers, over one epoch). The
emulator and its proxy run in a child process whose CPU time is reported apart: on a 2-core
machine they compete with the pipeline, so `net` figures divide by the pipeline's share of
the CPU time.

Latency: lognormal per request (median, p99 in ms) at the proxy, as a bucket's time to first
byte. Prints one JSON line.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.input_pipeline import make_photos  # noqa: E402
from testkit import gcs as gcs_emulator  # noqa: E402

# --data_dir, --generate, --image_size, --batch_size, --batches, --workers: input_pipeline's.
flags.DEFINE_integer("read_threads", 16, "data.read_threads.")
flags.DEFINE_list("latency", ["30", "200"], "Injected latency: median,p99 in ms.")
flags.DEFINE_bool("serve", False, "(internal) run the emulator and take commands on stdin.")
FLAGS = flags.FLAGS


def serve() -> None:
    """The child: emulator + proxy; one command per stdin line, one JSON line back."""
    root = tempfile.mkdtemp(prefix="vitpod-bench-packed-")
    emulator = gcs_emulator.Emulator(root=root)
    emulator.create_bucket("bench-packed")
    print(json.dumps({"url": emulator.url, "server_pid": emulator.process.pid}), flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        if command == "latency":
            emulator.faults.reset()
            emulator.faults.latency_ms = (float(args[0]), float(args[1])) if args else None
        print(json.dumps(dict(emulator.faults.counts)), flush=True)
    emulator.stop()
    shutil.rmtree(root, ignore_errors=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process and all its threads."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_reaped = [0.0]


def _reaped_children_cpu() -> float:
    """CPU time of decode workers that have exited since the last call (grain reaps them when
    the iterator ends)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = usage.ru_utime + usage.ru_stime
    new, _reaped[0] = total - _reaped[0], total
    return new


class Server:
    def __init__(self):
        self.process = subprocess.Popen([sys.executable, __file__, "--serve"], text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        info = json.loads(self.process.stdout.readline())
        self.url, self.pids = info["url"], [self.process.pid, info["server_pid"]]

    def command(self, line: str) -> dict:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def cpu(self) -> float:
        return sum(map(cpu_seconds, self.pids))

    def stop(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)


def measure(split, server: Server, latency: list[str] | None) -> dict:
    from vitpod import config
    from vitpod.data import packed, pipeline

    cfg = config.defaults().data
    cfg.image_size, cfg.num_workers, cfg.read_threads = (FLAGS.image_size, FLAGS.workers,
                                                         FLAGS.read_threads)
    cfg.shuffle = "blocks"
    packed._readers.clear()
    server.command("latency " + " ".join(latency or []))
    # Timed from the start: grain reads ahead (hundreds of batches), so a clock started after
    # a warm-up would time its buffer, not the reads.
    cpu0, server_cpu0, start = cpu_seconds(os.getpid()), server.cpu(), time.perf_counter()
    it = pipeline.train_batches(split, cfg, seed=0, global_batch=FLAGS.batch_size, start_step=0,
                                total_steps=FLAGS.batches)
    images = sum(len(batch["label"]) for batch in it)
    seconds = time.perf_counter() - start
    cpu = cpu_seconds(os.getpid()) - cpu0 + _reaped_children_cpu()
    server_cpu = server.cpu() - server_cpu0
    counts = server.command("counts")
    share = cpu / (cpu + server_cpu)
    return {"img_per_sec": round(images / seconds, 1),
            "net_img_per_sec": round(images / seconds / share, 1),
            "cpu_ms_per_image": round(1e3 * cpu / images, 2),
            "emulator_cpu_ms_per_image": round(1e3 * server_cpu / images, 2),
            "requests_per_image": round(counts.get("read", 0) / images, 3),
            "429s": counts.get("429", 0)}


def first_epoch_requests(split, server: Server) -> float:
    """Reads per image over one epoch from fresh readers: later epochs of a data set this
    small are served from the readers' run cache, which would flatter the figure."""
    from vitpod import config
    from vitpod.data import packed, pipeline

    cfg = config.defaults().data
    cfg.image_size, cfg.num_workers, cfg.shuffle = 32, 0, "blocks"
    packed._readers.clear()
    server.command("latency")
    steps = len(split.files) // FLAGS.batch_size
    images = sum(len(b["label"]) for b in pipeline.train_batches(
        split, cfg, seed=1, global_batch=FLAGS.batch_size, start_step=0, total_steps=steps))
    return round(server.command("counts").get("read", 0) / images, 3)


def main(argv) -> None:
    if FLAGS.serve:
        return serve()
    if not os.path.isdir(FLAGS.data_dir):
        make_photos(FLAGS.data_dir, FLAGS.generate)
    server = Server()
    _reaped_children_cpu()  # the server child's, once it exits, is not the pipeline's
    os.environ.update(gcs_emulator.client_env(server.url))
    try:
        from vitpod import upload
        from vitpod.data import imagefolder, packing

        upload.upload_tree(FLAGS.data_dir, "gs://bench-packed/folder")
        packing.pack(FLAGS.data_dir, "gs://bench-packed/packed", shard_mb=8)
        splits = {"imagefolder": imagefolder.scan("gs://bench-packed/folder"),
                  "packed": imagefolder.scan("gs://bench-packed/packed")}
        result = {"workers": FLAGS.workers, "read_threads": FLAGS.read_threads,
                  "latency_ms": FLAGS.latency, "images": len(splits["packed"].files)}
        for name, split in splits.items():
            zero = measure(split, server, None)
            slow = measure(split, server, FLAGS.latency)
            result[name] = {"zero_latency": zero, "latency": slow,
                            "ratio": round(slow["img_per_sec"] / zero["img_per_sec"], 2),
                            "net_ratio": round(slow["net_img_per_sec"]
                                               / zero["net_img_per_sec"], 2),
                            "first_epoch_requests_per_image": first_epoch_requests(split, server)}
    finally:
        server.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
