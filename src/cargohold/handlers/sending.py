"""Sending a blob body to a client under `send_timeout`: a client that takes no piece in time is cut
off, one that went away is let go. Files go out a piece at a time, with sendfile on plain TCP and read
and written under TLS; chunks from a download or a bucket are written as they come."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterable, Awaitable
from typing import BinaryIO, TypeVar

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from cargohold.cache.download import CHUNK
from cargohold.oci.digests import Digest

log = logging.getLogger("cargohold.blobs")
T = TypeVar("T")
STALLED = "cutting off a client of %s: it took no piece of the blob within send_timeout"
# The largest piece one sendfile call may take (pieces grow with the client's rate, see `_next_piece`).
MAX_PIECE = 64 << 20


class ClientStalled(Exception):
    """The client accepted no piece of a blob within `send_timeout`."""


class FileFailed(Exception):
    """A cached file could not be sent whole: it ended before the size it was opened with (changed on
    disk under the server), or reading it failed. The server's fault, not the client's."""


def cut_off(request: web.BaseRequest, message: str, *args: object) -> None:
    """Abort the connection: once the headers are gone, the only honest signal left. Whatever the
    response held (pin, reader of a download) is released by its caller; the download goes on."""
    log.warning(message, *args)
    if request.transport is not None:
        request.transport.abort()


async def within(timeout: float, send: Awaitable[T]) -> T:
    """Await one piece of sending; ClientStalled if the client does not take it in time. A socket's own
    ETIMEDOUT (also a TimeoutError: the peer vanished) is a connection that went away, not a stall."""
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            return await send
    except TimeoutError as exc:
        if deadline.expired():
            raise ClientStalled from None
        raise ConnectionAbortedError(*exc.args) from exc


def blob_headers(digest: Digest) -> dict[str, str]:
    return {
        "Docker-Content-Digest": str(digest),
        "Content-Type": "application/octet-stream",
        "ETag": f'"{digest}"',
        "Accept-Ranges": "bytes",
    }


def blob_response(digest: Digest, span: tuple[int, int] | None, size: int | None) -> web.StreamResponse:
    """The response for a blob's body: 206 with Content-Range for a span, Content-Length when known."""
    response = web.StreamResponse(status=206 if span else 200, headers=blob_headers(digest))
    if span:
        start, end = span
        response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        response.content_length = end - start
    elif size is not None:
        response.content_length = size
    return response


async def write_all(response: web.StreamResponse, chunks: AsyncIterable[bytes], timeout: float) -> None:
    """Write each chunk, each accepted within `timeout`."""
    async for chunk in chunks:
        await within(timeout, response.write(chunk))


async def send_body(
    request: web.BaseRequest, response: web.StreamResponse, digest: Digest, body: Awaitable[None]
) -> web.StreamResponse:
    """Await `body` (the writes of a prepared response), then end the response. A client that stalls
    is cut off; one that went away (a cancelled pull) is normal, and whatever it read goes on without it."""
    try:
        await body
        await response.write_eof()
    except ClientStalled:
        cut_off(request, STALLED, digest)
    except FileFailed as exc:
        cut_off(request, "cutting off a client of %s: %s", digest, exc)
    except ConnectionError:  # reset, or a broken pipe under sendfile
        log.debug("client of %s went away after %d bytes", digest, response.body_length)
    return response


def can_sendfile(request: web.BaseRequest) -> bool:
    """Plain TCP on asyncio's own loop can take sendfile (uvloop has no `loop.sendfile`, `loop: uvloop`);
    TLS needs the bytes in user space."""
    transport = request.transport
    return (
        transport is not None
        and transport.get_extra_info("sslcontext") is None
        and isinstance(asyncio.get_running_loop(), asyncio.BaseEventLoop)
    )


async def send_file(
    request: web.BaseRequest, writer: AbstractStreamWriter, file: BinaryIO, start: int, end: int, timeout: float
) -> None:
    """Send bytes `[start, end)` of `file` a piece at a time, each accepted within `timeout`: with
    sendfile on plain TCP (the response's headers are already out), else read in a worker thread
    and written (`_copy`)."""
    if can_sendfile(request):
        await _sendfile(request, writer, file, start, end, timeout)
    else:
        await _copy(request, writer, file, start, end, timeout)


def _transport_of(request: web.BaseRequest) -> asyncio.Transport:
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("client went away")
    return transport


async def _sendfile(
    request: web.BaseRequest, writer: AbstractStreamWriter, file: BinaryIO, start: int, end: int, timeout: float
) -> None:
    """Pieces start at `CHUNK` and grow with the client's rate (each call costs a few syscalls and a
    timer), see `_next_piece`."""
    loop = asyncio.get_running_loop()
    piece = CHUNK
    while start < end:
        length = min(piece, end - start)
        transport = _transport_of(request)
        began = loop.time()
        sent = _send_now(transport, file, start, length)
        if sent < length:
            try:
                sent += await within(
                    timeout, loop.sendfile(transport, file, start + sent, length - sent, fallback=False)
                )
            except asyncio.SendfileNotAvailableError as exc:  # the first sendfile call failed
                if transport.is_closing():  # what a reset socket gives
                    raise ConnectionResetError(str(exc)) from exc
                raise FileFailed(f"sendfile of {file.name} failed at {start + sent} bytes") from exc
        if sent < length:  # sendfile met the end of the file
            raise FileFailed(f"{file.name} ended at {start + sent} bytes")
        writer.output_size += length  # bytes the writer did not see: counted for the access log
        start += length
        piece = _next_piece(piece, length, loop.time() - began, timeout)


def _send_now(transport: asyncio.Transport, file: BinaryIO, offset: int, length: int) -> int:
    """What the socket takes of the piece at once, in one sendfile call, when the transport holds
    nothing to write first. `loop.sendfile` pauses reading and waits for the socket to be writable
    even after a call that sent everything: several system calls and callbacks per piece, more than
    the copy itself for a piece of a download that fits the socket's buffer."""
    if transport.get_write_buffer_size():
        return 0
    try:
        return os.sendfile(transport.get_extra_info("socket").fileno(), file.fileno(), offset, length)
    except (BlockingIOError, InterruptedError):
        return 0
    except ConnectionError:
        raise
    except OSError:  # anything else is for loop.sendfile to meet and say
        return 0


async def _copy(
    request: web.BaseRequest, writer: AbstractStreamWriter, file: BinaryIO, start: int, end: int, timeout: float
) -> None:
    """`CHUNK`s read and written. A piece the page cache holds is read on the loop (`read_cached`): a
    worker thread would cost more in hand-offs than the copy. Once the disk has to be waited for, the
    next piece is read ahead on a worker thread while this one is encrypted and sent; a client holds
    at most two pieces in memory."""
    loop = asyncio.get_running_loop()
    fd = file.fileno()

    def read(offset: int) -> asyncio.Future[bytes]:
        return loop.run_in_executor(None, os.pread, fd, min(CHUNK, end - offset), offset)

    ahead: asyncio.Future[bytes] | None = None
    try:
        while start < end:
            data: bytes | bytearray | memoryview | None = None
            if ahead is None:
                data = read_cached(fd, min(CHUNK, end - start), start)
            if data is None:
                try:
                    data = await (ahead or read(start))
                except OSError as exc:
                    ahead = None
                    raise FileFailed(f"reading {file.name} at {start} failed: {exc}") from exc
                ahead = read(start + len(data)) if data and start + len(data) < end else None
            if not data:
                raise FileFailed(f"{file.name} ended at {start} bytes")
            start += len(data)
            _transport_of(request)
            await within(timeout, writer.write(data))
    finally:
        # The client went away or stalled: the read ahead is cancelled, or (done) its outcome dropped,
        # seen so that an error in it is not logged as never retrieved.
        if ahead is not None and not ahead.cancel():
            ahead.exception()


def read_cached(fd: int, length: int, offset: int) -> bytearray | memoryview | None:
    """Up to `length` bytes at `offset` if the page cache holds them, without waiting for the disk
    (`RWF_NOWAIT`). None if it would have to be waited for, at the end of the file, or on any error
    (a file system or sandbox without the flag): the worker thread's plain read then says which."""
    buffer = bytearray(length)
    try:
        got = os.preadv(fd, [buffer], offset, os.RWF_NOWAIT)
    except OSError:
        return None
    if not got:
        return None
    return buffer if got == length else memoryview(buffer)[:got]


def _next_piece(piece: int, sent: int, took: float, timeout: float) -> int:
    """At most double the last piece, and no more than the client took in an eighth of the timeout
    at its latest rate (so only a client that slows eightfold within one piece is cut off while
    still reading); between `CHUNK` and `MAX_PIECE`."""
    fits = sent / max(took, 1e-3) * timeout / 8
    return int(max(CHUNK, min(piece * 2, fits, MAX_PIECE)))
