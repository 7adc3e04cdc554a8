"""A blob ready to leave the server: one object that holds what keeps it (a pin, an open file), knows
its size, digest and how the cache answered, and sends itself.

Four ways a body leaves: a local file (sendfile on plain TCP, read and written under TLS), an object in a
bucket (streamed through, or a redirect to a presigned URL), a download in progress that the
client follows at its own pace, or another worker's download, followed through its temp file.
A HEAD answers from the size alone. `send` writes the whole response before it returns, so
whoever awaits it (the rate limit's connection slot) holds on until the client has its bytes,
and the response aiohttp gets back is already finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter

from cargohold.cache.download import Download, DownloadFailed
from cargohold.cache.peerfile import PeerFile
from cargohold.cache.store import Pin, RemoteBlob
from cargohold.errors import RegistryError, StorageUnavailable, UpstreamInvalid
from cargohold.handlers.sending import (
    blob_headers,
    blob_response,
    can_sendfile,
    cut_off,
    send_body,
    send_file,
    write_all,
)
from cargohold.oci.digests import Digest

Span = tuple[int, int] | None
log = logging.getLogger("cargohold.blobs")


class BlobSource:
    """A blob of known digest, `size` (None: a download whose upstream gave no length) and cache
    outcome ("hit" or "miss"). Use as `async with`: what it holds is let go when the block ends,
    whether or not a body was sent. This base answers HEAD; a body is each subclass's own."""

    def __init__(self, digest: Digest, size: int | None, cache: str, pin: Pin | None = None) -> None:
        self.digest = digest
        self.size = size
        self.cache = cache
        self._pin = pin

    async def send(self, request: web.Request, span: Span, timeout: float) -> web.StreamResponse:
        """The answer to `request` for `span` (None: the whole blob), body written and finished; a
        client that takes no piece of it within `timeout` is cut off."""
        if request.method == hdrs.METH_HEAD:
            headers = blob_headers(self.digest)
            if self.size is not None:
                headers[hdrs.CONTENT_LENGTH] = str(self.size)
            return web.Response(headers=headers)
        return await self._send_body(request, span, timeout)

    async def _send_body(self, request: web.Request, span: Span, timeout: float) -> web.StreamResponse:
        raise NotImplementedError(f"{type(self).__name__} has no body to send")

    async def _send_instead(
        self, request: web.Request, span: Span, timeout: float, again: Callable[[], Awaitable[BlobSource]]
    ) -> web.StreamResponse:
        """The body from the source `again` gives, when this one can no longer send it (nothing sent yet)."""
        async with await again() as other:
            self.cache = other.cache
            return await other.send(request, span, timeout)

    async def close(self) -> None:
        if self._pin is not None:
            self._pin.release()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class Described(BlobSource):
    """A blob not cached, sized by the upstream's HEAD: what a HEAD request gets without a download."""

    def __init__(self, digest: Digest, size: int) -> None:
        super().__init__(digest, size, "miss")


class LocalFile(BlobSource):
    """A cached file, already open (an eviction that unlinks it now cannot cut the body short)."""

    def __init__(self, digest: Digest, file: BinaryIO, size: int, pin: Pin) -> None:
        super().__init__(digest, size, "hit", pin)
        self._file = file

    @classmethod
    async def open(cls, digest: Digest, path: Path, pin: Pin) -> LocalFile:
        """The file at `path`, opened and sized on a worker thread (both may wait on the disk); the pin
        is released if it cannot be opened (FileNotFoundError: evicted since it was found)."""
        try:
            file = await asyncio.to_thread(open, path, "rb", buffering=0)
        except BaseException:
            pin.release()
            raise
        source = cls(digest, file, 0, pin)
        try:
            source.size = (await asyncio.to_thread(os.fstat, file.fileno())).st_size
        except BaseException:
            await source.close()
            raise
        return source

    async def _send_body(self, request: web.Request, span: Span, timeout: float) -> web.StreamResponse:
        assert self.size is not None
        start, end = span or (0, self.size)
        response = blob_response(self.digest, span, self.size)
        writer = await response.prepare(request)
        assert writer is not None  # a fresh response is prepared here, once
        return await send_body(
            request, response, self.digest, send_file(request, writer, self._file, start, end, timeout)
        )

    async def close(self) -> None:
        await super().close()
        # Shielded: a request cancelled meanwhile must not leave the descriptor open.
        await asyncio.shield(asyncio.to_thread(self._file.close))


class BucketObject(BlobSource):
    """A cached object in a bucket. `refetch` (from the proxy) gives the blob again when the object
    is gone by the time its body is asked for (removed by another replica or the cache CLI)."""

    def __init__(
        self,
        digest: Digest,
        blob: RemoteBlob,
        pin: Pin,
        refetch: Callable[[], Awaitable[BlobSource]] | None,
    ) -> None:
        super().__init__(digest, blob.size, "hit", pin)
        self._blob = blob
        self._refetch = refetch

    async def _send_body(self, request: web.Request, span: Span, timeout: float) -> web.StreamResponse:
        url = await self._blob.redirect_url()
        if url is not None:  # the client sends its Range to the bucket itself
            return web.Response(status=307, headers={**blob_headers(self.digest), hdrs.LOCATION: url})
        start, end = span or (0, self._blob.size)
        chunks = await self._blob.chunks(start, end)
        if chunks is None:
            if self._refetch is None:
                raise StorageUnavailable(
                    "blob moved in the cache while being served; try again", {"digest": str(self.digest)}
                )
            return await self._send_instead(request, span, timeout, self._refetch)
        async with contextlib.aclosing(chunks):  # type: ignore[type-var]
            response = blob_response(self.digest, span, self._blob.size)
            await response.prepare(request)
            try:
                return await send_body(request, response, self.digest, write_all(response, chunks, timeout))
            except Exception as exc:  # noqa: BLE001 - headers are gone: a cut connection is the only signal left
                cut_off(request, "cutting off a client of %s: storage failed mid-stream: %s", self.digest, exc)
                return response


def failure_of(download: Download) -> UpstreamInvalid:
    """What a client of a failed download is told when none of the body has gone out yet: our own
    errors' messages (wrong digest, too large), else no more than that it failed. Anything else (an
    OSError names a path in data_dir, a connection error a host) is the log's."""
    error = download.error
    why = error.message if isinstance(error, RegistryError) else "the download failed"
    return UpstreamInvalid(f"upstream blob failed: {why}", {"digest": str(download.digest)})


class Follower(BlobSource):
    """A blob being downloaded now, sent as it arrives: sendfile for what is on disk (plain TCP), then
    what is left written chunk by chunk. Each reader pins the blob while it reads (`Download.read`)."""

    def __init__(self, download: Download) -> None:
        """Use `of`: a follower holds the download's read descriptor from the start."""
        super().__init__(download.digest, download.size, "miss")
        self._download = download

    @classmethod
    def of(cls, download: Download) -> Follower | None:
        """A follower holding the download's read descriptor open until it closes; None when the download
        has already ended and let it go (the blob is in the store then, or the download failed). Call it
        as soon as the download is found: a download that ends with no follower lets its descriptor go."""
        return cls(download) if download.attach() else None

    async def close(self) -> None:
        await super().close()
        self._download.detach()

    async def _send_body(self, request: web.Request, span: Span, timeout: float) -> web.StreamResponse:
        download = self._download
        response = blob_response(self.digest, span, download.size)
        start, end = span or (0, download.size)
        if end == start:  # an empty body has no last byte to hold back: the headers wait for the digest
            try:
                async for _ in download.read(start, end):  # no bytes: returns once verified
                    pass
            except DownloadFailed:
                raise failure_of(download) from None
        writer = await response.prepare(request)
        try:
            return await send_body(
                request, response, self.digest, self._follow(request, response, writer, start, end, timeout)
            )
        except DownloadFailed:
            cut_off(request, "cutting off a client of failed download %s", self.digest)
            return response

    async def _follow(
        self,
        request: web.Request,
        response: web.StreamResponse,
        writer: AbstractStreamWriter | None,
        start: int,
        end: int | None,
        timeout: float,
    ) -> None:
        download = self._download
        if end is not None and writer is not None and can_sendfile(request):
            async with contextlib.aclosing(download.spans(start, end)) as spans:
                async for offset, length in spans:
                    await send_file(request, writer, download.reader, offset, offset + length, timeout)
                    start = offset + length
        async with contextlib.aclosing(download.read(start, end)) as chunks:
            await write_all(response, chunks, timeout)


class PeerFollower(BlobSource):
    """A blob another worker of this machine is downloading, sent from its temp file as it grows (see
    `cache/peerfile.py`): the headers wait for the first piece that may go out, so a download that fails
    before it gives the client to `fallback` (today's wait, or a download here); once bytes are out, a
    failure cuts the connection, as for a `Follower`. Files go out as `LocalFile`'s do, a piece at a time."""

    def __init__(
        self,
        digest: Digest,
        file: PeerFile,
        pin: Pin,
        patience: float,
        fallback: Callable[[], Awaitable[BlobSource]],
    ) -> None:
        super().__init__(digest, file.size, "miss", pin)
        self._file = file
        self._patience = patience
        self._fallback = fallback

    async def _send_body(self, request: web.Request, span: Span, timeout: float) -> web.StreamResponse:
        assert self.size is not None
        start, end = span or (0, self.size)
        async with contextlib.aclosing(self._file.spans(start, end, self._patience)) as spans:
            try:
                first = await anext(spans, None)
            except DownloadFailed as exc:
                log.info("%s; serving %s without following it", exc, self.digest)
                self._file.close()  # let go of that file now: what comes next may take long
                return await self._send_instead(request, span, timeout, self._fallback)
            response = blob_response(self.digest, span, self.size)
            writer = await response.prepare(request)
            assert writer is not None  # a fresh response is prepared here, once
            try:
                return await send_body(
                    request, response, self.digest, self._send(request, writer, first, spans, timeout)
                )
            except DownloadFailed as exc:
                cut_off(request, "cutting off a client of %s: %s", self.digest, exc)
                return response

    async def _send(
        self,
        request: web.Request,
        writer: AbstractStreamWriter,
        first: tuple[int, int] | None,
        spans: AsyncIterator[tuple[int, int]],
        timeout: float,
    ) -> None:
        piece = first
        while piece is not None:
            offset, length = piece
            await send_file(request, writer, self._file.file, offset, offset + length, timeout)
            piece = await anext(spans, None)

    async def close(self) -> None:
        await super().close()
        self._file.close()
