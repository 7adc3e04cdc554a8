"""`workers: N`: a client of worker B streams the blob worker A is downloading, from A's temp file as it grows.

Two cargohold apps in this process on one data_dir with `workers: 2` (so their download locks are
`FileLocks`, as two workers' are; flock locks belong to open files, so they exclude each other within one
process too), each with its own downloads, in front of one upstream that sends the first part of a blob
and then waits for the test to let it go on. Nothing here depends on timing: each step waits for the
state the next one needs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from blobmirror import server_log_fixture  # noqa: F401 - a fixture
from lockholder import hold_in_child, kill

from cargohold.app import build_app
from cargohold.cache.download import CHUNK
from cargohold.cache.filelocks import FileLocks
from cargohold.config import Settings
from cargohold.keys import PROXY
from cargohold.oci.digests import Digest
from cargohold.proxy import PullThrough
from rig.certs import TestCA

SIZE = 4 * CHUNK
# The upstream sends this much, then waits for `go_on`: A has written at least a CHUNK of it by then.
FIRST = 2 * CHUNK


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class GatedUpstream:
    """One blob, sent in two parts: FIRST bytes, then (once `go_on` is set) the rest, or per `ends` for
    the first GETs: "abort" cuts the connection instead of sending the rest."""

    digest: str
    data: bytes
    go_on: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    ends: list[str] = field(default_factory=list)
    first: int = FIRST
    gets: int = 0
    heads: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v2/", self._ping)
        app.router.add_route("*", "/v2/{name:.+}/blobs/{digest}", self._blob)
        return app

    async def _ping(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["digest"] != self.digest:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN", "message": "", "detail": {}}]}, status=404)
        if request.method == "HEAD":
            self.heads += 1
            return web.Response(headers={"Content-Length": str(len(self.data))})
        self.gets += 1
        end = self.ends.pop(0) if self.ends else "rest"
        response = web.StreamResponse()
        response.content_length = len(self.data)
        await response.prepare(request)
        await response.write(self.data[: self.first])
        self.started.set()
        await self.go_on.wait()
        if end == "abort":
            assert request.transport is not None
            request.transport.abort()
            return response
        await response.write(self.data[self.first :])
        await response.write_eof()
        return response


@dataclass
class Workers:
    a: TestServer
    b: TestServer
    upstream: GatedUpstream
    data_dir: Path
    client_tls: ssl.SSLContext | None

    def proxy(self, server: TestServer) -> PullThrough:
        return server.app[PROXY]

    def stored(self) -> list[Path]:
        return [p for p in (self.data_dir / "blobs").rglob("*") if p.is_file()]

    def temp_files(self) -> list[Path]:
        return sorted((self.data_dir / "tmp").iterdir())


@asynccontextmanager
async def two_workers(
    tmp_path: Path, upstream: GatedUpstream, *, tls: bool = False, **config: object
) -> AsyncIterator[Workers]:
    """Two cargohold apps on one data_dir with `workers: 2` (the setting under test), else shipped defaults
    but for `config`; with `tls`, worker B's clients reach it over TLS (its follower copies, no sendfile)."""
    hub = TestServer(upstream.app(), host="127.0.0.1")
    await hub.start_server()
    data_dir = tmp_path / "data"
    upstreams = [{"name": "docker.io", "url": str(hub.make_url(""))}]
    settings = Settings.model_validate({"data_dir": str(data_dir), "workers": 2, "upstreams": upstreams, **config})
    server_tls = client_tls = None
    if tls:
        ca = TestCA.create()
        cert, key = tmp_path / "server.pem", tmp_path / "server.key"
        ca.issue(cert, key, [], ["127.0.0.1"])
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_tls.load_cert_chain(cert, key)
        client_tls = ssl.create_default_context(cadata=ca.pem.decode())
    a = TestServer(build_app(settings), host="127.0.0.1")
    b = TestServer(build_app(settings), host="127.0.0.1")
    await a.start_server()
    await b.start_server(ssl=server_tls)
    try:
        yield Workers(a, b, upstream, data_dir, client_tls)
    finally:
        upstream.go_on.set()
        await b.close()
        await a.close()
        await hub.close()


class Client:
    """One raw HTTP/1.1 exchange, read a piece at a time (to see bytes arrive before the blob is whole)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.headers: dict[str, str] = {}
        self.status = 0

    @classmethod
    @asynccontextmanager
    async def send(
        cls,
        server: TestServer,
        path: str,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> AsyncIterator[Client]:
        assert server.port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=tls)
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        client = cls(reader, writer)
        try:
            yield client
        finally:
            writer.close()

    async def head(self) -> None:
        async with asyncio.timeout(30):
            head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        self.status = int(status_line.split()[1])
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}

    async def body(self, n: int) -> bytes:
        async with asyncio.timeout(30):
            return await self.reader.readexactly(n)


async def _until(what: str, done: Callable[[], bool]) -> None:
    """Until `done()` (checked every few ms, for at most 30 s)."""
    for _ in range(6000):
        if done():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"still waiting for {what} after 30s")


async def _a_downloads(workers: Workers, path: str) -> asyncio.Task[bytes]:
    """A client of worker A starts the download and reads what it can (the test looks at B's client);
    returns once A holds the download's lock (B finds A's publication by itself, whenever it comes)."""

    async def fetch() -> bytes:
        async with Client.send(workers.a, path) as client:
            try:
                await client.head()
                return await client.body(SIZE)
            except (asyncio.IncompleteReadError, ConnectionError):
                return b""

    task = asyncio.ensure_future(fetch())
    await workers.upstream.started.wait()
    await _until("A to hold the download's lock", lambda: any((workers.data_dir / "locks").glob("sha256-*[0-9a-f]")))
    return task


async def _b_follows(server_log: Callable[[], str]) -> None:
    """Until B's claim found the download published (its first look at the lock, made after the publication
    was there) and went on to follow it: nothing is counted before its follower has a byte to send."""
    await _until("B to follow the download", lambda: "following its download" in server_log())


def _publish_an_empty_file(workers: Workers, lock: str) -> Callable[[], None]:
    """What a holder of `lock` (in a child process: `hold_in_child`) runs to publish a temp file of its own."""

    def publish() -> None:
        fd, temp = tempfile.mkstemp(dir=workers.data_dir / "tmp", prefix="dl-")
        published = {"temp": temp, "inode": os.fstat(fd).st_ino, "size": SIZE, "pid": os.getpid(), "source": None}
        out = os.open(f"{lock}.json", os.O_WRONLY | os.O_CREAT, 0o640)
        os.write(out, json.dumps(published).encode())

    return publish


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
async def test_a_client_of_another_worker_streams_the_download_as_it_lands(
    tmp_path: Path, tls: bool, server_log: Callable[[], str]
) -> None:
    data = os.urandom(SIZE)
    upstream = GatedUpstream(digest_of(data), data)
    path = f"/v2/library/app/blobs/{upstream.digest}"
    async with two_workers(tmp_path, upstream, tls=tls) as workers:
        a_client = await _a_downloads(workers, path)
        async with Client.send(workers.b, path, tls=workers.client_tls) as b_client:
            await b_client.head()  # before the upstream sent the rest: B did not wait for A's download to end
            assert b_client.status == 200 and b_client.headers["content-length"] == str(SIZE)
            assert b_client.headers["docker-content-digest"] == upstream.digest
            first = await b_client.body(CHUNK)
            assert first == data[:CHUNK]
            assert not upstream.go_on.is_set()
            upstream.go_on.set()
            rest = await b_client.body(SIZE - CHUNK)
        assert digest_of(first + rest) == upstream.digest
        assert await a_client == data
        assert upstream.gets == 1
        assert workers.proxy(workers.b).peers is not None
        assert workers.proxy(workers.b).peers.waits == {"followed": 1}
        await _until("A's download to land", lambda: len(workers.stored()) == 1)
        assert workers.temp_files() == []


async def test_a_range_and_a_head_follow_the_other_workers_download(
    tmp_path: Path, server_log: Callable[[], str]
) -> None:
    """HEAD answers from A's publication (no upstream HEAD); a range within what landed comes out as
    it lands, its last byte once the digest checks out."""
    data = os.urandom(SIZE)
    upstream = GatedUpstream(digest_of(data), data)
    path = f"/v2/library/app/blobs/{upstream.digest}"
    start, end = CHUNK // 2, CHUNK // 2 + 1000
    async with two_workers(tmp_path, upstream) as workers:
        a_client = await _a_downloads(workers, path)
        async with Client.send(workers.b, path, "HEAD") as head:
            await head.head()
            assert head.status == 200 and head.headers["content-length"] == str(SIZE)
        assert upstream.heads == 0
        async with Client.send(workers.b, path, headers={"Range": f"bytes={start}-{end - 1}"}) as b_client:
            await b_client.head()
            assert b_client.status == 206
            assert b_client.headers["content-range"] == f"bytes {start}-{end - 1}/{SIZE}"
            first = await b_client.body(end - start - 1)  # all but the last byte before the upstream goes on
            upstream.go_on.set()
            last = await b_client.body(1)
        assert first + last == data[start:end]
        assert await a_client == data
        assert upstream.gets == 1


@pytest.mark.parametrize("failure", ["bad digest", "upstream cut"])
async def test_a_follower_in_another_worker_is_cut_off_when_the_download_fails(
    tmp_path: Path, failure: str, server_log: Callable[[], str]
) -> None:
    """The upstream sends bytes that do not match the digest, or breaks the connection halfway: B's
    client, which has bytes already, gets a cut connection (never the whole body), and nothing is cached."""
    data = os.urandom(SIZE)
    if failure == "bad digest":
        upstream = GatedUpstream(digest_of(b"what the upstream should have sent"), data)
    else:
        upstream = GatedUpstream(digest_of(data), data, ends=["abort"])
    path = f"/v2/library/app/blobs/{upstream.digest}"
    async with two_workers(tmp_path, upstream) as workers:
        a_client = await _a_downloads(workers, path)
        async with Client.send(workers.b, path) as b_client:
            await b_client.head()
            assert b_client.status == 200
            assert await b_client.body(CHUNK) == data[:CHUNK]
            upstream.go_on.set()
            with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
                await b_client.body(SIZE - CHUNK)
        assert await a_client == b""
        await _until("A to let go of its lock", lambda: not any((workers.data_dir / "locks").iterdir()))
        assert workers.stored() == [] and workers.temp_files() == []
        assert upstream.gets == 1
        assert "cutting off a client of" in server_log()


async def test_a_download_that_fails_before_a_byte_went_out_is_fetched_by_the_follower(
    tmp_path: Path, server_log: Callable[[], str]
) -> None:
    """A's upstream connection breaks before B's client got a byte (headers included): B downloads the
    blob itself and serves all of it; its wait counts once, as the take-over that served it."""
    data = os.urandom(SIZE)
    upstream = GatedUpstream(digest_of(data), data, ends=["abort"], first=0)
    path = f"/v2/library/app/blobs/{upstream.digest}"
    async with two_workers(tmp_path, upstream) as workers:
        a_client = await _a_downloads(workers, path)
        peers = workers.proxy(workers.b).peers
        assert isinstance(peers, FileLocks)
        lock = peers.key(Digest.parse(upstream.digest))
        await _until("A to publish its download", lambda: os.path.exists(f"{lock}.json"))
        async with Client.send(workers.b, path) as b_client:
            await _b_follows(server_log)
            upstream.go_on.set()
            await b_client.head()
            assert b_client.status == 200
            assert await b_client.body(SIZE) == data
        assert await a_client == b""
        assert upstream.gets == 2
        await _until("B's download to land", lambda: len(workers.stored()) == 1)
        assert peers.waits == {"took_over": 1}


@pytest.mark.parametrize("discarded", [False, True], ids=["killed", "discarded-then-killed"])
async def test_a_follower_whose_holder_failed_before_a_byte_fetches_the_blob_itself_and_counts_once(
    tmp_path: Path, discarded: bool, server_log: Callable[[], str]
) -> None:
    """Another worker took the lock and published its temp file, and B's client follows it. Then the holder is
    killed (SIGKILL: nothing cleaned up, the file stays as it was); or (`discarded`) its download is discarded
    first (the temp file removed unproven) while it still holds the lock, so that B falls back to waiting for
    the lock, and killed once B waits. B's client, which got nothing yet, is served a download of B's own, long
    before `index.peer_wait` (set far above this test's bounds, so only noticing the holder's end can pass).
    That is one wait, counted once as the take-over that served it: not also as followed, and whether or not
    B's claim after the fall-back had to wait for the lock."""
    data = os.urandom(SIZE)
    upstream = GatedUpstream(digest_of(data), data)
    upstream.go_on.set()
    path = f"/v2/library/app/blobs/{upstream.digest}"
    async with two_workers(tmp_path, upstream, index={"peer_wait": "1h"}) as workers:
        peers = workers.proxy(workers.b).peers
        assert isinstance(peers, FileLocks)
        lock = peers.key(Digest.parse(upstream.digest))
        pid = hold_in_child(lock, _publish_an_empty_file(workers, lock))
        async with Client.send(workers.b, path) as b_client:
            try:
                await _b_follows(server_log)
                if discarded:
                    for temp in workers.temp_files():
                        temp.unlink()
                    await _until("B to wait for the lock again", lambda: "waiting for it to land" in server_log())
            finally:
                await asyncio.to_thread(kill, pid)
            await b_client.head()
            assert b_client.status == 200
            assert await b_client.body(SIZE) == data
        assert upstream.gets == 1
        assert peers.waits == {"took_over": 1}
