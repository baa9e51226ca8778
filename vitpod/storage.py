"""Local and gs:// paths in one place: read, write, list, with retries and one-line errors.

Everything else passes path strings. Cloud I/O uses google-cloud-storage, whose retry object
already backs off exponentially on 429, 5xx and dropped connections; every call here passes it
(uploads included: each of our writes replaces a whole object, so repeating one is safe).
Permanent errors (403, 404, a missing bucket, no credentials) become UserError naming the
bucket or object and the likely cause. orbax and TensorBoard reach gs:// through their own
clients (tensorstore, gcsfs, google-cloud-storage) and read the same credentials.
"""

import concurrent.futures
import contextlib
import json
import os
import posixpath
import threading

from vitpod import localfs
from vitpod.errors import UserError
from vitpod.workdir import protocol  # a leaf: standard library only

GCS = "gs://"
_local = threading.local()


class NotFound(UserError):
    """A file or object that is not there (its bucket is)."""


def is_gcs(path: str) -> bool:
    return str(path).startswith(GCS)


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_gcs(base) else os.path.join(base, *parts)


def absolute(path: str) -> str:
    return path.rstrip("/") if is_gcs(path) else os.path.abspath(path)


def split(path: str) -> tuple[str, str]:
    """gs://bucket/a/b -> ('bucket', 'a/b')."""
    bucket, _, name = path[len(GCS):].partition("/")
    if not bucket:
        raise UserError(f"{path!r} names no bucket; write gs://BUCKET/PATH")
    return bucket, name


def _retry():
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_deadline(600.0)


def _client():
    """One client per thread (and per process: grain workers start fresh)."""
    client = getattr(_local, "client", None)
    if client is None or _local.pid != os.getpid():
        from google.cloud import storage

        with _errors("gs://"):
            client = storage.Client()
        _local.client, _local.pid = client, os.getpid()
    return client


def _blob(path: str):
    bucket, name = split(path)
    return _client().bucket(bucket).blob(name)


@contextlib.contextmanager
def _errors(path: str):
    """Permanent cloud errors -> one UserError naming what failed and what to check."""
    from google.api_core import exceptions
    from google.auth import exceptions as auth_exceptions

    bucket = split(path)[0] if is_gcs(path) and len(path) > len(GCS) else "?"
    try:
        yield
    except exceptions.NotFound:
        if _bucket_missing(bucket):
            raise UserError(f"bucket gs://{bucket} does not exist ({path}); check the bucket "
                            "name for a typo, or create the bucket") from None
        raise NotFound(f"{path} does not exist") from None
    except (exceptions.Forbidden, exceptions.Unauthorized) as e:
        raise UserError(
            f"permission denied on gs://{bucket} ({path}): HTTP {e.code}; check the "
            "credentials (`gcloud auth application-default login`, or on a VM the service "
            "account's storage scope and its roles on the bucket)") from None
    except auth_exceptions.DefaultCredentialsError:
        raise UserError(f"no Google Cloud credentials to reach {path}; run `gcloud auth "
                        "application-default login`, or run on a VM with a service account"
                        ) from None


def _bucket_missing(bucket: str) -> bool:
    from google.api_core import exceptions

    try:
        return not _client().bucket(bucket).exists(retry=_retry())
    except exceptions.GoogleAPICallError:  # e.g. may read objects but not bucket metadata
        return False


def exists(path: str) -> bool:
    if not is_gcs(path):
        return os.path.exists(path)
    with _errors(path):
        return _blob(path).exists(retry=_retry())


def read_bytes(path: str) -> bytes:
    if not is_gcs(path):
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise NotFound(f"{path} does not exist") from None
    with _errors(path):
        return _blob(path).download_as_bytes(retry=_retry())


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
    """Whole-file write that readers never see half done (rename locally; GCS objects are)."""
    if is_gcs(path):
        with _errors(path):
            _blob(path).upload_from_string(data, retry=_retry())
        return
    localfs.write_bytes(path, data)


def upload_file(local_path: str, path: str) -> None:
    """Copy a local file to gs://path, streamed from the file (a shard is never all in memory)."""
    with _errors(path):
        _blob(path).upload_from_filename(local_path, retry=_retry())


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


class Changed(Exception):
    """A conditional write found the object changed since it was read."""


def read_versioned(path: str) -> tuple[bytes | None, int]:
    """gs://path's bytes and generation ((None, 0) when absent), for write_if_unchanged."""
    from google.api_core import exceptions

    bucket, name = split(path)
    with _errors(path):
        while True:
            blob = _client().bucket(bucket).get_blob(name, retry=_retry())
            if blob is None:
                return None, 0
            try:
                return (blob.download_as_bytes(if_generation_match=blob.generation,
                                               retry=_retry()), blob.generation)
            except (exceptions.PreconditionFailed, exceptions.NotFound):
                continue  # replaced or deleted between the two requests


def write_if_unchanged(path: str, data: bytes | None, generation: int) -> int:
    """Replace gs://path (data None: delete it) only if its generation is still `generation`
    (0: only if absent); returns the new generation, or raises Changed."""
    from google.api_core import exceptions

    blob = _blob(path)
    try:
        with _errors(path):
            if data is None:
                blob.delete(if_generation_match=generation, retry=_retry())
                return 0
            blob.upload_from_string(data, if_generation_match=generation, retry=_retry())
            return blob.generation
    except (exceptions.PreconditionFailed, NotFound):
        raise Changed(path) from None


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
    bucket, name = split(path)
    prefix = name.rstrip("/") + "/" if name else ""
    with _errors(path):
        blobs = _client().list_blobs(bucket, prefix=prefix, max_results=1, retry=_retry())
        return any(True for _ in blobs)


def subdirs(path: str) -> list[str]:
    """Names of the folders directly under `path`, sorted."""
    if not is_gcs(path):
        return sorted(e.name for e in os.scandir(path) if e.is_dir())
    bucket, name = split(path)
    prefix = name.rstrip("/") + "/" if name else ""
    with _errors(path):
        pages = _client().list_blobs(bucket, prefix=prefix, delimiter="/", retry=_retry())
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
    bucket, name = split(path)
    prefix = name.rstrip("/") + "/" if name else ""
    with _errors(path):
        return [(b.name[len(prefix):], b)
                for b in _client().list_blobs(bucket, prefix=prefix, retry=_retry())]


def parallel_map(fn, items, threads: int = 32) -> list:
    """fn over items on a thread pool, results in order (listing and copying are I/O bound)."""
    pool = concurrent.futures.ThreadPoolExecutor(max(1, min(threads, len(items))))
    try:
        return list(pool.map(fn, items))
    finally:  # on an error (or Ctrl-C) the items not started are dropped, not all run first
        pool.shutdown(wait=True, cancel_futures=True)
