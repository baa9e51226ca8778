"""Will the decode workers' batches fit in shared memory? Checked at start, not mid-run.

With data.num_workers > 0, grain's `mp_prefetch` (grain 0.2.18) moves every host batch from
a decode process to the trainer through POSIX shared memory, i.e. files in /dev/shm:

- grain/_src/python/dataset/transformations/process_prefetch.py: the worker loop copies each
  batch's arrays to shared memory (`copy_to_shm`, min_shm_size 0: every array) and then
  blocks putting it on a queue of `per_worker_buffer_size` (1 by default) elements; the
  trainer's side opens it (`open_from_shm`) and the segment is unlinked only when that array
  is freed (grain/_src/python/ipc/shared_memory_array.py, `unlink_on_del`).
- the same file's `multiprocess_prefetch` interleaves the workers' streams in the trainer
  with `iter_buffer_size=buffer_size`: each stream gets a prefetch thread with a queue of 1
  (grain/_src/python/dataset/transformations/interleave.py), plus the batch that thread
  holds while the queue is full.

So each worker pins up to 4 host batches there (its copy, the queue's, the thread's queue
and the thread's hand), and the trainer one more: measured with grain 0.2.18, the peak was
4 x workers + 1 batches for 1-4 workers, whatever `read_threads` was. The read threads'
batches (data.read_threads) are built in the worker's own memory, not in /dev/shm. An
evaluation opens a second pipeline with as many workers while the training one waits with
full buffers, so the need is the sum of both.

A container's /dev/shm is 64 MB unless a memory-backed volume is mounted there (the GKE
JobSet mounts one, as xpk does).
"""

import os

from vitpod.errors import UserError

BATCHES_PER_WORKER = 4  # see above: grain's per_worker_buffer_size is 1
SHARED_MEMORY = "/dev/shm"
MIB = 1 << 20


def batch_bytes(rows: int, image_size: int) -> int:
    """A host batch's bytes: uint8 images, and an int32 label, float32 valid, int32 index
    per row (vitpod/data/pipeline.py `_example`)."""
    return rows * (image_size * image_size * 3 + 12)


def need(num_workers: int, host_batch_bytes: int) -> int:
    """The most bytes num_workers decode processes pin in shared memory at once."""
    return (BATCHES_PER_WORKER * num_workers + 1) * host_batch_bytes if num_workers > 0 else 0


def check(num_workers: int, host_batch_bytes: int, path: str = SHARED_MEMORY) -> None:
    """UserError, one line naming the setting to lower, when `num_workers` decode processes
    (the resolved count, pipeline.decode_workers) with batches of `host_batch_bytes` will not
    fit in what `path` has free. Nothing with no workers or no such path."""
    if num_workers <= 0 or not os.path.isdir(path):
        return
    stat = os.statvfs(path)
    free = stat.f_bavail * stat.f_frsize
    wanted = need(num_workers, host_batch_bytes)
    if wanted <= free:
        return
    fits = max((n for n in range(num_workers) if need(n, host_batch_bytes) <= free), default=0)
    lower = (f"set data.num_workers={fits} or less" if fits else
             "lower batch_size (or data.eval_batch_size), or set data.num_workers=0")
    raise UserError(
        f"{path} has {free / MIB:.0f} MiB free, but {num_workers} decode worker(s) hold up to "
        f"{wanted / MIB:.0f} MiB of host batches there ({BATCHES_PER_WORKER} x "
        f"{num_workers} + 1 batches of {host_batch_bytes / MIB:.1f} MiB): {lower}, or give "
        f"the container a larger {path}")
