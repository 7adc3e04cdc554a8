"""Sending a blob body to a client under `send_timeout`: a client that takes no piece in time is cut
off, one that went away is let go; both the followers of a download and hits from object storage."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Awaitable

from aiohttp import web

from cargohold.digests import Digest


log = logging.getLogger("cargohold.blobs")
STALLED = "cutting off a client of %s: it took no piece of the blob within send_timeout"


class ClientStalled(Exception):
    """The client accepted no piece of a blob within `send_timeout`."""


def cut_off(request: web.BaseRequest, message: str, *args: object) -> None:
    """Abort the connection: once the headers are gone, the only honest signal left. Whatever the
    response held (pin, reader of a download) is released by its caller; the download goes on."""
    log.warning(message, *args)
    if request.transport is not None:
        request.transport.abort()


async def within(timeout: float, send: Awaitable[object]) -> None:
    """Await one piece of sending; ClientStalled if the client does not take it in time."""
    try:
        async with asyncio.timeout(timeout):
            await send
    except TimeoutError:
        raise ClientStalled from None


def blob_headers(digest: Digest) -> dict[str, str]:
    return {"Docker-Content-Digest": str(digest), "Content-Type": "application/octet-stream", "ETag": f'"{digest}"'}


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
    except ConnectionError:  # reset, or a broken pipe from sendfile to a socket the client closed
        log.debug("client of %s went away after %d bytes", digest, response.body_length)
    return response
