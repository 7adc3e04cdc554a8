"""A blob hit held by object storage: a 307 to a presigned URL, or the bytes streamed through in chunks."""

from __future__ import annotations

import contextlib

from aiohttp import web

from cargohold.cache.store import Pin, RemoteBlob
from cargohold.digests import Digest
from cargohold.handlers.sending import blob_headers, blob_response, cut_off, send_body, write_all
from cargohold.keys import SETTINGS


async def send_remote(
    request: web.Request, blob: RemoteBlob, digest: Digest, span: tuple[int, int] | None, pin: Pin
) -> web.StreamResponse | None:
    """Serve `span` (None: all) of a stored blob; None when it is gone from storage (fetch it again).

    The pin keeps this replica's eviction away until the last byte went out.
    """
    try:
        url = await blob.redirect_url()
        if url is not None:  # the client sends its Range to the bucket itself
            return web.Response(status=307, headers={**blob_headers(digest), "Location": url})
        start, end = span if span else (0, blob.size)
        chunks = await blob.chunks(start, end)
        if chunks is None:
            return None
        async with contextlib.aclosing(chunks):  # type: ignore[type-var]
            response = blob_response(digest, span, blob.size)
            await response.prepare(request)
            try:
                return await send_body(request, response, digest, write_all(response, chunks, request.app[SETTINGS].send_timeout))
            except Exception as exc:  # noqa: BLE001 - headers are gone: a cut connection is the only signal left
                cut_off(request, "cutting off a client of %s: storage failed mid-stream: %s", digest, exc)
                return response
    finally:
        pin.release()
