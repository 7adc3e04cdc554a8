"""Content-addressed blob storage. Files are written under a temp name, fsynced, then renamed into place."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Protocol

from cargohold.digests import Digest

log = logging.getLogger("cargohold.cache")


class BlobStore(Protocol):
    """What the proxy needs from storage; an S3 store implements the same."""

    def local_path(self, digest: Digest) -> Path | None: ...
    def new_temp(self) -> tuple[int, Path]: ...
    def commit(self, temp: Path, digest: Digest) -> int: ...
    def discard(self, temp: Path) -> None: ...
    def read(self, digest: Digest) -> bytes | None: ...
    def write(self, digest: Digest, data: bytes) -> None: ...
    def clean_temp(self) -> int: ...


class FsBlobStore:
    """Blobs at `<root>/blobs/<algorithm>/<first two hex>/<hex>`; temp files under `<root>/tmp`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.tmp = root / "tmp"
        for folder in (self.blobs, self.tmp):
            folder.mkdir(parents=True, exist_ok=True, mode=0o750)

    def path_for(self, digest: Digest) -> Path:
        return self.blobs / digest.algorithm / digest.hex[:2] / digest.hex

    def local_path(self, digest: Digest) -> Path | None:
        path = self.path_for(digest)
        return path if path.is_file() else None

    def new_temp(self) -> tuple[int, Path]:
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="dl-")
        return fd, Path(name)

    def commit(self, temp: Path, digest: Digest) -> int:
        """Move a verified, fsynced temp file into place; returns its size."""
        final = self.path_for(digest)
        final.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        os.chmod(temp, 0o640)
        os.replace(temp, final)
        return final.stat().st_size

    def discard(self, temp: Path) -> None:
        try:
            temp.unlink()
        except FileNotFoundError:
            pass

    def read(self, digest: Digest) -> bytes | None:
        try:
            return self.path_for(digest).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, digest: Digest, data: bytes) -> None:
        """Store small content (manifests) that the caller has already verified."""
        fd, temp = self.new_temp()
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            self.commit(temp, digest)
        except BaseException:
            self.discard(temp)
            raise

    def clean_temp(self) -> int:
        """Remove temp files a crash left behind; run at start before any download begins."""
        removed = 0
        for path in self.tmp.iterdir():
            if path.is_file():
                path.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.info("removed %d temp files left by an earlier run", removed)
        return removed
