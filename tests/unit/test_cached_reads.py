"""A cached blob sent over TLS is read on the event loop while the page cache holds it (preadv with
RWF_NOWAIT), and on a worker thread, one piece ahead, once the disk has to be waited for or the file
system cannot tell. Every way gives the same bytes, whole and in ranges."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from blobmirror import KeepAlive, Upstream, mirror

from cargohold.cache.download import CHUNK
from cargohold.handlers import sending

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


def _read(fd: int, length: int, offset: int) -> bytes:
    got = sending.read_cached(fd, length, offset)
    assert got is not None
    return bytes(got)


def test_a_partly_cached_piece_is_what_the_cache_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A short read (part of the piece cached, or the end of the file) gives just those bytes."""
    file = tmp_path / "blob"
    file.write_bytes(b"0123456789")
    fd = os.open(file, os.O_RDONLY)
    try:
        assert _read(fd, 4, 3) == b"3456"
        assert _read(fd, 100, 6) == b"6789"
        assert _read(fd, 4, 10) == b""  # the end: the caller says "ended early"
        monkeypatch.setattr(os, "preadv", _refusing(errno.EAGAIN))
        assert sending.read_cached(fd, 4, 0) is None
        monkeypatch.setattr(os, "preadv", _refusing(errno.EIO))
        with pytest.raises(OSError, match="Input/output error"):
            sending.read_cached(fd, 4, 0)
    finally:
        os.close(fd)
