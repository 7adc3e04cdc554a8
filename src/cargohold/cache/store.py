"""Content-addressed blob storage. Files are written under a temp name, fsynced, then renamed into place."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Protocol

from cargohold.errors import DigestInvalid
from cargohold.oci.digests import Digest

log = logging.getLogger("cargohold.cache")


class RemoteBlob(Protocol):
    """A stored blob that is not a local file (object storage): streamed or redirected to, not sendfile'd."""

    @property
    def size(self) -> int: ...  # a property: implementations may be frozen (read-only)

    async def chunks(self, start: int, end: int) -> AsyncIterator[bytes] | None:
        """Bytes `[start, end)` as they come, or None if the blob is gone (evicted since it was found)."""

    async def redirect_url(self) -> str | None:
        """Where to send the client instead (a presigned URL), when storage is set up for that."""


class BlobStore(Protocol):
    """What the proxy needs from storage: local temp files for downloads, then content by digest.

    `commit` runs on a worker thread (it may upload); the async methods run on the event loop.
    """

    def new_temp(self) -> tuple[int, Path]: ...
    def commit(self, temp: Path, digest: Digest) -> int: ...
    def discard(self, temp: Path) -> None: ...
    def clean_temp(self) -> int: ...
    def pin(self, digest: Digest) -> Pin: ...
    def in_use(self, digest: Digest) -> bool: ...
    async def locate(self, digest: Digest) -> Path | RemoteBlob | None: ...
    async def load(self, digest: Digest) -> bytes | None: ...
    async def save(self, digest: Digest, data: bytes) -> None: ...
    async def delete(self, digest: Digest) -> int: ...
    def entries(self) -> AsyncIterator[tuple[Digest, int]]: ...


class Pin:
    """Holds a blob against eviction while a client reads it; released once (more calls do nothing)."""

    def __init__(self, pins: Counter[str], key: str) -> None:
        self._pins = pins
        self._key: str | None = key
        pins[key] += 1

    def release(self) -> None:
        if self._key is not None:
            self._pins[self._key] -= 1
            if self._pins[self._key] <= 0:
                del self._pins[self._key]
            self._key = None


class Spool:
    """Download temp files under `<root>/tmp` and this process's pins: what every store keeps locally."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True, mode=0o750)
        self._pins: Counter[str] = Counter()

    def new_temp(self) -> tuple[int, Path]:
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="dl-")
        return fd, Path(name)

    def discard(self, temp: Path) -> None:
        temp.unlink(missing_ok=True)

    def pin(self, digest: Digest) -> Pin:
        """Mark a blob as being read by this process; eviction leaves pinned blobs alone."""
        return Pin(self._pins, str(digest))

    def in_use(self, digest: Digest) -> bool:
        return self._pins.get(str(digest), 0) > 0

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


class FsBlobStore(Spool):
    """Blobs at `<root>/blobs/<algorithm>/<first two hex>/<hex>`; temp files under `<root>/tmp`."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.blobs = root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True, mode=0o750)

    def path_for(self, digest: Digest) -> Path:
        return self.blobs / digest.algorithm / digest.hex[:2] / digest.hex

    def local_path(self, digest: Digest) -> Path | None:
        path = self.path_for(digest)
        return path if path.is_file() else None

    def commit(self, temp: Path, digest: Digest) -> int:
        """Move a verified, fsynced temp file into place; returns its size."""
        final = self.path_for(digest)
        final.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        os.chmod(temp, 0o640)
        os.replace(temp, final)
        return final.stat().st_size

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

    def remove(self, digest: Digest) -> int:
        """Delete a stored file (its index row must be gone first); returns the bytes freed."""
        path = self.path_for(digest)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size

    def files(self) -> Iterator[tuple[Digest, int]]:
        """Every stored file as (digest, size); names that are not digests are skipped."""
        for algorithm in self.blobs.iterdir():
            for path in algorithm.glob("*/*"):
                try:
                    yield Digest.parse(f"{algorithm.name}:{path.name}"), path.stat().st_size
                except (DigestInvalid, FileNotFoundError):
                    continue

    # The async methods do their file work on a worker thread (as aiohttp's FileResponse does): a
    # stat, read or fsync can block on a busy disk, and the event loop serves every client.

    async def locate(self, digest: Digest) -> Path | None:
        return await asyncio.to_thread(self.local_path, digest)

    async def load(self, digest: Digest) -> bytes | None:
        return await asyncio.to_thread(self.read, digest)

    async def save(self, digest: Digest, data: bytes) -> None:
        await asyncio.to_thread(self.write, digest, data)

    async def delete(self, digest: Digest) -> int:
        return await asyncio.to_thread(self.remove, digest)

    async def entries(self) -> AsyncIterator[tuple[Digest, int]]:
        """`files()`, listed on a worker thread (a big cache is many directories)."""
        for entry in await asyncio.to_thread(lambda: list(self.files())):
            yield entry
