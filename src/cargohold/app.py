"""build_app(settings): one independent cargohold instance; every resource lives in its cleanup context."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from cargohold.auth.context import auth_context
from cargohold.cache.backends import Backends, open_backends
from cargohold.cache.download import Downloads
from cargohold.cache.evict import Evictor, repair
from cargohold.cache.index import Index, Stored
from cargohold.config import Settings
from cargohold.errors import StorageUnavailable
from cargohold.handlers.metrics import count_response, metrics_listener
from cargohold.handlers.target import stamp_namespace
from cargohold.keys import METRICS, PROXY, RATE_LIMITER, REQUEST_IDS, SETTINGS, SYNC, TASKS
from cargohold.logs import RequestIds
from cargohold.metrics import Metrics
from cargohold.middleware.auth import authenticate
from cargohold.middleware.observe import observe, stamp_headers
from cargohold.middleware.ratelimit import ratelimit
from cargohold.oci.digests import Digest
from cargohold.proxy import PullThrough
from cargohold.ratelimit.limiter import RateLimiter
from cargohold.ratelimit.storage import open_storage
from cargohold.routes import add_routes
from cargohold.sync.entries import sync_pins
from cargohold.sync.metrics import KeepCollector
from cargohold.sync.run import Syncer
from cargohold.sync.schedule import Scheduler
from cargohold.sync.state import redis_of
from cargohold.tasks import Tasks
from cargohold.upstream.client import UpstreamClient
from cargohold.upstream.routing import Router

log = logging.getLogger("cargohold.app")

FLUSH_INTERVAL = 5.0


def build_app(settings: Settings) -> web.Application:
    # Clients only ever send small requests to a read-only mirror.
    # Order is the data path: observe, then who is asking, then how much they may ask.
    app = web.Application(middlewares=[observe, authenticate, ratelimit], client_max_size=64 * 1024)
    app[SETTINGS] = settings
    app[METRICS] = Metrics([u.name for u in settings.upstreams], settings.cache.max_size)
    app[TASKS] = Tasks()
    app[REQUEST_IDS] = RequestIds()
    app.cleanup_ctx.append(_rate_limiter)
    app.cleanup_ctx.append(_pull_through)
    app.cleanup_ctx.append(_supervise)
    if settings.auth is not None:
        app.cleanup_ctx.append(auth_context)
    app.cleanup_ctx.append(metrics_listener)
    app.on_response_prepare.append(_stamp_and_count)
    add_routes(app)
    return app


async def _stamp_and_count(request: web.Request, response: web.StreamResponse) -> None:
    """Just before any response's headers go out (streamed ones too): its common headers, and its count.
    One hook, not three: each hook is a coroutine per response."""
    stamp_headers(request, response)
    stamp_namespace(request, response)
    count_response(request, response)


async def _rate_limiter(app: web.Application) -> AsyncIterator[None]:
    """Rate-limit counters in memory or in Redis, shared by replicas."""
    config = app[SETTINGS].rate_limit
    async with open_storage(config.storage, app[SETTINGS].worker_count) as storage:
        app[RATE_LIMITER] = RateLimiter(config, storage)
        yield


async def _supervise(app: web.Application) -> AsyncIterator[None]:
    """The app's background tasks, cancelled and awaited at shutdown: after the contexts whose resources
    they use (index, store, upstream sessions) at start, so before those close at shutdown."""
    async with app[TASKS]:
        yield


async def _pull_through(app: web.Application) -> AsyncIterator[None]:
    """Storage, index, upstream sessions and the proxy, opened at start and closed at shutdown."""
    settings = app[SETTINGS]
    async with open_backends(settings) as backends, _serving(app, backends):
        yield


@contextlib.asynccontextmanager
async def _serving(app: web.Application, backends: Backends) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    store, index = backends.store, backends.index
    if settings.worker_count == 1:  # with workers, the supervisor cleans up before it starts them
        store.clean_temp()
    await repair(index, store)
    metrics = app[METRICS]
    fetches = settings.rate_limit.upstream_fetches
    # A gate per upstream: one that hangs cannot hold the others' requests back.
    clients = {
        u.name: UpstreamClient.connect(u, observer=metrics, gate=asyncio.Semaphore(fetches) if fetches else None)
        for u in settings.upstreams
    }
    evictor = Evictor(
        index,
        store,
        settings.cache.model_copy(update={"pin": sync_pins(settings)}),  # sync lists pin what they hold
        lambda d: store.in_use(d) or downloads.active(d) is not None,
        lambda entry: _evicted(app, entry),
        metrics.pinned_bytes.set,
    )
    tasks = app[TASKS]
    downloads = Downloads(store, index, tasks, evictor.make_room, settings.max_blob_size)
    app[PROXY] = PullThrough(Router(clients, settings.default.name), store, index, downloads, tasks, backends.peers)
    metrics.attach(index, app[PROXY])
    tasks.spawn(_flush_forever(index), "index flush")
    if evictor.bounded and settings.leader:  # one evictor per machine (workers)
        tasks.spawn(evictor.run_forever(), "eviction")
    app[SYNC] = Scheduler(settings, Syncer(settings, app[PROXY]), tasks, redis_of(index))
    metrics.register_own(KeepCollector(app[SYNC], app[PROXY].tags))
    if settings.leader:  # one schedule per machine (workers); `sync run` works from any process
        app[SYNC].start()
    try:
        yield
    finally:
        for client in clients.values():
            await client.close()


def _evicted(app: web.Application, entry: Stored) -> None:
    app[METRICS].evicted(entry)
    if entry.table == "manifests":
        app[PROXY].manifests.forget(Digest.parse(entry.digest))


async def _flush_forever(index: Index) -> None:
    while True:
        await asyncio.sleep(FLUSH_INTERVAL)
        try:
            await index.flush()
        except StorageUnavailable:
            pass  # an index that is down is logged where it failed, with its cause, not as a traceback
        except Exception:
            log.exception("could not write access times to the index")
