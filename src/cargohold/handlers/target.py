"""What every registry handler needs first: the proxy and the resolved target of the request."""

from __future__ import annotations

from aiohttp import web

from cargohold.keys import PROXY, TARGET
from cargohold.proxy import PullThrough
from cargohold.upstream.routing import Target


def proxy_of(request: web.Request) -> PullThrough:
    return request.app[PROXY]


def target_of(request: web.Request) -> Target:
    """Route `<name>`, containerd's `?ns=` and the Host header to an upstream repository, once per request."""
    if TARGET not in request:
        request[TARGET] = proxy_of(request).router.resolve(
            request.match_info["name"], request.query.get("ns"), request.host
        )
    return request[TARGET]


def stamp_namespace(request: web.Request, response: web.StreamResponse) -> None:
    """The distribution spec's proxying rule: a request scoped by `?ns=` answers with `OCI-Namespace`."""
    target = request.get(TARGET)
    if target is not None and target.namespace is not None:
        response.headers["OCI-Namespace"] = target.namespace
