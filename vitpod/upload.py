"""`prepare upload`: a local folder copied to gs:// in parallel, resumable (objects already
there with the same size and MD5 are skipped), without what lies outside the folder."""

import base64
import hashlib
import os
import threading

from absl import logging

from vitpod import storage
from vitpod.errors import UserError


def _md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def _remote_checksums(path: str) -> dict[str, tuple[int, str]]:
    """Relative name -> (size, base64 MD5) of every object under gs://path."""
    return {rel: (b.size, b.md5_hash) for rel, b in storage.objects_below(path)}


def upload_tree(src: str, dst: str, threads: int = 32, progress=None,
                follow_links_out: bool = False) -> tuple[int, int]:
    """Copy every file under local `src` to gs://`dst` in parallel, skipping objects already
    there with the same size and MD5 (so an interrupted copy resumes); (copied, skipped).
    Links out of `src` are named and not followed, unless `follow_links_out`.
    `progress(done, total)` is called after each file."""
    if not storage.is_gcs(dst) or storage.is_gcs(src):
        raise UserError(f"upload copies a local folder to gs://; got {src!r} -> {dst!r}")
    if not os.path.isdir(src):
        raise UserError(f"{src!r} is not a folder; pass --src=a local ImageFolder")
    not_followed: list[str] = []
    out, out_hidden = (None, None) if follow_links_out else ([], [])
    files = storage.files_below(src, hidden=False, skipped=not_followed, outside=out)
    remote = _remote_checksums(dst)
    every = storage.files_below(src, outside=out_hidden)
    left_out = sorted(set(every) - set(files)
                      | set(out_hidden or ()) - set(out or ())) + not_followed
    if left_out:
        logging.warning("upload: left out %d hidden file(s) or link(s) back into %s or above it:"
                        " %s", len(left_out), src, ", ".join(left_out[:10]))
    if out:
        links = [f"{rel} -> {os.path.realpath(os.path.join(src, rel))}" for rel in out]
        logging.warning("upload: did not follow %d link(s) leading out of %s: %s%s; pass "
                        "--follow_links_out to upload what they point to", len(out), src,
                        ", ".join(links[:10]), ", ..." if len(out) > 10 else "")
    lock, counts = threading.Lock(), {"copied": 0, "skipped": 0}

    def copy(rel: str) -> None:
        data = storage.read_bytes(os.path.join(src, rel))
        same = remote.get(rel) == (len(data), _md5_b64(data))
        if not same:
            storage.write_bytes(storage.join(dst, rel), data)
        with lock:
            counts["skipped" if same else "copied"] += 1
            if progress:
                progress(counts["copied"] + counts["skipped"], len(files))

    storage.parallel_map(copy, files, threads)
    return counts["copied"], counts["skipped"]
