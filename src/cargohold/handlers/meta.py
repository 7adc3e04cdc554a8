"""Endpoints that are not about content: health and the API version check."""

from __future__ import annotations

from aiohttp import web

from cargohold.errors import Unsupported


async def health(request: web.Request) -> web.Response:
    """Liveness for load balancers and container health checks; never needs auth."""
    return web.json_response({"status": "ok"})


async def api_version(request: web.Request) -> web.Response:
    """`GET /v2/`: tells clients this is a registry speaking the v2 API."""
    return web.json_response({})


async def unsupported(request: web.Request) -> web.Response:
    """Push and delete: a mirror is read-only."""
    raise Unsupported("this registry is a read-only mirror", {"method": request.method})
