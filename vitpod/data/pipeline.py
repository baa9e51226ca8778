"""Step-indexed, host-sharded grain pipelines and their assembly into global jax.Arrays.

The global batch of step s is a pure function of (manifest, seed, s): a seeded permutation
per epoch, batches cut in order, augmentation seeded by the global example position. Each
host reads only the rows of each global batch that its devices hold (vitpod/mesh.py
`host_rows`: one block on CPU, interleaved runs on a multi-host TPU slice), so resuming needs
only the step, and another host count, slice count or device order sees the same batches.
"""

import dataclasses
import math
import os
from concurrent.futures import ThreadPoolExecutor

import grain
import jax
import numpy as np
from absl import logging

from vitpod import storage
from vitpod.data import order, packed, transforms
from vitpod.data.imagefolder import Split


def read_example(split: Split, index: int, run: int = 1) -> bytes:
    """Example `index`'s file bytes, from its file or its packed record (reading `run` records
    ahead). A file gone since the scan reads as empty (skipped like a corrupt one). Other
    storage errors, after the retries, stop the run rather than change its data."""
    if not split.shards:
        try:
            return storage.read_bytes(split.path(index))
        except storage.NotFound:
            return b""
    reader = packed.reader_for(split.root, split.shards, split.shard_records, split.record_bytes,
                               len(split.files))
    _, relative_path, data = packed.decode(
        reader.record(int(order.pack_position(len(split.files))[index]), run))
    if relative_path != split.files[index]:
        raise RuntimeError(f"{split.root}: record of {split.files[index]} holds "
                           f"{relative_path}; the shards do not match {packed.INDEX}")
    return data


def _example(image: np.ndarray | None, label: int, index: int, size: int) -> dict:
    valid = image is not None
    return {
        "image": image if valid else np.zeros((size, size, 3), np.uint8),
        "label": np.int32(label),
        "valid": np.float32(valid),
        "index": np.int32(index),
    }


class _Decoded:
    """The one decode path of train and eval examples: file bytes -> an example, through the
    subclass's `transform`; padding (index -1) and unreadable bytes give valid=0."""

    split: Split
    size: int
    max_pixels: int

    def transform(self, img, rng: np.random.Generator | None) -> np.ndarray:
        raise NotImplementedError

    def decode(self, index: int, data: bytes, rng: np.random.Generator | None = None) -> dict:
        if index < 0:
            return _example(None, 0, -1, self.size)
        try:
            image = self.transform(transforms.open_image(data, self.max_pixels), rng)
        except Exception:  # noqa: BLE001  corrupt/truncated/empty/too large: reported by the host
            image = None
        return _example(image, self.split.labels[index], index, self.size)


@dataclasses.dataclass(frozen=True)
class TrainExample(_Decoded):
    """Position -> (manifest index, its augmented example); an unreadable file gives valid=0
    (the same each time)."""

    split: Split
    order: grain.MapDataset  # position -> manifest index (the epochs' shuffle)
    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    hflip: bool
    randaug: tuple[int, float] = (0, 0)  # (num_ops, magnitude); 0 ops: off
    reduced: bool = False  # JPEG DCT scaling (data.reduced_decode)
    run: int = 1  # packed records read at once (data.shuffle_block with the blocks order)
    # (an ImageFolder reads one file per example whatever `run` says)
    max_pixels: int = transforms.MAX_PIXELS  # data.max_image_pixels: larger images are skipped

    def index(self, position: int) -> int:
        return int(self.order[position])

    def transform(self, img, rng: np.random.Generator) -> np.ndarray:
        return transforms.train_transform(img, self.size, self.scale, self.ratio, self.hflip,
                                          rng, self.randaug, self.reduced)


@dataclasses.dataclass(frozen=True)
class EvalExample(_Decoded):
    """Position -> (manifest index, eval example); positions past the split are padding
    (index -1, valid=0). Packed splits are read in pack order (a run of records per request);
    sums do not care."""

    split: Split
    size: int
    crop_pct: float
    reduced: bool = False
    interpolation: str = "bilinear"  # data.eval_interpolation
    run: int = 32  # packed records per request in evaluation
    max_pixels: int = transforms.MAX_PIXELS

    def index(self, position: int) -> int:
        if position >= len(self.split.files):
            return -1
        if self.split.shards:
            return int(order.pack_order(len(self.split.files))[position])
        return position

    def transform(self, img, rng=None) -> np.ndarray:
        return transforms.eval_transform(img, self.size, self.crop_pct, self.reduced,
                                         self.interpolation)


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def read_all(split: Split, indices: list[int], run: int, threads: int) -> list[bytes]:
    """The bytes of a host batch's examples (-1: padding, none). ImageFolder files are fetched
    `threads` at a time (a pool per process): one GET per file at tens of ms, in series,
    would make a 256-image batch wait seconds. Packed runs are read in order: a run already
    serves its neighbours, and concurrent misses of one run would each fetch it."""
    def one(i: int) -> bytes:
        return b"" if i < 0 else read_example(split, i, run)

    if split.shards or threads <= 1:
        return [one(i) for i in indices]
    key = (os.getpid(), threads)  # pools do not survive a fork
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix="vitpod-fetch")
    return list(_POOLS[key].map(one, indices))


@dataclasses.dataclass(frozen=True)
class HostBatch:
    """Step -> this host's rows of the global batch: positions s*B + r for each row r of
    `rows` (ascending [start, stop) runs), their bytes read together (read_all), then decoded
    in order. Example p gets the generator grain's `random_map(fn, seed)` gives element p
    (Philox(seed) at counter [0, 0, 0, p]), so the rows equal those of
    `random_map(...).batch(B)` bit for bit (tested)."""

    example: TrainExample | EvalExample
    global_batch: int
    rows: tuple[tuple[int, int], ...]
    fetch_threads: int
    seed: int | None = None  # None: no augmentation randomness (eval)

    def __call__(self, step: int) -> dict:
        first = int(step) * self.global_batch
        positions = [first + r for start, stop in self.rows for r in range(start, stop)]
        indices = [self.example.index(p) for p in positions]
        datas = read_all(self.example.split, indices, self.example.run, self.fetch_threads)
        rows = [self.example.decode(i, d, None if self.seed is None else np.random.Generator(
            np.random.Philox(self.seed, counter=[0, 0, 0, p])))
            for i, d, p in zip(indices, datas, positions, strict=True)]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def decode_workers(num_workers: int, cpus: int | None = None,
                   local_devices: int | None = None) -> int:
    """data.num_workers, with -1 sized to this host: its CPUs less 2 (the training loop and
    grain's read threads), at most 16 per local device; 0 on a 2-core laptop (decoding then
    runs on grain's in-process threads)."""
    if num_workers >= 0:
        return num_workers
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    local_devices = jax.local_device_count() if local_devices is None else local_devices
    return max(0, min(cpus - 2, 16 * local_devices))


def _iterate(ds: grain.MapDataset, num_workers: int, read_threads: int):
    # Each read thread builds one whole host batch, so the threads bound how many batches
    # are read at once, and grain's read-ahead buffer (500 elements by default) how many are
    # held: 500 host batches per decode process would be tens of GB at ImageNet sizes, so
    # the buffer holds what the threads work on.
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                              prefetch_buffer_size=read_threads))
    num_workers = decode_workers(num_workers)
    if num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(it)


def train_batches(split: Split, data_cfg, seed: int, global_batch: int, start_step: int,
                  total_steps: int, rows: tuple[tuple[int, int], ...] | None = None):
    """Iterator over this host's `rows` of the global batches (default: all) for steps
    start_step..total-1."""
    n = len(split.files)
    epochs = math.ceil(total_steps * global_batch / n) + 1
    run = 1
    if data_cfg.shuffle == "blocks":
        run = data_cfg.shuffle_block
        positions = grain.MapDataset.range(n * epochs).map(
            order.BlockOrder(n, seed, run, data_cfg.shuffle_window))
    else:
        positions = grain.MapDataset.range(n).shuffle(seed=seed).repeat(epochs)
    example = TrainExample(split, positions, data_cfg.image_size, tuple(data_cfg.crop_scale),
                           tuple(data_cfg.crop_ratio), data_cfg.hflip,
                           (data_cfg.randaug_num_ops, data_cfg.randaug_magnitude),
                           data_cfg.reduced_decode, run, data_cfg.max_image_pixels)
    batch = HostBatch(example, global_batch, rows or ((0, global_batch),),
                      data_cfg.fetch_threads, seed)
    ds = grain.MapDataset.range(total_steps)[start_step:].map(batch)
    return _iterate(ds, data_cfg.num_workers, data_cfg.read_threads)


def eval_batches(split: Split, data_cfg, global_batch: int,
                 rows: tuple[tuple[int, int], ...] | None = None):
    """Every example once, padded to whole global batches (padding has valid=0); this host's
    `rows` (default: all) of each."""
    example = EvalExample(split, data_cfg.image_size, data_cfg.eval_crop_pct,
                          data_cfg.reduced_decode, data_cfg.eval_interpolation,
                          max_pixels=data_cfg.max_image_pixels)
    batch = HostBatch(example, global_batch, rows or ((0, global_batch),),
                      data_cfg.fetch_threads)
    ds = grain.MapDataset.range(math.ceil(len(split.files) / global_batch)).map(batch)
    return _iterate(ds, data_cfg.num_workers, data_cfg.read_threads)


def to_global(host_batch: dict, sharding: jax.sharding.Sharding, global_batch: int) -> dict:
    """This host's rows (ascending, whatever runs they form) -> global jax.Arrays sharded
    along the batch axis; JAX places each of the host's shards by the rank of its start."""
    return {k: jax.make_array_from_process_local_data(sharding, v, (global_batch, *v.shape[1:]))
            for k, v in host_batch.items() if k != "index"}


class SkipWarner:
    """Warns once per unreadable file, by name (the step counts skips over all hosts)."""

    def __init__(self, split: Split):
        self.split = split
        self.warned: set[int] = set()

    def __call__(self, host_batch: dict) -> None:
        bad = host_batch["index"][(host_batch["valid"] == 0) & (host_batch["index"] >= 0)]
        for i in map(int, bad):
            if i not in self.warned:
                self.warned.add(i)
                path = self.split.path(i)
                if not self.split.shards and not storage.exists(path):
                    logging.warning("skipped missing image %s (deleted or moved since the data "
                                    "was scanned into the manifest)", path)
                    continue
                logging.warning("skipped unreadable image %s (corrupt, truncated, empty, or over "
                                "data.max_image_pixels)", path)
