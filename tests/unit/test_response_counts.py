"""Responses are counted once per event-loop iteration, together, and always before a scrape reads them."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from cargohold.metrics import Metrics

ROUTE = "/v2/{name}/manifests/{reference}"
REQUESTS = {"route": ROUTE, "method": "GET", "status": "200"}


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_responses_of_one_iteration_are_counted_at_its_end(aiohttp_client: Any) -> None:
    metrics = Metrics(["docker.io"], None)
    seen: list[float] = []

    async def manifest(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 100)

    async def count(request: web.Request, response: web.StreamResponse) -> None:
        metrics.response(request, response, "hit")
        seen.append(_sample(metrics, "cargohold_http_requests_total", **REQUESTS))

    app = web.Application()
    app.router.add_get(ROUTE, manifest)
    app.on_response_prepare.append(count)
    client = await aiohttp_client(app)
    answers = await asyncio.gather(*(client.get("/v2/alpine/manifests/3") for _ in range(5)))
    assert [a.status for a in answers] == [200] * 5
    assert seen[0] == 0  # counted at the end of the iteration, not as the headers go out
    assert _sample(metrics, "cargohold_http_requests_total", **REQUESTS) == 5
    assert _sample(metrics, "cargohold_cache_requests_total", kind="manifest", result="hit") == 5
    assert _sample(metrics, "cargohold_served_bytes_total", source="cache") == 500


async def test_a_scrape_counts_what_waits_first(aiohttp_client: Any) -> None:
    metrics = Metrics(["docker.io"], None)
    scraped: list[float] = []

    async def manifest(request: web.Request) -> web.Response:
        response = web.Response(status=404)
        await response.prepare(request)  # counted now, waiting for the iteration's end
        await metrics.refresh()  # a scrape within the same iteration
        scraped.append(_sample(metrics, "cargohold_http_requests_total", route=ROUTE, method="GET", status="404"))
        return response

    async def count(request: web.Request, response: web.StreamResponse) -> None:
        metrics.response(request, response, "-")

    app = web.Application()
    app.router.add_get(ROUTE, manifest)
    app.on_response_prepare.append(count)
    client = await aiohttp_client(app)
    assert (await client.get("/v2/alpine/manifests/3")).status == 404
    assert scraped == [1]
