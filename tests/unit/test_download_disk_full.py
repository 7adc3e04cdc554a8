"""An uncached download (disk full) keeps at most its memory window ahead of the slowest reader,
serves every reader the right bytes, and stores nothing."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

import cargohold.cache.download as download_module
from cargohold.cache.download import CHUNK, MEMORY_WINDOW, Downloads
from cargohold.cache.index import SqliteIndex
from cargohold.cache.store import FsBlobStore
from cargohold.oci.digests import Digest
from cargohold.tasks import Tasks

BLOB = os.urandom(MEMORY_WINDOW * 2 + 12345)
DIGEST = Digest("sha256", hashlib.sha256(BLOB).hexdigest())


class FullDisk(FsBlobStore):
    """A store on a disk with no space left: no temp file can be made."""

    def new_temp(self) -> tuple[int, Path]:
        raise OSError(errno.ENOSPC, "No space left on device")


async def upstream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Length": str(len(BLOB))})
    await response.prepare(request)
    for i in range(0, len(BLOB), 1 << 16):
        await response.write(BLOB[i : i + (1 << 16)])
    return response


async def test_slow_reader_bounds_memory_and_nothing_is_stored(tmp_path: Path) -> None:
    app = web.Application()
    app.router.add_get("/blob", upstream)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    store = FullDisk(tmp_path)
    index = SqliteIndex(tmp_path / "index.sqlite")
    tasks = Tasks()
    downloads = Downloads(store, index, tasks)
    async with aiohttp.ClientSession() as session:

        async def open_upstream() -> aiohttp.ClientResponse:
            return await session.get(server.make_url("/blob"))

        download = await downloads.join(DIGEST, open_upstream)
        fast, slow = bytearray(), bytearray()
        ahead = 0

        async def read(into: bytearray, pause: float) -> None:
            nonlocal ahead
            async for chunk in download.read():
                into += chunk
                ahead = max(ahead, download.written - len(slow))
                await asyncio.sleep(pause)

        await asyncio.gather(read(fast, 0), read(slow, 0.01))
        assert bytes(fast) == BLOB and bytes(slow) == BLOB
        assert download.verified and download.spill_from == 0
        assert ahead <= MEMORY_WINDOW + 2 * CHUNK  # the download waited for the slow reader
        assert downloads.uncached == 1
        assert store.local_path(DIGEST) is None and list(store.tmp.iterdir()) == []
        # The next asker does not join the uncached download: it gets its own.
        assert downloads.active(DIGEST) is None
    await tasks.close()
    await index.close()
    await server.close()


async def test_a_range_reader_waiting_for_verification_does_not_stall_an_uncached_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A range that ends early parks on its last byte until the digest checks out; the memory window
    moves on without it (keeping that byte aside) instead of stalling the download for everyone."""
    monkeypatch.setattr(download_module, "READER_STALL", 3.0)
    app = web.Application()
    app.router.add_get("/blob", upstream)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    index = SqliteIndex(tmp_path / "index.sqlite")
    tasks = Tasks()
    downloads = Downloads(FullDisk(tmp_path), index, tasks)
    try:
        async with aiohttp.ClientSession() as session:
            download = await downloads.join(DIGEST, lambda: session.get(server.make_url("/blob")))

            async def body(start: int = 0, end: int | None = None) -> bytes:
                return b"".join([chunk async for chunk in download.read(start, end)])

            first, whole = await asyncio.gather(body(0, 1000), body())
            assert first == BLOB[:1000] and whole == BLOB and download.verified
    finally:
        await tasks.close()
        await index.close()
        await server.close()
