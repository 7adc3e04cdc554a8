"""How a cached file's bytes leave. Over plain TCP a piece goes out in one sendfile call when the
socket takes it at once, and the rest through the loop's sendfile when it does not. Over TLS a piece is
read on the event loop while the page cache holds it (preadv with RWF_NOWAIT), and on a worker thread,
one piece ahead, once the disk has to be waited for or the file system cannot tell. Every way gives the
same bytes, whole and in ranges."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest
from blobmirror import KeepAlive, Mirror, Upstream, mirror

from cargohold import blobsource
from cargohold.cache.download import CHUNK
from cargohold.cache.store import Pin
from cargohold.handlers import sending
from cargohold.oci.digests import Digest

Preadv = Callable[..., int]


def _refusing(err: int) -> Preadv:
    def preadv(fd: int, buffers: list[bytearray], offset: int, flags: int = 0) -> int:
        assert flags == os.RWF_NOWAIT
        raise OSError(err, os.strerror(err))

    return preadv


def _counting_preads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The offsets os.pread (the worker-thread read) was called with."""
    offsets: list[int] = []
    real = os.pread

    def pread(fd: int, length: int, offset: int) -> bytes:
        offsets.append(offset)
        return real(fd, length, offset)

    monkeypatch.setattr(os, "pread", pread)
    return offsets


@pytest.mark.parametrize(
    ("preadv", "on_thread"),
    [
        (None, False),  # the page cache holds the file: no worker thread at all
        (_refusing(errno.EAGAIN), True),  # it would have to wait for the disk
        (_refusing(errno.EOPNOTSUPP), True),  # a file system that cannot say
    ],
    ids=["cached", "disk", "unsupported"],
)
async def test_a_cached_blob_over_tls_is_read_whole_and_in_ranges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, preadv: Preadv | None, on_thread: bool
) -> None:
    upstream = Upstream()
    data = os.urandom(3 * CHUNK + 12345)
    path = f"/v2/library/app/blobs/{upstream.add(data)}"
    async with mirror(tmp_path, upstream, tls=True) as srv, KeepAlive.open(srv.port, srv.client_tls) as conn:
        assert (await conn.request(path)).body == data  # fetched and cached
        await srv.settled()
        if preadv is not None:
            monkeypatch.setattr(os, "preadv", preadv)
        offsets = _counting_preads(monkeypatch)
        assert (await conn.request(path)).body == data
        ranged = await conn.request(path, headers={"Range": f"bytes={CHUNK - 7}-{2 * CHUNK + 3}"})
        assert ranged.status == 206
        assert ranged.body == data[CHUNK - 7 : 2 * CHUNK + 4]
    if on_thread:  # each piece once, in order: the read ahead is not read again
        assert offsets == [0, CHUNK, 2 * CHUNK, 3 * CHUNK, CHUNK - 7, 2 * CHUNK - 7]
    else:
        assert offsets == []


def test_a_piece_the_cache_holds_in_part_is_what_it_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A short read (part of the piece cached, or the end of the file) gives just those bytes; the end
    itself, and any error, are left to the worker thread's plain read to say."""
    file = tmp_path / "blob"
    file.write_bytes(b"0123456789")
    fd = os.open(file, os.O_RDONLY)
    try:
        assert bytes(sending.read_cached(fd, 4, 3) or b"") == b"3456"
        assert bytes(sending.read_cached(fd, 100, 6) or b"") == b"6789"
        assert sending.read_cached(fd, 4, 10) is None
        for err in (errno.EAGAIN, errno.EIO, errno.ENOSYS):
            monkeypatch.setattr(os, "preadv", _refusing(err))
            assert sending.read_cached(fd, 4, 0) is None
    finally:
        os.close(fd)


async def _slow_get(port: int, path: str) -> bytes:
    """GET `path` with a small receive window, reading 64 KiB a millisecond: the server's socket fills."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 16)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = bytearray()
        async with asyncio.timeout(60):
            while len(body) < length:
                body += await reader.read(min(1 << 16, length - len(body)))
                await asyncio.sleep(0.001)
        return bytes(body)
    finally:
        writer.close()


async def test_a_slow_client_over_tcp_gets_the_whole_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces the socket takes only in part (or not at all) are finished by the loop's sendfile."""
    upstream = Upstream()
    data = os.urandom(6 * CHUNK + 321)
    path = f"/v2/library/app/blobs/{upstream.add(data)}"
    short: list[int] = []
    real = os.sendfile

    def sendfile(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        try:
            sent = real(out_fd, in_fd, offset, count)
        except BlockingIOError:
            short.append(0)
            raise
        if sent < count:
            short.append(sent)
        return sent

    async with mirror(tmp_path, upstream) as srv:
        async with KeepAlive.open(srv.port) as conn:
            assert (await conn.request(path)).body == data
        await srv.settled()
        monkeypatch.setattr(os, "sendfile", sendfile)
        assert await _slow_get(srv.port, path) == data
    assert short  # the socket did not take every piece whole


async def _cache(srv: Mirror, path: str, data: bytes) -> None:
    """Pull `path` once through the mirror, so that it is served from the cached file from now on."""
    async with KeepAlive.open(srv.port, srv.client_tls) as conn:
        assert (await conn.request(path)).body == data
    await srv.settled()


async def _cut_off(srv: Mirror, path: str, caplog: pytest.LogCaptureFixture) -> None:
    """GET `path`: the connection is cut before the body is whole (within seconds, not a client's
    timeout later), with the blob logger's warnings captured."""
    with caplog.at_level(logging.WARNING, "cargohold.blobs"):
        async with KeepAlive.open(srv.port, srv.client_tls) as conn:
            async with asyncio.timeout(10):
                with pytest.raises(asyncio.IncompleteReadError):
                    await conn.request(path)


@pytest.mark.parametrize("tls", [False, True], ids=["sendfile", "read"])
async def test_a_cached_file_cut_short_under_the_server_cuts_the_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tls: bool
) -> None:
    """The client would otherwise wait for bytes that never come on a connection kept alive (sendfile
    met the end of the file and the response was ended as if whole), or be told it went away (read)."""
    upstream = Upstream()
    data = os.urandom(3 * CHUNK)
    digest = upstream.add(data)
    path = f"/v2/library/app/blobs/{digest}"
    real_open = blobsource.LocalFile.open

    async def open_then_truncate(digest: Digest, file: Path, pin: Pin) -> blobsource.LocalFile:
        source = await real_open(digest, file, pin)
        os.truncate(file, CHUNK + 5)  # after its size was taken
        return source

    async with mirror(tmp_path, upstream, tls=tls) as srv:
        await _cache(srv, path, data)
        monkeypatch.setattr(blobsource.LocalFile, "open", open_then_truncate)
        await _cut_off(srv, path, caplog)
    assert f"cutting off a client of {digest}" in caplog.text
    assert f"ended at {CHUNK + 5} bytes" in caplog.text


@pytest.mark.parametrize("tls", [False, True], ids=["sendfile", "read"])
async def test_a_cached_file_that_cannot_be_read_cuts_the_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tls: bool
) -> None:
    """A disk error while the client's connection is alive is the server's fault: the client is cut off
    and the error logged, not taken for a client gone (which left the client waiting on a kept-alive
    connection for the rest of the body)."""
    upstream = Upstream()
    data = os.urandom(3 * CHUNK)
    digest = upstream.add(data)
    path = f"/v2/library/app/blobs/{digest}"

    def broken(*args: object) -> NoReturn:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    async with mirror(tmp_path, upstream, tls=tls) as srv:
        await _cache(srv, path, data)
        for call in ("sendfile", "preadv", "pread"):
            monkeypatch.setattr(os, call, broken)
        await _cut_off(srv, path, caplog)
    assert f"cutting off a client of {digest}" in caplog.text
    assert ("sendfile of" if not tls else "Input/output error") in caplog.text


async def test_a_socket_timeout_is_a_connection_gone_and_only_the_deadline_a_stall() -> None:
    """A send failing with the socket's ETIMEDOUT (a TimeoutError too) was taken for the client stalling
    past send_timeout, and logged as such."""

    async def vanished() -> None:
        raise TimeoutError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT))

    with pytest.raises(ConnectionError):
        await sending.within(30.0, vanished())
    with pytest.raises(sending.ClientStalled):
        await sending.within(0.01, asyncio.sleep(5))
    assert await sending.within(1.0, asyncio.sleep(0, "sent")) == "sent"
