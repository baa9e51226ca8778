"""The Cloud Storage client behind vitpod.storage: one client per thread and process, the
retry every call passes, permanent errors as one line naming the bucket and the likely cause,
and the conditional writes (by object generation) the workdir's lease relies on."""

import contextlib
import os
import threading

from vitpod.errors import NotFound, UserError

GCS = "gs://"
_local = threading.local()


def split(path: str) -> tuple[str, str]:
    """gs://bucket/a/b -> ('bucket', 'a/b')."""
    bucket, _, name = path[len(GCS):].partition("/")
    if not bucket:
        raise UserError(f"{path!r} names no bucket; write gs://BUCKET/PATH")
    return bucket, name


def retry():
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_deadline(600.0)


def client():
    """One client per thread (and per process: grain workers start fresh)."""
    made = getattr(_local, "client", None)
    if made is None or _local.pid != os.getpid():
        from google.cloud import storage

        with errors("gs://"):
            made = storage.Client()
        _local.client, _local.pid = made, os.getpid()
    return made


def blob(path: str):
    bucket, name = split(path)
    return client().bucket(bucket).blob(name)


@contextlib.contextmanager
def errors(path: str):
    """Permanent cloud errors -> one UserError naming what failed and what to check."""
    from google.api_core import exceptions
    from google.auth import exceptions as auth_exceptions

    bucket = split(path)[0] if path.startswith(GCS) and len(path) > len(GCS) else "?"
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
        return not client().bucket(bucket).exists(retry=retry())
    except exceptions.GoogleAPICallError:  # e.g. may read objects but not bucket metadata
        return False


class Changed(Exception):
    """A conditional write found the object changed since it was read."""


def read_versioned(path: str) -> tuple[bytes | None, int]:
    """gs://path's bytes and generation ((None, 0) when absent), for write_if_unchanged."""
    from google.api_core import exceptions

    bucket, name = split(path)
    with errors(path):
        while True:
            blob = client().bucket(bucket).get_blob(name, retry=retry())
            if blob is None:
                return None, 0
            try:
                return (blob.download_as_bytes(if_generation_match=blob.generation,
                                               retry=retry()), blob.generation)
            except (exceptions.PreconditionFailed, exceptions.NotFound):
                continue  # replaced or deleted between the two requests


def write_if_unchanged(path: str, data: bytes | None, generation: int) -> int:
    """Replace gs://path (data None: delete it) only if its generation is still `generation`
    (0: only if absent); returns the new generation, or raises Changed."""
    from google.api_core import exceptions

    target = blob(path)
    try:
        with errors(path):
            if data is None:
                target.delete(if_generation_match=generation, retry=retry())
                return 0
            target.upload_from_string(data, if_generation_match=generation, retry=retry())
            return target.generation
    except (exceptions.PreconditionFailed, NotFound):
        raise Changed(path) from None
