"""What every registry handler needs first: the proxy and the resolved target of the request."""

from __future__ import annotations

from aiohttp import web

from cargohold.keys import PROXY, TARGET
from cargohold.proxy import PullThrough
from cargohold.upstream.routes import Target


def proxy_of(request: web.Request) -> PullThrough:
    return request.app[PROXY]


def target_of(request: web.Request) -> Target:
    """Route `<name>` (and containerd's `?ns=`) to an upstream repository, once per request."""
    if TARGET not in request:
        request[TARGET] = proxy_of(request).router.resolve(request.match_info["name"], request.query.get("ns"))
    return request[TARGET]
