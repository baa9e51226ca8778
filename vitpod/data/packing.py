"""Pack an ImageFolder into ArrayRecord shards (the format: vitpod/data/packed.py).

    python -m vitpod.prepare pack --src=data/train --dst=gs://BUCKET/train-packed

Shards hold about --shard_mb each, records in the pack order, every file's bytes unchanged
(corrupt and empty ones too: training skips them exactly as it does in the ImageFolder).
Shards are written in parallel, locally (a gs:// destination gets each shard uploaded as it
is done), and DST/packing.json records the plan first: a rerun of an interrupted pack keeps
the shards already written, and a destination holding anything else is refused.
packed.json, written last, marks the dataset complete.
"""

import glob
import json
import os
import shutil
import sys
import tempfile
import threading

from absl import logging
from array_record.python import array_record_module

from vitpod import storage
from vitpod.data import imagefolder, order, packed, pipeline
from vitpod.errors import UserError

PLAN = packed.PLAN


def _plan(split: imagefolder.Split, shard_mb: float) -> dict:
    sample = range(0, len(split.files), max(1, len(split.files) // 64))[:64]
    mean = max(1, sum(len(pipeline.read_example(split, i)) for i in sample) // len(sample))
    run = packed.RUN
    records = max(run, round(shard_mb * 2**20 / mean / run) * run)
    count = -(-len(split.files) // records)
    counts = {name: split.labels.count(label) for label, name in enumerate(split.classes)}
    return {"format": packed.FORMAT, "classes": list(split.classes), "counts": counts,
            "files": list(split.files), "labels": list(split.labels),
            "shard_records": records, "run_records": run, "record_bytes": mean,
            "shards": [f"shard-{k:05d}-of-{count:05d}.arrayrecord" for k in range(count)]}


def _check_destination(dst: str, plan: dict) -> tuple[list[str], bool]:
    """(shards already there for this plan, whether packed.json marks it complete); UserError
    if dst holds anything else."""
    for name in (packed.INDEX, PLAN):
        path = storage.join(dst, name)
        if storage.exists(path):
            # a pack whose index lacks run_records was cut in runs of the same length
            there = {"run_records": packed.RUN,
                     **storage.read_json(path, "delete it and rerun the pack")}
            if {k: there.get(k) for k in plan} != plan:
                raise UserError(f"{dst} holds another packed dataset ({len(there['files'])} "
                                f"images, see {path}); choose another --dst or delete it")
            if name == packed.INDEX:
                return list(plan["shards"]), True
    present = storage.files_below(dst) if storage.isdir(dst) else []
    foreign = [f for f in present if f not in plan["shards"] and f != PLAN
               and not f.endswith(".tmp")]
    if foreign:
        raise UserError(f"{dst} is not empty (it holds {foreign[0]}, ...) and is no packed "
                        "dataset of this source; choose an empty or new --dst")
    if not storage.is_gcs(dst):
        os.makedirs(dst, exist_ok=True)
    return [f for f in present if f in plan["shards"]], False


def _whole(dst: str, plan: dict, present: list[str], threads: int) -> list[str]:
    """The shards of `present` that hold all their records; the others are named once (a
    copy or upload cut short keeps its name) and written again."""
    names, n = plan["shards"], len(plan["files"])
    expected = {name: packed.shard_size(k, len(names), plan["shard_records"], n)
                for k, name in enumerate(names)}
    counts = storage.parallel_map(lambda f: packed.count_records(storage.join(dst, f)),
                                  present, threads)
    short = [f"{f} ({c} of {expected[f]})" for f, c in zip(present, counts, strict=True)
             if c != expected[f]]
    if short:
        logging.warning("%s: %d shard(s) cut short, written again: %s", dst, len(short),
                        ", ".join(short[:5]))
    return [f for f, c in zip(present, counts, strict=True) if c == expected[f]]


_TMP_PREFIX = "vitpod-pack-"


def _remove_leftovers() -> None:
    """Temporary folders of packs killed outright (SIGKILL runs no cleanup), by dead pid."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{_TMP_PREFIX}*-*")):
        pid = os.path.basename(path)[len(_TMP_PREFIX):].split("-")[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(path, ignore_errors=True)


def _write_shard(split, plan: dict, k: int, dst: str, progress) -> None:
    records = plan["shard_records"]
    positions = order.pack_order(len(split.files))[k * records:(k + 1) * records]
    gcs = storage.is_gcs(dst)
    local_dir = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{os.getpid()}-") if gcs else dst
    final = os.path.join(local_dir, plan["shards"][k])
    try:
        writer = array_record_module.ArrayRecordWriter(final + ".tmp", "group_size:1")
        for i in map(int, positions):
            writer.write(packed.encode(split.labels[i], split.files[i],
                                       pipeline.read_example(split, i)))
            progress(1)
        writer.close()
        os.replace(final + ".tmp", final)  # a shard under its own name is whole
        if gcs:
            storage.upload_file(final, storage.join(dst, plan["shards"][k]))
    finally:  # whatever stopped it: no temporary left behind
        if gcs:
            shutil.rmtree(local_dir, ignore_errors=True)
        elif os.path.exists(final + ".tmp"):
            os.remove(final + ".tmp")


def pack(src: str, dst: str, shard_mb: float = 128, threads: int = 8) -> dict[str, int]:
    """Pack the ImageFolder `src` into `dst` (see the module doc); returns counts."""
    if packed.is_packed(src):
        raise UserError(f"{src} is already a packed dataset; --src takes an ImageFolder")
    if not storage.isdir(src):
        raise UserError(f"--src={src} does not exist or is not a directory; pass an "
                        "ImageFolder (one folder per class)")
    _remove_leftovers()
    split = imagefolder.scan(src, "train")
    plan = _plan(split, shard_mb)
    present, complete = _check_destination(dst, plan)
    done = _whole(dst, plan, present, threads)
    if complete and len(done) == len(plan["shards"]):
        return {"images": len(split.files), "shards": len(done), "already there": len(done)}
    storage.write_text(storage.join(dst, PLAN), json.dumps(plan))
    todo = [k for k, name in enumerate(plan["shards"]) if name not in done]
    total = sum(min(plan["shard_records"], len(split.files) - k * plan["shard_records"])
                for k in todo)
    bar = _progress(total)
    storage.parallel_map(lambda k: _write_shard(split, plan, k, dst, bar), todo, threads)
    storage.write_text(storage.join(dst, packed.INDEX), json.dumps(plan))
    logging.info("packed %s into %s: %d images, %d shards", src, dst, len(split.files),
                 len(plan["shards"]))
    return {"images": len(split.files), "shards": len(plan["shards"]),
            "already there": len(done)}


def _progress(total: int):
    """A progress bar on a terminal (tqdm), thread-safe; silent otherwise."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit="img", desc="pack", disable=not sys.stderr.isatty())
    lock = threading.Lock()

    def update(count: int) -> None:
        with lock:
            bar.update(count)
            if bar.n >= total:
                bar.close()

    return update
