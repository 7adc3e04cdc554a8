"""GET /v2/<name>/tags/list, passed through to the upstream with `n` and `last`."""

from __future__ import annotations

from aiohttp import web

from cargohold.handlers.target import proxy_of, target_of


async def list_tags(request: web.Request) -> web.Response:
    target = target_of(request)
    result = await proxy_of(request).tag_list(target, request.query.get("n"), request.query.get("last"))
    headers = {}
    if result.link:
        # The upstream's pagination link names its own repository; point it back at the client's name.
        headers["Link"] = result.link.replace(f"/v2/{target.repository}/", f"/v2/{request.match_info['name']}/", 1)
    return web.Response(body=result.body, content_type="application/json", headers=headers)
