"""What a slice needs from its hosts' input pipelines, for `plan`: images per second per host
at the MFUs `plan` assumes, reads per second from the bucket, and the decode cores that takes.

The CPU cost per image is measured on the spot, on this machine: process CPU time (all of
grain's threads) of the config's own train pipeline over a sample of its `train_dir` when
that is reachable, else over representative photo-sized JPEGs. The host that runs `plan` is
not a TPU host: the figure says which machine measured it.
"""

import math
import os
import platform
import tempfile
import time

import numpy as np
from PIL import Image

from vitpod import storage
from vitpod.data import imagefolder, packed, pipeline

# A fresh bucket serves about this many object reads per second before it ramps up
# (https://cloud.google.com/storage/docs/request-rate).
BUCKET_READS_PER_SEC = 5000
# vCPUs of TPU VM hosts where Google documents them, by (generation, chips per host).
HOST_CPUS = {("v5e", 1): 24, ("v5e", 4): 112, ("v5e", 8): 224}
HOST_RAM_GB = {("v5e", 1): 48, ("v5e", 4): 192, ("v5e", 8): 384}  # same doc


def input_memory_gib(data_cfg, host_batch: int, local_devices: int, cpus: int | None) -> tuple:
    """(decode workers, GiB of decoded images they hold): each worker keeps up to
    data.read_threads host batches in flight plus one handed over, uint8 at image_size.
    Workers sized to the host (-1) assume the cap of 16 per device when its CPUs are unknown."""
    workers = pipeline.decode_workers(data_cfg.num_workers, cpus or 10**6, local_devices)
    batch_bytes = host_batch * data_cfg.image_size ** 2 * 3
    return workers, max(workers, 1) * (data_cfg.read_threads + 1) * batch_bytes / 2**30


def representative_jpegs(root: str, count: int, lo: int = 300, hi: int = 500,
                         seed: int = 0) -> None:
    """Photo-like JPEGs (gradients, texture, sensor noise; ~2 bits/pixel at quality 90), sides
    between lo and hi pixels, in two class folders under root."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([128 + 100 * np.sin(x / (37 + 9 * c) + y / (53 + c)) for c in range(3)],
                        -1)
        small = rng.normal(0, 25, (h // 16 + 1, w // 16 + 1, 3)).astype(np.float32)
        texture = np.kron(small, np.ones((16, 16, 1), np.float32))[:h, :w]
        pixels = np.clip(base + texture + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
        os.makedirs(os.path.join(root, f"c{i % 2}"), exist_ok=True)
        Image.fromarray(pixels).save(os.path.join(root, f"c{i % 2}", f"{i:03d}.jpg"), quality=90)


def _sample_split(train_dir: str, images: int) -> imagefolder.Split | None:
    """Up to `images` files of the first classes of train_dir (a packed one whole: the caller
    reads `images` of it), or None if it is unreachable (listing a whole ImageNet bucket
    would take longer than the measurement)."""
    try:
        if packed.is_packed(train_dir):  # whole (the pack order needs its size): read a few
            return imagefolder.scan(train_dir)
        classes = storage.subdirs(train_dir)[:4]
        files, labels = [], []
        for label, name in enumerate(classes):
            found = [f for f in storage.files_below(storage.join(train_dir, name))
                     if f.lower().endswith(imagefolder.IMG_EXTENSIONS)][:images // len(classes) + 1]
            files += [f"{name}/{f}" for f in found]
            labels += [label] * len(found)
    except Exception:  # noqa: BLE001 - unreachable or not an ImageFolder: use stand-ins
        return None
    if len(files) < 8:
        return None
    return imagefolder.Split(train_dir, tuple(classes), tuple(files[:images]),
                             tuple(labels[:images]))


def cpu_ms_per_image(data_cfg, images: int = 48) -> tuple[float, str]:
    """(CPU ms per training image, what was measured where)."""
    with tempfile.TemporaryDirectory() as tmp:
        split = _sample_split(data_cfg.train_dir, images) if data_cfg.train_dir else None
        source = f"{min(len(split.files), images) if split else images} images of " + (
            data_cfg.train_dir)
        if split is None:
            representative_jpegs(tmp, images)
            split, source = imagefolder.scan_splits(tmp, "")["train"], (
                f"{images} representative 300-500 px JPEGs")
        cfg = data_cfg.copy_and_resolve_references()
        cfg.num_workers = 0
        batch = 8
        steps = max(1, min(len(split.files), images) // batch)
        start = time.process_time()
        for _ in pipeline.train_batches(split, cfg, 0, batch, 0, steps):
            pass
        ms = (time.process_time() - start) * 1000 / (steps * batch)
    where = f"{platform.node()} ({os.cpu_count()} CPUs), {source}"
    return ms, where


def reads_per_image(data_cfg) -> float:
    """Bucket requests per training image: a run of records per request for packed data read
    in the blocks order, else one per image."""
    try:
        runs = data_cfg.shuffle == "blocks" and packed.is_packed(data_cfg.train_dir)
    except Exception:  # noqa: BLE001 - unreachable: as an ImageFolder
        runs = False
    return 1 / data_cfg.shuffle_block if runs else 1.0


def budget(result: dict, hosts: int, generation: str, cpu_ms: float, measured: str,
           reads_per_image: float = 1.0, data_cfg=None, batch_size: int = 0) -> dict:
    """The `input` object of a plan: per-host rates at 40/60 % MFU, cores, bucket reads and,
    with the config's data keys, the host memory its decode workers hold."""
    chips_per_host = result["chips"] // max(hosts, 1)
    out = {"hosts": hosts, "cpu_ms_per_image": round(cpu_ms, 2), "measured_on": measured}
    for pct in (40, 60):
        per_chip = result.get(f"img_per_sec_per_chip_at_{pct}pct_mfu", 0)
        out[f"img_per_sec_per_host_at_{pct}pct_mfu"] = per_chip * chips_per_host
    need = out["img_per_sec_per_host_at_60pct_mfu"]
    out["workers_per_host"] = math.ceil(need * out["cpu_ms_per_image"] / 1000)
    out["reads_per_sec"] = math.ceil(need * hosts * reads_per_image)
    cpus = HOST_CPUS.get((generation, chips_per_host))
    verdict = (f"each host must decode {need} img/s at 60 % MFU: {out['workers_per_host']} "
               "cores at the measured cost")
    if cpus:
        verdict += f" of its {cpus} vCPUs" + (" (more than it has)" if out[
            "workers_per_host"] > cpus - 2 else "")
    if out["reads_per_sec"] > BUCKET_READS_PER_SEC:
        verdict += (f"; the slice makes {out['reads_per_sec']} requests/s, more than a fresh "
                    f"bucket serves (~{BUCKET_READS_PER_SEC}/s): pack the data (`python -m "
                    "vitpod.prepare pack`) and set data.shuffle=blocks (a request per "
                    "data.shuffle_block images), or let the bucket ramp up (it doubles at most "
                    "every 20 minutes)")
    if data_cfg is not None:
        workers, gib = input_memory_gib(data_cfg, batch_size // max(hosts, 1), chips_per_host,
                                        cpus)
        out["decode_workers"], out["input_memory_gib_per_host"] = workers, round(gib, 1)
        ram = HOST_RAM_GB.get((generation, chips_per_host))
        if ram and gib * 2**30 > 0.5 * ram * 1e9:
            verdict += (f"; its {workers} decode workers would hold ~{gib:.0f} GiB of decoded "
                        f"images, over half the host's {ram} GB: lower data.read_threads (each "
                        "worker holds that many host batches) or data.num_workers")
    out["verdict"] = verdict
    return out
