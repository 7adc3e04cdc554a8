"""Blob downloads that many readers follow while they are written.

One `Download` per digest at a time: the upstream body goes to a temp file (write and hash run on
worker threads, the hash up to one chunk behind), readers read the same file through a shared
descriptor at their own pace (sendfile or pread), and the file is renamed into the store only
after its size and digest check out. The last byte is held back from readers until the digest
checks out, so no client ever receives a complete body of bad content; the fsync and rename follow.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable

import aiohttp

from cargohold.cache.index import Index
from cargohold.cache.store import BlobStore
from cargohold.digests import Digest
from cargohold.errors import UpstreamInvalid

log = logging.getLogger("cargohold.cache")

CHUNK = 1 << 20
Opener = Callable[[], Awaitable[aiohttp.ClientResponse]]
# Called with a download's size before it is written, so the cache can make room (eviction).
MakeRoom = Callable[[int], Awaitable[None]]


class DownloadFailed(Exception):
    """The download a reader was following failed; its client gets a cut connection."""


class Download:
    """One upstream fetch of one blob into a temp file, readable while it grows."""

    def __init__(
        self,
        digest: Digest,
        store: BlobStore,
        index: Index,
        source: Hashable = None,
        make_room: MakeRoom | None = None,
    ) -> None:
        self.digest = digest
        self.source = source  # where it is fetched from (upstream, repository): joiners from elsewhere check first
        self.size: int | None = None
        self.written = 0
        self.verified = False
        self.error: BaseException | None = None
        self.finished = False
        self._store = store
        self._index = index
        self._make_room = make_room
        self._fd, self.temp = store.new_temp()
        # Shared by every reader: pread and sendfile take explicit offsets, never its position.
        self.reader = open(self.temp, "rb", buffering=0)  # noqa: SIM115 - closed when the last reader leaves
        self._readers = 0
        self._progress = asyncio.Event()
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ready.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def run(self, open_upstream: Opener) -> None:
        """Fetch, write, verify, commit. Runs as its own task: no client can cancel it."""
        loop = asyncio.get_running_loop()
        hasher = self.digest.hasher()
        response: aiohttp.ClientResponse | None = None
        try:
            response = await open_upstream()
            self.size = response.content_length
            self.ready.set_result(None)
            if self._make_room is not None and self.size:
                await self._make_room(self.size)
            # Readers need a chunk written, not hashed: the hash of one chunk runs (on another
            # worker thread) while the next is read and written, at most one chunk behind.
            hashing: asyncio.Future[None] | None = None
            async for chunk in response.content.iter_chunked(CHUNK):
                await loop.run_in_executor(None, self._write, chunk)
                self.written += len(chunk)
                self._notify()
                if hashing is not None:
                    await hashing
                hashing = loop.run_in_executor(None, hasher.update, chunk)
            if hashing is not None:
                await hashing
            if self.size is not None and self.written != self.size:
                raise UpstreamInvalid("upstream sent a blob of the wrong length", {"digest": str(self.digest)})
            if hasher.hexdigest() != self.digest.hex:
                raise UpstreamInvalid("upstream sent a blob that does not match its digest", {"digest": str(self.digest)})
            self.size = self.written
            # Proven content: readers may send the last byte now, not after the fsync below
            # (a 256 MiB fsync takes seconds); their shared descriptor survives the rename.
            self.verified = True
            self._notify()
            await loop.run_in_executor(None, self._commit)
            await self._index.put_blob(str(self.digest), self.written)
        except asyncio.CancelledError as exc:
            self._fail(exc)
            raise
        except Exception as exc:
            self._fail(exc)
            if response is not None:
                log.warning("download of %s failed after %d bytes: %s", self.digest, self.written, exc or type(exc).__name__)
        finally:
            self.finished = True
            self._notify()
            if response is not None:
                response.release()
            self._close_reader_if_unused()

    def _write(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            view = view[os.write(self._fd, view):]

    def _commit(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        self._store.commit(self.temp, self.digest)

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        if not self.ready.done():
            self.ready.set_exception(exc)
        self._abandon()

    def _abandon(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._store.discard(self.temp)

    def _notify(self) -> None:
        self._progress.set()
        self._progress.clear()

    def _close_reader_if_unused(self) -> None:
        if self.finished and self._readers == 0 and not self.reader.closed:
            self.reader.close()

    def _readable(self) -> int:
        """Bytes a reader may send now: all once verified, else all but the last."""
        if self.verified or self.size is None:
            return self.written
        return min(self.written, self.size - 1)

    async def spans(self, start: int = 0, end: int | None = None) -> AsyncIterator[tuple[int, int]]:
        """`(offset, length)` pieces of `[start, end)` of `reader` as they become readable;
        raises DownloadFailed if the download fails first."""
        self._readers += 1
        pin = self._store.pin(self.digest)
        position = start
        try:
            while end is None or position < end:
                if self.error is not None and not self.verified:
                    raise DownloadFailed(str(self.digest))
                available = self._readable() if end is None else min(self._readable(), end)
                if position < available:
                    yield position, available - position
                    position = available
                elif self.verified:
                    return
                elif self.finished:
                    raise DownloadFailed(str(self.digest))
                else:
                    await self._progress.wait()
        finally:
            pin.release()
            self._readers -= 1
            self._close_reader_if_unused()

    async def read(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Bytes `[start, end)` as they arrive, at most CHUNK at a time (for transports without sendfile)."""
        async for offset, length in self.spans(start, end):
            for at in range(offset, offset + length, CHUNK):
                data = os.pread(self.reader.fileno(), min(CHUNK, offset + length - at), at)
                if not data:
                    raise DownloadFailed(str(self.digest))
                yield data


class Downloads:
    """The downloads in progress, one per digest: later askers join the running one."""

    def __init__(self, store: BlobStore, index: Index, make_room: MakeRoom | None = None) -> None:
        self._store = store
        self._index = index
        self._make_room = make_room
        self._active: dict[str, Download] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.started = 0
        self.joins = 0

    def active(self, digest: Digest) -> Download | None:
        return self._active.get(str(digest))

    @property
    def in_flight(self) -> int:
        return len(self._active)

    async def join(self, digest: Digest, open_upstream: Opener, source: Hashable = None) -> Download:
        """The running download of `digest`, or a new one from `source`; returns once its size is known."""
        key = str(digest)
        download = self._active.get(key)
        if download is None:
            download = Download(
                digest, self._store, self._index, source, self._room if self._make_room else None
            )
            self._active[key] = download
            self.started += 1
            task = asyncio.create_task(download.run(open_upstream), name=f"download {key}")
            self._tasks.add(task)
            task.add_done_callback(lambda t: self._done(key, download, t))
        else:
            self.joins += 1
        await asyncio.shield(download.ready)
        return download

    async def _room(self, size: int) -> None:
        """Make room for every download still writing (each counts its whole size), not just this one."""
        assert self._make_room is not None
        await self._make_room(sum(d.size or 0 for d in self._active.values() if not d.verified))

    def _done(self, key: str, download: Download, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._active.get(key) is download:
            del self._active[key]

    async def close(self) -> None:
        """Stop every download (at shutdown); their temp files are removed."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
