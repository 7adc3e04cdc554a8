"""GET/HEAD /v2/<name>/blobs/<digest>, with Range: sendfile from cache, or follow a download.

Bytes go out a piece (`CHUNK`, growing up to `MAX_PIECE` for a client that keeps up) at a time, and a client that does not accept a piece within
`send_timeout` is cut off, so a client that stops reading cannot hold a pin and a descriptor forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import weakref
from pathlib import Path
from typing import BinaryIO

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter

from cargohold.cache.download import CHUNK, Download, DownloadFailed
from cargohold.cache.store import Pin
from cargohold.digests import Digest
from cargohold.errors import RangeInvalid, StorageUnavailable, UpstreamInvalid
from cargohold.handlers.remote import send_remote
from cargohold.handlers.sending import (
    STALLED,
    ClientStalled,
    blob_headers,
    blob_response,
    cut_off,
    send_body,
    within,
    write_all,
)
from cargohold.handlers.target import proxy_of, target_of
from cargohold.keys import CACHE, SETTINGS
from cargohold.proxy import PullThrough
from cargohold.upstream.routes import Target

log = logging.getLogger("cargohold.blobs")
MAX_PIECE = 64 << 20


class BlobFileResponse(web.FileResponse):
    """A cache hit sent with sendfile; its ETag is the digest, not aiohttp's mtime-size tag.

    Holds a pin on the blob until it is sent, so eviction leaves it alone (released when the
    response is dropped unsent, too). Sent in pieces under `send_timeout` (see `_send_file`).
    """

    def __init__(self, path: Path, digest: Digest, pin: Pin, send_timeout: float) -> None:
        super().__init__(path, headers={"Docker-Content-Digest": str(digest), "Content-Type": "application/octet-stream"})
        self._digest = digest
        self._digest_etag = f'"{digest}"'
        self._pin = pin
        self._send_timeout = send_timeout
        weakref.finalize(self, pin.release)

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:  # sent already (the rate limiter does so); aiohttp asks once more after the handler
            return await web.StreamResponse.prepare(self, request)
        try:
            return await super().prepare(request)
        finally:
            self._pin.release()

    async def _sendfile(
        self, request: web.BaseRequest, fobj: BinaryIO, offset: int, count: int
    ) -> AbstractStreamWriter:
        """aiohttp's hook for the body (one sendfile call for the whole file): pieces instead."""
        writer = await web.StreamResponse.prepare(self, request)
        assert writer is not None
        try:
            await _send_file(request, writer, fobj, offset, offset + count, self._send_timeout)
        except ClientStalled:
            cut_off(request, STALLED, self._digest)
            raise ConnectionResetError("client stalled") from None  # aiohttp's signal: no traceback
        await web.StreamResponse.write_eof(self)
        return writer

    @property
    def etag(self) -> None:  # type: ignore[override]
        return None

    @etag.setter
    def etag(self, value: object) -> None:
        self._headers[hdrs.ETAG] = self._digest_etag


def requested_range(request: web.Request, size: int | None) -> tuple[int, int] | None:
    """The single byte range asked for as `[start, end)`, None for the whole blob; 416 if unusable."""
    if hdrs.RANGE not in request.headers:
        return None
    try:
        wanted = request.http_range
    except ValueError:
        raise RangeInvalid("malformed Range header", {"range": request.headers[hdrs.RANGE][:100]}) from None
    if wanted.start is None and wanted.stop is None:
        return None
    if size is None:
        return None  # size not known yet: send it all, which a Range client must accept
    start, stop = wanted.start or 0, wanted.stop
    if start < 0:  # suffix range: the last N bytes
        start, stop = max(size + start, 0), size
    stop = size if stop is None else min(stop, size)
    if start >= size or start >= stop:
        raise RangeInvalid("requested range not satisfiable", {"size": size}, {"Content-Range": f"bytes */{size}"})
    return start, stop


async def get_blob(request: web.Request) -> web.StreamResponse:
    target = target_of(request)
    digest = Digest.parse(request.match_info["digest"])
    proxy = proxy_of(request)
    if request.method == hdrs.METH_HEAD:
        size, request[CACHE] = await proxy.blob_size(target, digest)
        requested_range(request, size)
        return web.Response(headers={**blob_headers(digest), "Content-Length": str(size), "Accept-Ranges": "bytes"})
    found = await proxy.blob(target, digest)
    if not isinstance(found, Path | Download):
        span = requested_range(request, found.size)
        response = await send_remote(request, found, digest, span, proxy.store.pin(digest))
        if response is not None:
            request[CACHE] = "hit"
            return response
        found = await _refetch(proxy, target, digest)
    if isinstance(found, Path):
        pin = proxy.store.pin(digest)
        try:
            size = found.stat().st_size
        except FileNotFoundError:
            pin.release()
            found = await _refetch(proxy, target, digest)
        else:
            request[CACHE] = "hit"
            try:
                requested_range(request, size)
            except RangeInvalid:
                pin.release()
                raise
            return BlobFileResponse(found, digest, pin, request.app[SETTINGS].send_timeout)
    request[CACHE] = "miss"
    return await _follow(request, found, digest)


async def _refetch(proxy: PullThrough, target: Target, digest: Digest) -> Download:
    """A blob removed from the store a moment ago (`cargohold cache prune/rm`, eviction): fetch it again."""
    found = await proxy.fetch_blob(target, digest)
    if not isinstance(found, Download):  # put back by another replica meanwhile: the client's retry finds it
        raise StorageUnavailable("blob moved in the cache while being served; try again", {"digest": str(digest)})
    return found


async def _follow(request: web.Request, download: Download, digest: Digest) -> web.StreamResponse:
    """Stream a blob from the download in progress, at this client's own pace."""
    span = requested_range(request, download.size)
    response = blob_response(digest, span, download.size)
    start, end = span if span else (0, download.size)
    if end == start:  # an empty body has no last byte to hold back: the headers wait for the digest
        try:
            async for _ in download.read(start, end):  # no bytes: returns once verified
                pass
        except DownloadFailed:
            raise UpstreamInvalid(f"upstream blob failed: {download.error}", {"digest": str(digest)}) from None
    writer = await response.prepare(request)
    body = _send_following(request, response, writer, download, start, end)
    try:
        return await send_body(request, response, digest, body)
    except DownloadFailed:
        cut_off(request, "cutting off a client of failed download %s", digest)
        return response


async def _send_following(
    request: web.Request,
    response: web.StreamResponse,
    writer: AbstractStreamWriter | None,
    download: Download,
    start: int,
    end: int | None,
) -> None:
    """The body of a follower: sendfile for what is on disk, then what is left (TLS, or what only
    memory holds) written chunk by chunk."""
    timeout = request.app[SETTINGS].send_timeout
    if end is not None and writer is not None and _can_sendfile(request):
        start = await _sendfile(request, writer, download, start, end, timeout)
    async with contextlib.aclosing(download.read(start, end)) as chunks:
        await write_all(response, chunks, timeout)


def _can_sendfile(request: web.BaseRequest) -> bool:
    """Plain TCP can take sendfile; TLS needs the bytes in user space."""
    transport = request.transport
    return transport is not None and transport.get_extra_info("sslcontext") is None


async def _sendfile(
    request: web.Request, writer: AbstractStreamWriter, download: Download, start: int, end: int, timeout: float
) -> int:
    """Send each span readable on disk straight from the download's file (no copy through Python);
    returns where it stopped: `end`, or where an uncached download's bytes are only in memory."""
    async with contextlib.aclosing(download.spans(start, end)) as spans:
        async for offset, length in spans:
            await _send_file(request, writer, download.reader, offset, offset + length, timeout)
            start = offset + length
    return start


async def _send_file(
    request: web.BaseRequest, writer: AbstractStreamWriter, file: BinaryIO, start: int, end: int, timeout: float
) -> None:
    """Send bytes `[start, end)` of `file` a piece at a time, each accepted within `timeout`: with
    sendfile on plain TCP, else read (in a worker thread) and written. Pieces start at `CHUNK` and
    grow with the client's rate (each call costs a few syscalls and a timer), see `_next_piece`."""
    loop = asyncio.get_running_loop()
    piece = CHUNK
    while start < end:
        length = min(piece, end - start)
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client went away")
        began = loop.time()
        if _can_sendfile(request):
            try:
                await within(timeout, loop.sendfile(transport, file, start, length, fallback=False))
            except asyncio.SendfileNotAvailableError as exc:  # what a reset socket gives a new sendfile
                raise ConnectionResetError(str(exc)) from exc
            writer.output_size += length  # bytes the writer did not see: counted for the access log
        else:
            length = min(length, CHUNK)  # bytes held in memory stay bounded
            data = await loop.run_in_executor(None, os.pread, file.fileno(), length, start)
            if not data:
                raise ConnectionResetError(f"{file.name} ended early")
            await within(timeout, writer.write(data))
            length = len(data)
        start += length
        piece = _next_piece(piece, length, loop.time() - began, timeout)


def _next_piece(piece: int, sent: int, took: float, timeout: float) -> int:
    """At most double the last piece, and no more than the client took in an eighth of the timeout
    at its latest rate (so only a client that slows eightfold within one piece is cut off while
    still reading); between `CHUNK` and `MAX_PIECE`."""
    fits = sent / max(took, 1e-3) * timeout / 8
    return int(max(CHUNK, min(piece * 2, fits, MAX_PIECE)))