"""Packed datasets: an ImageFolder's files as ArrayRecord shards, read a run at a time.

DIR/packed.json holds what a manifest holds (classes, files in sorted-scan order, labels)
and the layout: shard names, records per shard (a multiple of the run length `RUN`, so runs
of `RUN` records never cross a shard) and `RUN` itself. Record p of the shards (position p
of the pack order, `order.pack_order`) is the file's bytes, unchanged, after a small header
with its label and relative path. A packed dataset and its ImageFolder therefore decode to
the same pixels, skip the same unreadable files, and (by the pack order) give the same
batches.

Reading: array-record's own reader, local or gs:// (its GCS reader; the emulator endpoint
comes from CLOUD_STORAGE_EMULATOR_ENDPOINT). A read fetches the wanted record and the next
`run - 1` of its shard in one ranged request, and keeps them for the reads that follow. Open
shard readers cost a footer request and ~18 MB each here, so each process keeps a few.
"""

import collections
import json
import os
import struct
import threading

from vitpod import storage
from vitpod.errors import UserError

INDEX = "packed.json"
PLAN = "packing.json"  # written by `prepare pack` before its shards, INDEX once they all are
FORMAT = "vitpod-packed-v1"
RUN = 32  # records per run: shards hold whole runs (config's data.shuffle_block default)


def is_packed(root: str) -> bool:
    return storage.exists(storage.join(root, INDEX))


def load_index(root: str) -> dict:
    index = storage.read_json(storage.join(root, INDEX), "pack the data again (python -m "
                              "vitpod.prepare pack into a new --dst)")
    if index.get("format") != FORMAT:
        raise UserError(f"{storage.join(root, INDEX)} is not a {FORMAT} index "
                        f"(format {index.get('format')!r}); pack it again with "
                        "`python -m vitpod.prepare pack`")
    return index


def encode(label: int, relative_path: str, data: bytes) -> bytes:
    header = json.dumps([label, relative_path]).encode()
    return struct.pack("<I", len(header)) + header + data


def decode(record: bytes) -> tuple[int, str, bytes]:
    (size,) = struct.unpack_from("<I", record)
    label, relative_path = json.loads(record[4:4 + size])
    return label, relative_path, record[4 + size:]


def _array_record():
    from array_record.python import array_record_module

    return array_record_module


class Reader:
    """One process's reads of a packed split: cached runs of records, a few open shards."""

    def __init__(self, root: str, shards: tuple[str, ...], shard_records: int,
                 record_bytes: int, open_shards: int = 8, cached_runs: int = 64,
                 total_records: int = 0):
        self.root, self.shards, self.shard_records = root, shards, shard_records
        self.total_records = total_records  # checks each shard's count when it is opened
        self.record_bytes = record_bytes
        self.open_shards, self.cached_runs = open_shards, cached_runs
        self._readers: collections.OrderedDict = collections.OrderedDict()
        self._runs: collections.OrderedDict = collections.OrderedDict()  # (shard, start) -> list
        self._lock = threading.Lock()

    def _reader(self, shard: int, run: int):
        """(reader, its lock), opened with a read-ahead that fetches a run in one request."""
        with self._lock:
            if shard in self._readers:
                self._readers.move_to_end(shard)
                return self._readers[shard]
        readahead = max(1 << 16, int(run * self.record_bytes * 1.25) + (1 << 16))
        path = storage.join(self.root, self.shards[shard])
        try:
            reader = _array_record().ArrayRecordReader(
                path, f"readahead_buffer_size:{readahead},max_parallelism:1")
        except (RuntimeError, ValueError, OSError) as e:
            raise UserError(f"cannot open packed shard {path}: {str(e)[:200]}; check the path "
                            "and your access, or pack the data again") from None
        expected = shard_size(shard, len(self.shards), self.shard_records, self.total_records)
        if self.total_records and reader.num_records() != expected:
            raise UserError(f"packed shard {path} holds {reader.num_records()} records, not "
                            f"{expected}: it was cut short (an interrupted copy?); rerun the "
                            "same `python -m vitpod.prepare pack` to write it again")
        with self._lock:
            entry = self._readers.setdefault(shard, (reader, threading.Lock()))
            while len(self._readers) > self.open_shards:
                self._readers.popitem(last=False)  # closed when its last user lets go
            return entry

    def record(self, position: int, run: int) -> bytes:
        """The record at pack position `position`, reading up to `run` records ahead."""
        shard, r = divmod(position, self.shard_records)
        with self._lock:
            for (s, start), records in reversed(self._runs.items()):
                if s == shard and start <= r < start + len(records):
                    self._runs.move_to_end((s, start))
                    return records[r - start]
        reader, lock = self._reader(shard, run)
        with lock:  # one shard reader is not shared between threads at once
            records = reader.read(r, min(r + run, reader.num_records()))
        with self._lock:
            self._runs[(shard, r)] = records
            while len(self._runs) > self.cached_runs:
                self._runs.popitem(last=False)
        return records[0]


def shard_size(shard: int, shards: int, shard_records: int, total_records: int) -> int:
    """Records in shard `shard` of `shards`: every shard is full but the last."""
    return shard_records if shard < shards - 1 else total_records - shard_records * (shards - 1)


def count_records(path: str) -> int:
    """Records in the ArrayRecord shard at `path` (-1 when it cannot be opened)."""
    try:
        reader = _array_record().ArrayRecordReader(path, "readahead_buffer_size:0")
    except (RuntimeError, ValueError, OSError):
        return -1
    count = reader.num_records()
    try:
        reader.close()
    except RuntimeError:  # a shard cut short fails its close too; its count already tells
        pass
    return count


_readers: dict = {}  # (pid, root) -> Reader: grain workers each make their own


def reader_for(root: str, shards: tuple[str, ...], shard_records: int,
               record_bytes: int, total_records: int = 0) -> Reader:
    key = (os.getpid(), root)
    if key not in _readers:
        _readers[key] = Reader(root, shards, shard_records, record_bytes,
                               total_records=total_records)
    return _readers[key]
