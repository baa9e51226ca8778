"""The workdir's objects, read and written with `gcloud storage` (no client library), as the
launchers watch a run: markers, records, DONE. Standard library only."""

import json
import os
import tempfile

from deploy.shell import Cli, reason


class Bucket:
    """The workdir's objects, read and written with `gcloud storage` (no client library)."""

    def __init__(self, gcloud: Cli):
        self.g = gcloud

    def list(self, url: str) -> list[str] | None:
        """The objects (and folders) `gcloud storage ls` shows under url; None when unreadable."""
        code, out, _ = self.g.call("storage", "ls", url, retries=2, timeout=120)
        return out.splitlines() if code == 0 else None

    def exists(self, url: str) -> bool:
        return self.list(url) is not None

    def read(self, url: str) -> str | None:
        code, out, _ = self.g.call("storage", "cat", url, retries=2)
        return out if code == 0 else None

    def write_json(self, url: str, value: object) -> str:
        """'' when written, else why not."""
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(value, f)
        try:
            code, _, err = self.g.call("storage", "cp", f.name, url, retries=2, timeout=120)
        finally:
            os.remove(f.name)
        return reason(err, code) if code else ""
