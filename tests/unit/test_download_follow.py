"""A follower of a download gets its whole body once the digest checks out, without waiting for the
fsync and rename into the store, and keeps it even when that commit then fails."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import threading
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from cargohold.blobsource import failure_of
from cargohold.cache.download import Download, Downloads
from cargohold.cache.index import SqliteIndex
from cargohold.cache.store import FsBlobStore
from cargohold.errors import UpstreamInvalid
from cargohold.oci.digests import Digest
from cargohold.tasks import Tasks

BLOB = bytes(range(256)) * 12_000  # 3 MiB: several chunks
DIGEST = Digest.parse("sha256:" + hashlib.sha256(BLOB).hexdigest())


class GatedStore(FsBlobStore):
    """Commits wait for `gate` (a slow fsync), or fail with `fail_with`."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = threading.Event()
        self.committing = threading.Event()
        self.fail_with: OSError | None = None

    def commit(self, temp: Path, digest: Digest) -> int:
        self.committing.set()
        if not self.gate.wait(30):
            raise TimeoutError("test never opened the gate")
        if self.fail_with is not None:
            raise self.fail_with
        return super().commit(temp, digest)


@pytest.fixture
async def upstream():
    async def blob(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(len(BLOB))})
        await response.prepare(request)
        for i in range(0, len(BLOB), 256 * 1024):
            await response.write(BLOB[i : i + 256 * 1024])
        return response

    app = web.Application()
    app.router.add_get("/blob", blob)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    async with aiohttp.ClientSession() as session:
        yield lambda: session.get(server.make_url("/blob"))
    await server.close()


async def _follow(downloads: Downloads, store: GatedStore, opener) -> bytes:  # type: ignore[no-untyped-def]
    download = await downloads.join(DIGEST, opener)
    return b"".join([chunk async for chunk in download.read(0, download.size)])


async def test_follower_finishes_before_the_commit(tmp_path: Path, upstream) -> None:  # type: ignore[no-untyped-def]
    store = GatedStore(tmp_path)
    index = SqliteIndex(tmp_path / "index.sqlite")
    tasks = Tasks()
    downloads = Downloads(store, index, tasks)
    try:
        body = await asyncio.wait_for(_follow(downloads, store, upstream), 30)
        assert body == BLOB
        assert store.local_path(DIGEST) is None  # the whole body went out; the commit is held at the gate
        download = downloads.active(DIGEST)
        assert download is not None
        store.gate.set()
        await asyncio.wait_for(download.wait_finished(), 30)
        assert store.local_path(DIGEST) is not None
        assert store.local_path(DIGEST).read_bytes() == BLOB  # type: ignore[union-attr]
    finally:
        store.gate.set()
        await tasks.close()
        await index.close()


async def test_follower_keeps_a_verified_body_when_the_commit_fails(tmp_path: Path, upstream) -> None:  # type: ignore[no-untyped-def]
    store = GatedStore(tmp_path)
    store.fail_with = OSError("disk full")
    index = SqliteIndex(tmp_path / "index.sqlite")
    tasks = Tasks()
    downloads = Downloads(store, index, tasks)
    try:
        download = await downloads.join(DIGEST, upstream)
        reader = download.read(0, download.size)
        first = await reader.__anext__()  # a follower in the middle of the body
        await asyncio.wait_for(asyncio.to_thread(store.committing.wait, 30), 30)
        store.gate.set()
        await asyncio.wait_for(download.wait_finished(), 30)
        assert download.error is not None and download.verified
        rest = b"".join([chunk async for chunk in reader])
        assert first + rest == BLOB
        assert store.local_path(DIGEST) is None  # nothing unsynced was kept
    finally:
        store.gate.set()
        await tasks.close()
        await index.close()


async def test_a_shutdown_during_the_commit_leaves_the_commit_its_file(tmp_path: Path, upstream) -> None:  # type: ignore[no-untyped-def]
    """Shutdown cancels a download whose commit job (a worker thread) is running. The job owns the
    descriptor and the temp file: closing them under it could close another file's descriptor
    (EBADF seen in CI), and removing the temp file lost the verified blob."""
    store = GatedStore(tmp_path)
    index = SqliteIndex(tmp_path / "index.sqlite")
    tasks = Tasks()
    downloads = Downloads(store, index, tasks)
    try:
        download = await downloads.join(DIGEST, upstream)
        await asyncio.wait_for(asyncio.to_thread(store.committing.wait, 30), 30)
        await tasks.close()  # as at shutdown: the download is cancelled mid-commit
        assert download.finished and isinstance(download.error, asyncio.CancelledError)
        store.gate.set()
        for _ in range(3000):
            if store.local_path(DIGEST) is not None:
                break
            await asyncio.sleep(0.01)
        assert store.local_path(DIGEST).read_bytes() == BLOB  # type: ignore[union-attr]
        assert list(store.tmp.iterdir()) == []
    finally:
        store.gate.set()
        await tasks.close()
        await index.close()


async def test_an_upstream_of_tiny_chunks_is_cached_whole(tmp_path: Path) -> None:
    """Thousands of 512-byte HTTP chunks: batches stay within what one writev takes (IOV_MAX)."""

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for i in range(0, len(BLOB), 512):
            await response.write(BLOB[i : i + 512])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/blob", chunked)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    index = SqliteIndex(tmp_path / "index.sqlite")
    store = FsBlobStore(tmp_path)
    tasks = Tasks()
    downloads = Downloads(store, index, tasks)
    try:
        async with aiohttp.ClientSession() as session:
            download = await downloads.join(DIGEST, lambda: session.get(server.make_url("/blob")))
            got = b"".join([chunk async for chunk in download.read()])
            await download.wait_finished()
        assert got == BLOB and download.error is None
        path = store.local_path(DIGEST)
        assert path is not None and path.read_bytes() == BLOB
    finally:
        await tasks.close()
        await index.close()
        await server.close()


async def test_the_temp_file_is_made_off_the_event_loop(tmp_path: Path, upstream) -> None:  # type: ignore[no-untyped-def]
    """Creating it touches the disk (a directory entry, two opens): a slow disk must not stall the loop."""
    made_on: list[threading.Thread] = []

    class Recording(FsBlobStore):
        def new_temp(self) -> tuple[int, Path]:
            made_on.append(threading.current_thread())
            return super().new_temp()

    index = SqliteIndex(tmp_path / "index.sqlite")
    async with Tasks() as tasks:
        download = await Downloads(Recording(tmp_path), index, tasks).join(DIGEST, upstream)
        await asyncio.wait_for(download.wait_finished(), 30)
    await index.close()
    assert download.verified and download.error is None
    assert made_on and made_on[0] is not threading.main_thread()


async def test_a_temp_file_made_as_shutdown_cancels_the_download_is_removed(tmp_path: Path, upstream) -> None:  # type: ignore[no-untyped-def]
    entered, gate, made = threading.Event(), threading.Event(), threading.Event()

    class Slow(FsBlobStore):
        def new_temp(self) -> tuple[int, Path]:
            entered.set()
            gate.wait(30)
            try:
                return super().new_temp()
            finally:
                made.set()

    store = Slow(tmp_path)
    index = SqliteIndex(tmp_path / "index.sqlite")
    tasks = Tasks()
    joining = asyncio.create_task(Downloads(store, index, tasks).join(DIGEST, upstream))
    await asyncio.to_thread(entered.wait, 30)
    await tasks.close()  # returns without waiting for the thread
    gate.set()
    await asyncio.gather(joining, return_exceptions=True)
    await asyncio.to_thread(made.wait, 30)
    for _ in range(200):  # until the thread has made the file and the loop has removed it
        if not any(store.tmp.iterdir()):
            break
        await asyncio.sleep(0.05)
    await index.close()
    assert list(store.tmp.iterdir()) == []


async def test_a_failed_downloads_joiners_are_told_what_failed_in_our_words_only(tmp_path: Path) -> None:
    """A joiner of a download that failed was told `str(error)`: an OSError names a path in data_dir
    (and a connection error the host it failed at). Our own refusals say what was wrong."""
    index = SqliteIndex(tmp_path / "index.db")
    download = Download(DIGEST, FsBlobStore(tmp_path / "data"), index)
    download.error = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "data" / "tmp" / "blob.x"))
    refused = failure_of(download)
    assert refused.message == "upstream blob failed: the download failed" and str(tmp_path) not in str(refused.detail)
    download.error = UpstreamInvalid("upstream sent a blob that does not match its digest", {"digest": str(DIGEST)})
    assert failure_of(download).message == "upstream blob failed: upstream sent a blob that does not match its digest"
    await index.close()
