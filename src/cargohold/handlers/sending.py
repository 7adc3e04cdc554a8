"""Sending a body to a client under `send_timeout`: a client that takes no piece in time is cut off."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

from aiohttp import web


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
