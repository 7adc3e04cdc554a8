"""Every reader of a download gets its last byte only once the digest checks out: a reader of a
range that ends before the blob does, and a reader of no bytes at all (a zero-size blob)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from cargohold.cache.download import Download, DownloadFailed, Downloads
from cargohold.cache.index import SqliteIndex
from cargohold.cache.store import FsBlobStore
from cargohold.oci.digests import Digest
from cargohold.tasks import Tasks

BLOB = bytes(range(256)) * 8_192  # 2 MiB
DIGEST = Digest.parse("sha256:" + hashlib.sha256(BLOB).hexdigest())
EMPTY = Digest.parse("sha256:" + hashlib.sha256(b"").hexdigest())
HELD_AFTER = 1 << 20  # the upstream sends this much, then waits for the test


class Upstream:
    """Serves `body` for any blob: the first HELD_AFTER bytes, then the rest once `gate` opens."""

    def __init__(self) -> None:
        self.body = BLOB
        self.gate = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(len(self.body))})
        await response.prepare(request)
        await response.write(self.body[:HELD_AFTER])
        await self.gate.wait()
        await response.write(self.body[HELD_AFTER:])
        await response.write_eof()
        return response


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[tuple[Upstream, Callable[[Digest], Awaitable[Download]]]]:
    upstream = Upstream()
    app = web.Application()
    app.router.add_get("/blob", upstream.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    index = SqliteIndex(tmp_path / "index.sqlite")
    tasks = Tasks()
    downloads = Downloads(FsBlobStore(tmp_path), index, tasks)
    async with aiohttp.ClientSession() as session:

        async def join(digest: Digest) -> Download:
            return await downloads.join(digest, lambda: session.get(server.make_url("/blob")))

        try:
            yield upstream, join
        finally:
            upstream.gate.set()
            await tasks.close()
            await index.close()
            await server.close()


async def _bytes(download: Download, via: str, start: int, end: int) -> AsyncIterator[bytes]:
    """The range through `read`, or through `spans` (read back from the download's file)."""
    if via == "read":
        async for chunk in download.read(start, end):
            yield chunk
    else:
        async for offset, length in download.spans(start, end):
            yield os.pread(download.reader.fileno(), length, offset)


@pytest.mark.parametrize("via", ["read", "spans"])
@pytest.mark.parametrize("good", [True, False], ids=["good", "corrupt"])
async def test_a_range_holds_back_its_last_byte_until_verified(rig, via: str, good: bool) -> None:  # type: ignore[no-untyped-def]
    upstream, join = rig
    if not good:
        upstream.body = b"\xff" + BLOB[1:]
    download = await join(DIGEST)
    start, end = 1000, 2000  # well inside the first HELD_AFTER bytes the upstream sends
    pieces = _bytes(download, via, start, end)
    got = b""
    while len(got) < end - start - 1:
        got += await asyncio.wait_for(anext(pieces), 30)
    # All of the range is on disk, yet its last byte waits for the digest (the upstream is held).
    assert got == (BLOB if good else upstream.body)[start : end - 1]
    assert not download.verified
    rest = asyncio.ensure_future(anext(pieces))
    upstream.gate.set()
    if good:
        assert await asyncio.wait_for(rest, 30) == BLOB[end - 1 : end]
        assert download.verified
        with pytest.raises(StopAsyncIteration):
            await anext(pieces)
    else:
        with pytest.raises(DownloadFailed):
            await asyncio.wait_for(rest, 30)
        assert not download.verified


@pytest.mark.parametrize("good", [True, False], ids=["empty blob", "declared empty"])
async def test_a_reader_of_no_bytes_returns_only_once_verified(rig, good: bool) -> None:  # type: ignore[no-untyped-def]
    upstream, join = rig
    upstream.body = b""
    upstream.gate.set()
    download = await join(EMPTY if good else DIGEST)
    assert download.size == 0
    if good:
        assert [chunk async for chunk in download.read(0, 0)] == []
        assert download.verified
    else:
        with pytest.raises(DownloadFailed):
            await asyncio.wait_for(anext(aiter(download.read(0, 0))), 30)
