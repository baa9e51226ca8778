"""Local and gs:// paths in one place: read, write, list, with retries and one-line errors.

Everything else passes path strings. Cloud I/O uses google-cloud-storage, whose retry object
already backs off exponentially on 429, 5xx and dropped connections; every call here passes it
(uploads included: each of our writes replaces a whole object, so repeating one is safe).
Permanent errors (403, 404, a missing bucket, no credentials) become UserError naming the
bucket or object and the likely cause (the client and that mapping are vitpod/gcs.py). orbax
and TensorBoard reach gs:// through their own clients (tensorstore, gcsfs,
google-cloud-storage) and read the same credentials.
"""

import concurrent.futures
import json
import os
import posixpath

from vitpod import (
    gcs,
    localfs,
    protocol,  # a leaf: standard library only
)
from vitpod.errors import NotFound, UserError

GCS = gcs.GCS


def is_gcs(path: str) -> bool:
    return str(path).startswith(GCS)


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_gcs(base) else os.path.join(base, *parts)


def absolute(path: str) -> str:
    return path.rstrip("/") if is_gcs(path) else os.path.abspath(path)


def exists(path: str) -> bool:
    if not is_gcs(path):
        return os.path.exists(path)
    with gcs.errors(path):
        return gcs.blob(path).exists(retry=gcs.retry())


def read_bytes(path: str) -> bytes:
    if not is_gcs(path):
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise NotFound(f"{path} does not exist") from None
    with gcs.errors(path):
        return gcs.blob(path).download_as_bytes(retry=gcs.retry())


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
    """Whole-file write that readers never see half done (rename locally; GCS objects are)."""
    if is_gcs(path):
        with gcs.errors(path):
            gcs.blob(path).upload_from_string(data, retry=gcs.retry())
        return
    localfs.write_bytes(path, data)


def upload_file(local_path: str, path: str) -> None:
    """Copy a local file to gs://path, streamed from the file (a shard is never all in memory)."""
    with gcs.errors(path):
        gcs.blob(path).upload_from_filename(local_path, retry=gcs.retry())


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def read_json(path: str, remedy: str, shape=None):
    """A JSON file of the workdir or a dataset; a damaged one (empty, cut short, not JSON, or
    JSON of another shape than `shape`, see protocol.mismatch) is one UserError naming it and
    `remedy`, what to do about it."""
    try:
        value = json.loads(read_text(path))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is damaged ({type(e).__name__}: {str(e)[:80]}); "
                        f"{remedy}") from None
    wrong = None if shape is None else protocol.mismatch(value, shape)
    if wrong:
        raise UserError(f"{path} is damaged (not what vitpod writes there: {wrong[:120]}); "
                        f"{remedy}")
    return value


def makedirs(path: str) -> None:
    if not is_gcs(path):
        os.makedirs(path, exist_ok=True)


class Appender:
    """A text file grown line by line; on GCS (objects are immutable) the whole text is
    rewritten at each append, which suits a metrics log of thousands of short rows."""

    def __init__(self, path: str):
        self.path = path
        self.text = None
        if is_gcs(path):
            self.text = read_text(path) if exists(path) else ""
        # a crash may have cut the last line short: the next row starts a new line
        self.cut = (localfs.ends_mid_line(path) if self.text is None
                    else self.text[-1:] not in ("", "\n"))

    def write(self, text: str) -> None:
        if self.cut:
            text, self.cut = "\n" + text, False
        if self.text is None:
            try:
                with open(self.path, "a") as f:
                    f.write(text)
            except OSError as e:
                raise localfs.write_error(self.path, e) from None
        else:
            self.text += text
            write_text(self.path, self.text)


def isdir(path: str) -> bool:
    if not is_gcs(path):
        return os.path.isdir(path)
    bucket, name = gcs.split(path)
    prefix = name.rstrip("/") + "/" if name else ""
    with gcs.errors(path):
        blobs = gcs.client().list_blobs(bucket, prefix=prefix, max_results=1, retry=gcs.retry())
        return any(True for _ in blobs)


def subdirs(path: str) -> list[str]:
    """Names of the folders directly under `path`, sorted."""
    if not is_gcs(path):
        return sorted(e.name for e in os.scandir(path) if e.is_dir())
    bucket, name = gcs.split(path)
    prefix = name.rstrip("/") + "/" if name else ""
    with gcs.errors(path):
        pages = gcs.client().list_blobs(bucket, prefix=prefix, delimiter="/", retry=gcs.retry())
        for _ in pages:
            pass
        return sorted(p[len(prefix):].rstrip("/") for p in pages.prefixes)


def files_below(path: str, hidden: bool = True, skipped: list | None = None,
                outside: list | None = None) -> list[str]:
    """Every file under `path` (any depth), relative to it, sorted. Locally a link is followed
    once, and never back into `path`, its direct subfolders or above them (localfs.walk);
    the links not followed are added to `skipped`, and given a list `outside`, the links out
    of `path` to it instead of being followed. `hidden=False` skips names starting with '.'
    at any depth."""
    if not is_gcs(path):
        found, not_followed = localfs.walk(path, hidden, outside)
        if skipped is not None:
            skipped += not_followed
        return [rel for rel, _ in found]
    return sorted(rel for rel, _ in objects_below(path) if not rel.endswith("/")
                  and (hidden or not any(p.startswith(".") for p in rel.split("/"))))


def objects_below(path: str) -> list[tuple[str, object]]:
    """(name relative to gs://path, blob) of every object under it, in one paged listing."""
    bucket, name = gcs.split(path)
    prefix = name.rstrip("/") + "/" if name else ""
    with gcs.errors(path):
        return [(b.name[len(prefix):], b)
                for b in gcs.client().list_blobs(bucket, prefix=prefix, retry=gcs.retry())]


def parallel_map(fn, items, threads: int = 32) -> list:
    """fn over items on a thread pool, results in order (listing and copying are I/O bound)."""
    pool = concurrent.futures.ThreadPoolExecutor(max(1, min(threads, len(items))))
    try:
        return list(pool.map(fn, items))
    finally:  # on an error (or Ctrl-C) the items not started are dropped, not all run first
        pool.shutdown(wait=True, cancel_futures=True)
