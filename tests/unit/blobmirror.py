"""An in-process cargohold in front of an in-process upstream, for the blob path's tests: blobs of
given bytes (sent slowly, so a GET follows the download), blobs without a length, blobs that never
end; a raw keep-alive connection to send several requests on one socket; the server's log."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from cargohold.app import build_app
from cargohold.config import Settings
from cargohold.keys import PROXY
from rig.certs import TestCA
from rig.s3 import S3Server

PIECE = 64 << 10


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Upstream:
    """Blobs by digest; `unsized` are sent without Content-Length; `endless` never stop."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    unsized: set[str] = field(default_factory=set)
    endless: set[str] = field(default_factory=set)
    claimed: dict[str, int] = field(default_factory=dict)  # a Content-Length to claim instead
    gets: int = 0  # blob GETs answered

    def add(self, data: bytes, *, sized: bool = True) -> str:
        digest = digest_of(data)
        self.blobs[digest] = data
        if not sized:
            self.unsized.add(digest)
        return digest

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v2/", self._ping)
        app.router.add_get("/v2/{name:.+}/blobs/{digest}", self._blob)
        return app

    async def _ping(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        if digest in self.endless:
            return await self._forever(request)
        data = self.blobs.get(digest)
        if data is None:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN", "message": "", "detail": {}}]}, status=404)
        length = self.claimed.get(digest, len(data))
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": str(length)})
        self.gets += 1
        response = web.StreamResponse()
        if digest not in self.unsized:
            response.content_length = length
        await response.prepare(request)
        for i in range(0, len(data), PIECE):  # slowly enough that a GET follows the download
            await response.write(data[i : i + PIECE])
            await asyncio.sleep(0.001)
        await response.write_eof()
        return response

    async def _forever(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        piece = os.urandom(PIECE)
        for _ in range(1 << 20):  # 64 GiB: "forever" for a test, yet bounded
            await response.write(piece)
        return response


@dataclass
class Mirror:
    server: TestServer
    upstream: Upstream
    data_dir: Path
    client_tls: ssl.SSLContext | None = None  # trusts the mirror's certificate when it speaks TLS

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    @property
    def app(self) -> web.Application:
        return self.server.app

    async def settled(self) -> None:
        """Until no download is in flight (the commit follows the client's last byte)."""
        downloads = self.app[PROXY].downloads
        for _ in range(3000):
            if downloads.in_flight == 0:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("downloads still in flight after 30s")

    def temp_files(self) -> list[Path]:
        return sorted((self.data_dir / "tmp").iterdir())


def _tls(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context for 127.0.0.1 and a client context that trusts it."""
    ca = TestCA.create()
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    ca.issue(cert, key, [], ["127.0.0.1"])
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cadata=ca.pem.decode())


@asynccontextmanager
async def mirror(tmp_path: Path, upstream: Upstream, *, tls: bool = False, **config: Any) -> AsyncIterator[Mirror]:
    """cargohold (shipped defaults but for `config`) in front of `upstream`, both on loopback;
    with `tls`, clients reach it over TLS."""
    hub = TestServer(upstream.app(), host="127.0.0.1")
    await hub.start_server()
    data_dir = tmp_path / "data"
    settings = Settings.model_validate(
        {"data_dir": str(data_dir), "upstreams": [{"name": "docker.io", "url": str(hub.make_url(""))}], **config}
    )
    server_tls, client_tls = _tls(tmp_path) if tls else (None, None)
    server = TestServer(build_app(settings), host="127.0.0.1")
    await server.start_server(ssl=server_tls)
    try:
        yield Mirror(server, upstream, data_dir, client_tls)
    finally:
        await server.close()
        await hub.close()


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


class KeepAlive:
    """One HTTP/1.1 connection, requests sent one after another on it; any reset fails the test."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    @asynccontextmanager
    async def open(cls, port: int, tls: ssl.SSLContext | None = None) -> AsyncIterator[KeepAlive]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
        try:
            yield cls(reader, writer)
        finally:
            writer.close()

    async def request(self, path: str, method: str = "GET", headers: dict[str, str] | None = None) -> Answer:
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
        self._writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        async with asyncio.timeout(60):
            head = await self._reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
            parsed = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
            status = int(status_line.split()[1])
            if method == "HEAD" or status == 304:
                body = b""
            elif parsed.get("transfer-encoding") == "chunked":
                body = await self._chunked()
            else:
                body = await self._reader.readexactly(int(parsed.get("content-length", "0")))
        assert parsed.get("connection", "").lower() != "close", parsed
        return Answer(status, parsed, body)

    async def _chunked(self) -> bytes:
        body = bytearray()
        while size := int((await self._reader.readline()).strip(), 16):
            body += await self._reader.readexactly(size)
            await self._reader.readline()
        await self._reader.readline()
        return bytes(body)


@pytest.fixture(name="server_log")
def server_log_fixture(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[], str]]:
    """The server's log so far; at the end of the test it must hold no traceback."""
    caplog.set_level(logging.INFO)
    yield lambda: caplog.text
    text = caplog.text
    assert "Traceback" not in text and "Unhandled exception" not in text and "Error handling request" not in text, text


@pytest.fixture(name="s3", scope="module")
def s3_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server, one per test module (each test uses its own key prefix)."""
    with S3Server(tmp_path_factory.mktemp("moto")) as server:
        yield server
