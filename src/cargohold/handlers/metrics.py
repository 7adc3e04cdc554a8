"""`/metrics` on the main app and, with `metrics_listen`, on a listener of its own (without auth there)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from cargohold.config import split_host_port
from cargohold.keys import CACHE, METRICS, SETTINGS

METRICS_PATH = "/metrics"


def count_response(request: web.Request, response: web.StreamResponse) -> None:
    """Count every response of the main app as its headers go out (from the app's prepare hook)."""
    request.app[METRICS].response(request, response, request.get(CACHE, "-"))


async def metrics_endpoint(request: web.Request) -> web.Response:
    """`GET /metrics` in the Prometheus text format."""
    metrics = request.app[METRICS]
    await metrics.refresh()
    return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def metrics_listener(app: web.Application) -> AsyncIterator[None]:
    """A second listener serving only `/metrics`, when `metrics_listen` is set."""
    listen = app[SETTINGS].metrics_listen
    if listen is None:
        yield
        return
    side = web.Application()
    side[METRICS] = app[METRICS]
    side.router.add_get(METRICS_PATH, metrics_endpoint)
    runner = web.AppRunner(side, access_log=None)
    await runner.setup()
    host, port = split_host_port(listen)
    await web.TCPSite(runner, host, port, reuse_port=app[SETTINGS].worker_count > 1).start()
    try:
        yield
    finally:
        await runner.cleanup()
