"""build_app(settings): one independent cargohold instance; every resource lives in its cleanup context."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from cargohold import __version__
from cargohold.cache.download import Downloads
from cargohold.cache.index import SqliteIndex
from cargohold.cache.store import FsBlobStore
from cargohold.config import Settings
from cargohold.keys import PROXY, RATE_LIMITER, SETTINGS
from cargohold.middleware.observe import observe, stamp_headers
from cargohold.middleware.ratelimit import ratelimit
from cargohold.proxy import PullThrough
from cargohold.ratelimit.limiter import RateLimiter
from cargohold.ratelimit.storage import open_storage
from cargohold.routes import add_routes
from cargohold.upstream.client import UpstreamClient
from cargohold.upstream.routes import Router

log = logging.getLogger("cargohold.app")

FLUSH_INTERVAL = 5.0


def build_app(settings: Settings) -> web.Application:
    # Clients only ever send small requests to a read-only mirror.
    app = web.Application(middlewares=[observe, ratelimit], client_max_size=64 * 1024)
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_rate_limiter)
    app.cleanup_ctx.append(_pull_through)
    app.on_response_prepare.append(stamp_headers)
    add_routes(app)
    return app


async def _rate_limiter(app: web.Application) -> AsyncIterator[None]:
    """Rate-limit counters in memory or in Redis, shared by replicas."""
    config = app[SETTINGS].rate_limit
    async with open_storage(config.storage) as storage:
        app[RATE_LIMITER] = RateLimiter(config, storage)
        yield


async def _pull_through(app: web.Application) -> AsyncIterator[None]:
    """Storage, index, upstream sessions and the proxy, opened at start and closed at shutdown."""
    settings = app[SETTINGS]
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    store = FsBlobStore(settings.data_dir)
    store.clean_temp()
    index = SqliteIndex(settings.data_dir / "index.sqlite")
    sessions = [
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64, ttl_dns_cache=300),
            headers={"User-Agent": f"cargohold/{__version__}"},
            auto_decompress=False,
        )
        for _ in settings.upstreams
    ]
    fetches = settings.rate_limit.upstream_fetches
    gate = asyncio.Semaphore(fetches) if fetches else None
    clients = {u.name: UpstreamClient(u, s, gate) for u, s in zip(settings.upstreams, sessions)}
    downloads = Downloads(store, index)
    app[PROXY] = PullThrough(Router(clients, settings.default.name), store, index, downloads)
    flusher = asyncio.create_task(_flush_forever(index))
    try:
        yield
    finally:
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
        await downloads.close()
        for session in sessions:
            await session.close()
        await index.close()


async def _flush_forever(index: SqliteIndex) -> None:
    while True:
        await asyncio.sleep(FLUSH_INTERVAL)
        try:
            await index.flush()
        except Exception:
            log.exception("could not write access times to the index")
