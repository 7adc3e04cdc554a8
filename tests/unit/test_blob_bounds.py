"""A blob whose upstream gives no length is bounded (issue 21 item 11): by `max_blob_size`, and by the
cache's room, which it reserves as it grows; past that room it is served uncached instead of
filling the disk. A length claimed over `max_blob_size` is refused before a byte is written."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from blobmirror import Mirror, Upstream, digest_of, mirror, server_log_fixture  # noqa: F401 - the server_log fixture


def _stored(srv: Mirror, digest: str) -> Path:
    return srv.data_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]


async def _get(srv: Mirror, digest: str) -> tuple[int, bytes | None]:
    """Status and body, or None for the body when the connection was cut mid-way."""
    url = f"http://127.0.0.1:{srv.port}/v2/library/app/blobs/{digest}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session, session.get(url) as res:
        try:
            return res.status, await res.read()
        except aiohttp.ClientPayloadError:
            return res.status, None


async def test_an_endless_blob_is_cut_at_max_blob_size(tmp_path: Path, server_log: Callable[[], str]) -> None:
    upstream = Upstream()
    digest = digest_of(b"never")
    upstream.endless.add(digest)
    async with mirror(tmp_path, upstream, max_blob_size="8MiB") as srv:
        status, body = await _get(srv, digest)
        assert status == 200 and body is None  # the headers went out; then the download failed
        await srv.settled()
        assert srv.temp_files() == [] and not _stored(srv, digest).exists()
        assert "larger than max_blob_size" in server_log()


async def test_a_claimed_length_over_max_blob_size_is_refused(tmp_path: Path, server_log: Callable[[], str]) -> None:
    upstream = Upstream()
    digest = upstream.add(b"x" * 100)
    upstream.claimed[digest] = 9 << 20
    async with mirror(tmp_path, upstream, max_blob_size="8MiB") as srv:
        status, body = await _get(srv, digest)
        assert status == 502 and body is not None and b"max_blob_size" in body
        assert srv.temp_files() == []


@pytest.mark.parametrize("room", [True, False], ids=["room", "no room"])
async def test_an_unsized_blob_is_cached_only_with_room(
    room: bool, tmp_path: Path, server_log: Callable[[], str]
) -> None:
    upstream = Upstream()
    data = os.urandom(3 << 20)
    digest = upstream.add(data, sized=False)
    # Without room: a cache smaller than the first step a download of unknown size reserves (64 MiB).
    cache = {} if room else {"cache": {"max_size": "16MiB"}}
    async with mirror(tmp_path, upstream, **cache) as srv:
        assert await _get(srv, digest) == (200, data)
        await srv.settled()
        assert _stored(srv, digest).exists() is room
        assert srv.temp_files() == []
        assert ("no room while caching" in server_log()) is not room
        assert await _get(srv, digest) == (200, data)  # and served again, from cache or not
