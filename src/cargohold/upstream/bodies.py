"""Small upstream answers read whole, never past a size limit: an upstream is not trusted to stop."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp

from cargohold.errors import UpstreamInvalid


async def read_bounded(resp: aiohttp.ClientResponse, limit: int, what: str, detail: Mapping[str, object]) -> bytes:
    """The whole body, refused (UpstreamInvalid) once it passes `limit` bytes, before the rest is read.
    The time it may take is the request's own timeout (`total`)."""
    if resp.content_length is not None and resp.content_length > limit:
        raise UpstreamInvalid(f"{what} is too large", {**detail, "limit": limit})
    body = bytearray()
    async for chunk in resp.content.iter_chunked(65536):
        body += chunk
        if len(body) > limit:
            raise UpstreamInvalid(f"{what} is too large", {**detail, "limit": limit})
    return bytes(body)
