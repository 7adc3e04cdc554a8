"""Blob downloads that many readers follow while they are written.

One `Download` per digest at a time: the upstream body goes to a temp file (each batch of about
1 MiB written and hashed by one worker-thread job), readers read the same file through a shared
descriptor at their own pace (sendfile or pread), and the file is renamed into the store only
after its size and digest check out. Each reader's last byte (the blob's, or its range's) is held
back until the digest checks out, so no client ever receives a complete body or range of bad content,
and a reader of no bytes at all returns only then; the fsync and rename follow.

A blob is bounded: by its Content-Length (checked at the end), and never past `max_blob_size`. One
whose upstream gives no length reserves room in the cache as it grows, a step at a time; when the
cache (or the disk) has no room for the next step it goes on uncached, as below.

When the disk is full (ENOSPC/EDQUOT) the download goes on uncached: bytes already on disk are
still read from the (unlinked) temp file, the rest pass through a bounded window in memory that
the download refills only as its slowest reader drains it. Nothing is stored; the next request
for the digest tries the disk again, so caching resumes by itself once space returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import logging
import os
import shutil
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Hashable, Iterator
from pathlib import Path
from typing import BinaryIO

import aiohttp

from cargohold.cache.index import Index
from cargohold.cache.store import BlobStore
from cargohold.errors import UpstreamInvalid
from cargohold.oci.digests import Digest
from cargohold.tasks import Tasks

log = logging.getLogger("cargohold.cache")

CHUNK = 1 << 20
# Pieces per batch: one writev takes at most IOV_MAX (1024 on Linux) buffers, and a trickling or
# finely chunked upstream delivers pieces of a few hundred bytes.
MAX_PIECES = 512
# An uncached download keeps at most this much ahead of its slowest reader in memory.
MEMORY_WINDOW = 16 << 20
# How long an uncached download with a full window waits for its readers to move before it gives up.
READER_STALL = 60.0
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
Opener = Callable[[], Awaitable[aiohttp.ClientResponse]]
# Called with the bytes downloads are about to write, so the cache can make room (eviction); False
# when they do not fit even so.
MakeRoom = Callable[[int], Awaitable[bool]]
# The largest blob fetched when nothing says otherwise (`max_blob_size`).
MAX_BLOB_SIZE = 20 << 30
# How much more room a download of unknown size reserves at a time (at least; it doubles as it grows).
ROOM_STEP = 64 << 20
# The mode of a temp file whose digest checked out (mkstemp makes it 0600; the store gives every blob this
# mode too): a follower in another worker process sees it with an fstat of its own descriptor.
VERIFIED_MODE = 0o640


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL


async def _batches(content: aiohttp.StreamReader) -> AsyncIterator[list[bytes]]:
    """The body in lists of the pieces the socket delivered, CHUNK bytes or MAX_PIECES pieces each: fewer
    thread hand-offs than one job per piece, and no copy (aiohttp's `iter_chunked` joins pieces)."""
    batch: list[bytes] = []
    size = 0
    async for piece, _ in content.iter_chunks():
        batch.append(piece)
        size += len(piece)
        if size >= CHUNK or len(batch) >= MAX_PIECES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _hash(hasher: hashlib._Hash, batch: list[bytes]) -> None:
    for piece in batch:
        hasher.update(piece)


def _new_temp(store: BlobStore) -> tuple[int, Path, int]:
    fd, temp = store.new_temp()
    try:
        return fd, temp, os.open(temp, os.O_RDONLY)
    except BaseException:
        _remove_temp(store, fd, temp, -1)
        raise


def _remove_temp(store: BlobStore, fd: int, temp: Path, read_fd: int) -> None:
    for each in (fd, read_fd):
        if each >= 0:
            os.close(each)
    store.discard(temp)


def _discard_made(store: BlobStore, made: asyncio.Future[tuple[int, Path, int]]) -> None:
    if not made.cancelled() and made.exception() is None:
        _remove_temp(store, *made.result())


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
        on_uncached: Callable[[Download], None] | None = None,
        limit: int = MAX_BLOB_SIZE,
    ) -> None:
        self.digest = digest
        self.source = source  # where it is fetched from (upstream, repository): joiners from elsewhere check first
        self.size: int | None = None
        self.limit = limit
        # Bytes the cache has made room for: the size, or (size unknown) what was written so far and a step more.
        self.reserved = 0
        self.written = 0
        self.verified = False
        self.error: BaseException | None = None
        self.finished = False
        self._store = store
        self._index = index
        self._make_room = make_room
        self._on_uncached = on_uncached
        # Offset from which bytes live only in memory (None: all on disk, the download is cached).
        self.spill_from: int | None = None
        self._memory: deque[bytes] = deque()
        self._memory_start = 0
        self._positions: dict[object, int] = {}
        self._ends: dict[object, int | None] = {}
        # The last byte of a range reader parked on it until verification, kept once the window drops it.
        self._held: dict[object, bytes] = {}
        self._drained = asyncio.Event()
        self._fd = self._read_fd = -1
        self._reader: BinaryIO | None = None
        self.temp: Path | None = None  # created by `run`, on a worker thread
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
            await self._open_temp()
            response = await open_upstream()
            self.size = response.content_length
            if self.size is not None and self.size > self.limit:
                raise self._too_large()
            self.ready.set_result(None)
            if self._make_room is not None and self.size:
                self.reserved = self.size
                await self._make_room(self.size)
            # One worker-thread job per batch writes it and hashes it (fewer hand-offs than
            # separate, pipelined jobs: measured better on two busy cores); the socket keeps
            # filling aiohttp's buffer meanwhile.
            async for batch in _batches(response.content):
                incoming = self.written + sum(map(len, batch))
                if incoming > self.limit:
                    raise self._too_large()
                if self.size is None and self.spill_from is None and incoming > self.reserved:
                    await self._reserve(incoming)
                hashed = False
                if self.spill_from is None:
                    try:
                        await loop.run_in_executor(None, self._write_and_hash, batch, hasher)
                        hashed = True
                    except OSError as exc:
                        if not is_disk_full(exc):
                            raise
                        self._go_uncached("disk full", exc)
                if not hashed:
                    await loop.run_in_executor(None, _hash, hasher, batch)
                if self.spill_from is not None:
                    self._memory.extend(batch)
                self.written += sum(map(len, batch))
                self._notify()
                if self.spill_from is not None:
                    await self._wait_for_readers()
            if self.size is not None and self.written != self.size:
                raise UpstreamInvalid("upstream sent a blob of the wrong length", {"digest": str(self.digest)})
            if hasher.hexdigest() != self.digest.hex:
                raise UpstreamInvalid(
                    "upstream sent a blob that does not match its digest", {"digest": str(self.digest)}
                )
            self.size = self.written
            # Proven content: readers may send the last byte now, not after the fsync below
            # (a 256 MiB fsync takes seconds); their shared descriptor survives the rename.
            self.verified = True
            self._notify()
            if self.spill_from is None:
                assert self.temp is not None  # a cached download has its temp file
                # The commit job owns the descriptor and the temp file from here: a shutdown that
                # cancels this download meanwhile must not close or remove them under it.
                owned, self._fd, self.temp = (self._fd, self.temp), -1, None
                try:
                    await asyncio.shield(loop.run_in_executor(None, self._commit, *owned))
                except OSError as exc:
                    if not is_disk_full(exc):
                        raise
                    self._go_uncached("disk full", exc)
            if self.spill_from is None:
                await self._index.put_blob(str(self.digest), self.written)
        except asyncio.CancelledError as exc:
            self._fail(exc)
            raise
        except Exception as exc:  # noqa: BLE001 - any failure ends this download: its waiters get it from _fail
            self._fail(exc)
            if response is not None:
                log.warning(
                    "download of %s failed after %d bytes: %s", self.digest, self.written, exc or type(exc).__name__
                )
        finally:
            self.finished = True
            self._notify()
            if response is not None:
                response.release()
            self._close_read_fd_if_unused()

    async def _open_temp(self) -> None:
        """The temp file and its shared read descriptor, made on a worker thread (a slow disk does not stall
        the event loop); on a full disk the download is uncached from its start."""
        opening = asyncio.get_running_loop().run_in_executor(None, _new_temp, self._store)
        try:
            self._fd, self.temp, self._read_fd = await asyncio.shield(opening)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            self._go_uncached("disk full", exc)
        except asyncio.CancelledError:  # at shutdown: what the thread makes is removed once it is made
            opening.add_done_callback(functools.partial(_discard_made, self._store))
            raise

    async def wait_finished(self) -> None:
        """Until the download has ended, committed or not (a cluster lock is held until then)."""
        while not self.finished:
            await self._progress.wait()

    def _write_and_hash(self, batch: list[bytes], hasher: hashlib._Hash) -> None:
        self._write(batch)
        _hash(hasher, batch)

    def _write(self, batch: list[bytes]) -> None:
        views = [memoryview(piece) for piece in batch]
        while views:
            done = os.writev(self._fd, views)
            while views and done >= len(views[0]):
                done -= len(views.pop(0))
            if done:
                views[0] = views[0][done:]

    def _commit(self, fd: int, temp: Path) -> None:
        """Mark the temp file verified, fsync it and move it into the store (on a worker thread); on
        failure both go."""
        try:
            try:
                os.fchmod(fd, VERIFIED_MODE)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._store.commit(temp, self.digest)
        except BaseException:
            self._store.discard(temp)
            raise

    def _too_large(self) -> UpstreamInvalid:
        return UpstreamInvalid(
            "upstream blob is larger than max_blob_size", {"digest": str(self.digest), "limit": self.limit}
        )

    async def _reserve(self, incoming: int) -> None:
        """Room for a blob of unknown size, a step ahead of `incoming` bytes: in the cache (evicting
        what it must) and on the disk. Without it the download goes on uncached."""
        assert self.temp is not None
        self.reserved = min(max(2 * self.reserved, incoming + ROOM_STEP), self.limit)
        free = (await asyncio.to_thread(shutil.disk_usage, self.temp.parent)).free
        if free < self.reserved - self.written:
            self._go_uncached("no room", f"{free} bytes free on the disk, {self.reserved - self.written} more needed")
        elif self._make_room is not None and not await self._make_room(self.reserved):
            self._go_uncached("no room", f"the cache cannot make room for {self.reserved} bytes")

    def _go_uncached(self, what: str, why: object) -> None:
        """No room (the disk is full, or the cache): keep streaming from memory, store nothing (the
        temp file goes now)."""
        log.error("%s while caching %s after %d bytes, serving it uncached: %s", what, self.digest, self.written, why)
        self.spill_from = self._memory_start = self.written
        if self._on_uncached is not None:
            self._on_uncached(self)
        self._abandon()

    async def _wait_for_readers(self) -> None:
        """Drop what every reader has sent; while the window is full, wait for the slowest reader."""
        while True:
            parked = {me for me, position in self._positions.items() if self._parked(me, position)}
            moving = [position for me, position in self._positions.items() if me not in parked]
            slowest = min(moving, default=self.written if parked else self._memory_start)
            while self._memory and self._memory_start + len(self._memory[0]) <= slowest:
                chunk = self._memory.popleft()
                for me in parked:
                    offset = self._positions[me] - self._memory_start
                    if 0 <= offset < len(chunk):
                        self._held.setdefault(me, chunk[offset : offset + 1])
                self._memory_start += len(chunk)
            if self.written - self._memory_start <= MEMORY_WINDOW:
                return
            self._drained.clear()
            try:
                await asyncio.wait_for(self._drained.wait(), READER_STALL)
            except TimeoutError:
                raise DownloadFailed(f"no reader moved for {READER_STALL:.0f}s on uncached {self.digest}") from None

    def _parked(self, me: object, position: int) -> bool:
        """A range reader that has sent all but its last byte and waits for verification only: the
        window must not wait for it (it would stall the download it waits for)."""
        end = self._ends.get(me)
        return end is not None and position == end - 1 and not self.verified

    def _from_memory(self, position: int, want: int) -> bytes:
        """Up to `want` bytes at `position` from the in-memory window (empty if already dropped)."""
        offset = self._memory_start
        for chunk in self._memory:
            if position < offset + len(chunk):
                if position < offset:
                    return b""
                start = position - offset
                return chunk[start : start + want]
            offset += len(chunk)
        return b""

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        if not self.ready.done():
            self.ready.set_exception(exc)
        self._abandon()

    def _abandon(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self.temp is not None:
            self._store.discard(self.temp)
            self.temp = None

    def _notify(self) -> None:
        self._progress.set()
        self._progress.clear()

    def attach(self) -> bool:
        """Keep the shared read descriptor open for a reader to come, until `detach`. False when the
        download has ended with no reader left: it has let its descriptor go (the blob is in the store,
        or it failed), so whoever found it here must look there instead."""
        if self.finished and self._readers == 0:
            return False
        self._readers += 1
        return True

    def detach(self) -> None:
        self._readers -= 1
        self._close_read_fd_if_unused()

    def _close_read_fd_if_unused(self) -> None:
        if self.finished and self._readers == 0 and self._read_fd >= 0:
            if self._reader is not None:
                self._reader.close()  # closefd=False: the descriptor is closed below
                self._reader = None
            os.close(self._read_fd)
            self._read_fd = -1

    def _readable(self, end: int | None) -> int:
        """Up to where a reader of `[..., end)` (None: to the blob's end) may send now: all of it once
        verified, else all but its last byte. An unknown size holds back nothing here: the reader's
        chunked body ends only when `read` returns, which is after verification."""
        stop = self.written if end is None else min(self.written, end)
        last = self.size if end is None else end
        if self.verified or last is None:
            return stop
        return min(stop, last - 1)

    @property
    def reader(self) -> BinaryIO:
        """The shared read descriptor as a file object (for sendfile; offsets are always explicit)."""
        if self._reader is None:
            self._reader = os.fdopen(self._read_fd, "rb", buffering=0, closefd=False)
        return self._reader

    @contextlib.contextmanager
    def _following(self, start: int, end: int | None) -> Iterator[object]:
        """One reader of `[start, end)`: pins the blob against eviction and tells the download (when it
        streams uncached) how far this reader has got, through `_positions[token]`."""
        self._readers += 1
        pin = self._store.pin(self.digest)
        me = object()
        self._positions[me] = start
        self._ends[me] = end
        try:
            yield me
        finally:
            pin.release()
            self._readers -= 1
            self._positions.pop(me, None)
            self._ends.pop(me, None)
            self._held.pop(me, None)
            self._drained.set()
            self._close_read_fd_if_unused()

    async def spans(self, start: int, end: int) -> AsyncGenerator[tuple[int, int], None]:
        """`(offset, length)` pieces of `[start, end)` of `reader` as they become readable on disk.
        Stops early where an uncached download's bytes live only in memory (read those with `read`);
        raises DownloadFailed if the download fails first."""
        with self._following(start, end) as me:
            position = start
            while position < end:
                if self.error is not None and not self.verified:
                    raise DownloadFailed(str(self.digest))
                on_disk = end if self.spill_from is None else min(end, self.spill_from)
                if position >= on_disk:
                    return
                available = min(self._readable(end), on_disk)
                if position < available:
                    yield position, available - position
                    position = self._positions[me] = available
                    self._drained.set()
                elif self.verified:
                    return
                elif self.finished:
                    raise DownloadFailed(str(self.digest))
                else:
                    await self._progress.wait()

    async def read(self, start: int = 0, end: int | None = None) -> AsyncGenerator[bytes, None]:
        """Bytes `[start, end)` as they arrive; returns only once the digest checks out (even for no
        bytes at all) and raises DownloadFailed if the download fails first."""
        with self._following(start, end) as me:
            position = start
            while True:
                if self.error is not None and not self.verified:
                    raise DownloadFailed(str(self.digest))
                available = self._readable(end)
                if position < available:
                    want = min(CHUNK, available - position, (end - position) if end is not None else CHUNK)
                    if self.spill_from is not None and position >= self.spill_from:
                        data = self._from_memory(position, want) or self._held.get(me, b"")
                    else:
                        want = min(want, (available if self.spill_from is None else self.spill_from) - position)
                        data = os.pread(self._read_fd, want, position)
                    if not data:
                        raise DownloadFailed(str(self.digest))
                    position += len(data)
                    self._positions[me] = position
                    self._drained.set()
                    yield data
                elif self.verified:
                    return
                elif self.finished:
                    raise DownloadFailed(str(self.digest))
                else:
                    await self._progress.wait()


class Downloads:
    """The downloads in progress, one per digest: later askers join the running one."""

    def __init__(
        self,
        store: BlobStore,
        index: Index,
        tasks: Tasks,
        make_room: MakeRoom | None = None,
        max_blob_size: int = MAX_BLOB_SIZE,
    ) -> None:
        self._store = store
        self._index = index
        self._tasks = tasks  # the app's: a download in flight is cancelled and its temp file removed at shutdown
        self._make_room = make_room
        self._max_blob_size = max_blob_size
        self._active: dict[str, Download] = {}
        self.started = 0
        self.joins = 0
        # Downloads served without caching because the disk was full (for metrics and tests).
        self.uncached = 0

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
                digest,
                self._store,
                self._index,
                source,
                self._room if self._make_room else None,
                self._went_uncached,
                self._max_blob_size,
            )
            self._active[key] = download  # until it ends, or goes uncached (`_went_uncached`)
            self.started += 1
            task = self._tasks.spawn(download.run(open_upstream), f"download {key}")
            task.add_done_callback(lambda _: self._done(key, download))
        else:
            self.joins += 1
        await asyncio.shield(download.ready)
        return download

    async def _room(self, size: int) -> bool:
        """Make room for every download still writing (each counts what it reserved), not just this one."""
        assert self._make_room is not None
        return await self._make_room(sum(d.reserved for d in self._active.values() if not d.verified))

    def _went_uncached(self, download: Download) -> None:
        """A later asker cannot follow an uncached download from its start: it gets its own."""
        self.uncached += 1
        key = str(download.digest)
        if self._active.get(key) is download:
            del self._active[key]

    def _done(self, key: str, download: Download) -> None:
        if self._active.get(key) is download:
            del self._active[key]
