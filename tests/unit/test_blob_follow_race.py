"""A client that joins a download just as it ends still gets the whole blob.

A download lets its shared read descriptor go once it has ended with no reader. A joiner used to
find the download, await something else (the upstream HEAD that confirms the blob for its own
repository, or a peer fetch handing the download on), and only then start reading: when the
download ended in between, it read from a closed descriptor (`ValueError: negative file
descriptor`) after its 200 headers were out, and the 500 that followed went out as the rest of the
body. Found by the herd test in CI: a client got a 200 whose body was an error document.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from blobmirror import KeepAlive, Upstream, digest_of, mirror, server_log_fixture  # noqa: F401 - a fixture

from cargohold.cache.download import Download, Downloads
from cargohold.keys import PROXY
from cargohold.oci.digests import Digest
from cargohold.pull.links import Kind, Links
from cargohold.upstream.repository import Remote


async def _ended(downloads: Downloads, download: Download) -> None:
    """Until the download has ended and is no longer joinable (the client it had is done by then)."""
    await download.wait_finished()
    for _ in range(1000):
        if downloads.active(download.digest) is None:
            await asyncio.sleep(0.05)  # the other client's handler lets go of the download
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the download was still joinable 10s after it ended")


def _join_late(monkeypatch: pytest.MonkeyPatch) -> None:
    """Joins hand the download on only once it has ended, as a peer fetch's hand-off can."""
    join = Downloads.join

    async def join_late(self: Downloads, *args: object, **kwargs: object) -> Download:
        download = await join(self, *args, **kwargs)  # type: ignore[arg-type]
        await _ended(self, download)
        return download

    monkeypatch.setattr(Downloads, "join", join_late)


async def test_a_joiner_that_confirms_while_the_download_ends_gets_the_blob(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server_log: Callable[[], str]
) -> None:
    """The second repository's client joins the download, then waits for the HEAD that confirms the
    blob there; the download ends (its one other reader done) before that HEAD comes back."""
    upstream = Upstream()
    data = os.urandom(256 << 10)
    digest = upstream.add(data)
    async with mirror(tmp_path, upstream) as srv:
        proxy = srv.app[PROXY]
        confirm = Links.confirm

        async def confirm_after_the_end(self: Links, remote: Remote, wanted: Digest, kind: Kind) -> None:
            download = proxy.downloads.active(wanted)
            if download is not None:
                await _ended(proxy.downloads, download)
            await confirm(self, remote, wanted, kind)

        monkeypatch.setattr(Links, "confirm", confirm_after_the_end)
        async with KeepAlive.open(srv.port) as first, KeepAlive.open(srv.port) as second:
            one = asyncio.ensure_future(first.request(f"/v2/library/app/blobs/{digest}"))
            for _ in range(10_000):  # until the first client's download has started
                if proxy.downloads.active(Digest.parse(digest)) is not None:
                    break
                await asyncio.sleep(0.001)
            two = await second.request(f"/v2/library/other/blobs/{digest}")
            assert (await one).body == data
        assert two.status == 200 and two.body == data
        await srv.settled()
        assert upstream.gets == 1


async def test_a_download_that_ended_before_it_was_followed_is_served_from_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server_log: Callable[[], str]
) -> None:
    """A join that hands the download on only after it ended (as a peer fetch can): the blob it
    landed is served from the store, without a second upstream GET."""
    upstream = Upstream()
    data = os.urandom(256 << 10)
    digest = upstream.add(data)
    _join_late(monkeypatch)
    async with mirror(tmp_path, upstream) as srv, KeepAlive.open(srv.port) as conn:
        answer = await conn.request(f"/v2/library/app/blobs/{digest}")
        assert answer.status == 200 and answer.body == data
        await srv.settled()
        assert upstream.gets == 1


async def test_a_download_that_failed_before_it_was_followed_is_an_error_not_a_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server_log: Callable[[], str]
) -> None:
    """The upstream sent bytes that do not match the digest, and the download ended before its joiner
    could follow it: the client is told so (502), and the upstream is not asked again at once."""
    upstream = Upstream()
    data = os.urandom(64 << 10)
    digest = digest_of(b"what the upstream should have sent")
    upstream.blobs[digest] = data
    _join_late(monkeypatch)
    async with mirror(tmp_path, upstream) as srv, KeepAlive.open(srv.port) as conn:
        answer = await conn.request(f"/v2/library/app/blobs/{digest}")
        assert answer.status == 502 and b"does not match its digest" in answer.body
        assert upstream.gets == 1
