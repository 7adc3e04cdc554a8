"""A blob hit held by object storage: a 307 to a presigned URL, or the bytes streamed through in chunks."""

from __future__ import annotations

import contextlib
import logging

from aiohttp import web

from cargohold.cache.store import Pin, RemoteBlob
from cargohold.digests import Digest
from cargohold.handlers.sending import STALLED, ClientStalled, cut_off, within
from cargohold.keys import SETTINGS

log = logging.getLogger("cargohold.blobs")


async def send_remote(
    request: web.Request, blob: RemoteBlob, digest: Digest, span: tuple[int, int] | None, pin: Pin
) -> web.StreamResponse | None:
    """Serve `span` (None: all) of a stored blob; None when it is gone from storage (fetch it again).

    The pin keeps this replica's eviction away until the last byte went out.
    """
    headers = {"Docker-Content-Digest": str(digest), "Content-Type": "application/octet-stream", "ETag": f'"{digest}"'}
    try:
        url = await blob.redirect_url()
        if url is not None:  # the client sends its Range to the bucket itself
            return web.Response(status=307, headers={**headers, "Location": url})
        start, end = span if span else (0, blob.size)
        chunks = await blob.chunks(start, end)
        if chunks is None:
            return None
        async with contextlib.aclosing(chunks):  # type: ignore[type-var]
            response = web.StreamResponse(status=206 if span else 200, headers=headers)
            response.content_length = end - start
            if span:
                response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{blob.size}"
            await response.prepare(request)
            timeout = request.app[SETTINGS].send_timeout
            try:
                async for chunk in chunks:
                    await within(timeout, response.write(chunk))
            except ClientStalled:
                cut_off(request, STALLED, digest)
                return response
            except ConnectionResetError:
                log.debug("client of %s went away after %d bytes", digest, response.body_length)
                return response
            except Exception as exc:  # noqa: BLE001 - headers are gone: a cut connection is the only signal left
                cut_off(request, "cutting off a client of %s: storage failed mid-stream: %s", digest, exc)
                return response
        await response.write_eof()
        return response
    finally:
        pin.release()
