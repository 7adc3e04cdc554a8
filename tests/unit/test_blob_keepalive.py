"""Every way a blob leaves the server keeps the client's keep-alive connection, under every rate-limit
preset: a cold GET (a follower of the download), a hit from the filesystem, from a bucket (streamed
or redirected), a Range of each, and HEAD, one after another on one connection. Under a preset with
a connection cap, the rate limit used to send cache hits itself, aiohttp then prepared them again,
and the connection was reset after the first hit (issue 14)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from blobmirror import KeepAlive, Mirror, Upstream, mirror, s3_fixture, server_log_fixture  # noqa: F401 - fixtures

from rig.s3 import S3Server

PRESETS = ["off", "personal", "team", "medium"]


def _storage(kind: str, s3: S3Server, tmp_path: Path) -> dict[str, Any]:
    if kind == "filesystem":
        return {}
    return {"storage": s3.storage(f"{tmp_path.name}/", redirect=kind == "s3-redirect")}


async def _check(answer_of: Callable[..., Any], path: str, data: bytes, *, redirect: bool) -> None:
    """A hit, then a Range of it, then HEAD, on the same connection: the right bytes each."""
    hit = await answer_of(path)
    if redirect:
        assert hit.status == 307, hit
        async with aiohttp.ClientSession() as session, session.get(hit.headers["location"]) as res:
            assert await res.read() == data
    else:
        assert hit.status == 200 and hit.body == data and hit.headers["etag"] == f'"{path.rsplit("/", 1)[1]}"'
    ranged = await answer_of(path, headers={"Range": "bytes=100-199"})
    if not redirect:
        assert ranged.status == 206 and ranged.body == data[100:200], ranged.status
    head = await answer_of(path, method="HEAD")
    assert head.status == 200 and head.headers["content-length"] == str(len(data))


@pytest.mark.parametrize("storage", ["filesystem", "s3-stream", "s3-redirect"])
@pytest.mark.parametrize("preset", PRESETS)
async def test_every_way_a_blob_leaves_keeps_the_connection(
    preset: str, storage: str, s3: S3Server, tmp_path: Path, server_log: Callable[[], str]
) -> None:
    upstream = Upstream()
    whole, partial = os.urandom(3 << 20), os.urandom(2 << 20)
    first, second = upstream.add(whole), upstream.add(partial)
    config = {"rate_limit": {"preset": preset}, **_storage(storage, s3, tmp_path)}
    async with mirror(tmp_path, upstream, **config) as srv, KeepAlive.open(srv.port) as conn:
        await _follow_then_hit(srv, conn, first, whole, storage == "s3-redirect")
        # A Range as the first request: the follower of the download sends the range.
        cold = await conn.request(f"/v2/library/app/blobs/{second}", headers={"Range": "bytes=10-1000009"})
        assert cold.status == 206 and cold.body == partial[10:1000010]
        await srv.settled()
        await _check(conn.request, f"/v2/library/app/blobs/{second}", partial, redirect=storage == "s3-redirect")


async def _follow_then_hit(srv: Mirror, conn: KeepAlive, digest: str, data: bytes, redirect: bool) -> None:
    path = f"/v2/library/app/blobs/{digest}"
    cold = await conn.request(path)
    assert cold.status == 200 and cold.body == data
    await srv.settled()
    await _check(conn.request, path, data, redirect=redirect)
    again = await conn.request(path)  # and the connection still takes a request after all of that
    assert again.status == (307 if redirect else 200)


async def test_blobs_over_tls_keep_the_connection(tmp_path: Path, server_log: Callable[[], str]) -> None:
    """Under TLS a file goes out read in a worker thread and written (no sendfile): the same answers."""
    upstream = Upstream()
    whole = os.urandom(3 << 20)
    digest = upstream.add(whole)
    async with mirror(tmp_path, upstream, tls=True) as srv, KeepAlive.open(srv.port, srv.client_tls) as conn:
        await _follow_then_hit(srv, conn, digest, whole, redirect=False)
