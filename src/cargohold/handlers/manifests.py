"""GET/HEAD /v2/<name>/manifests/<reference>."""

from __future__ import annotations

from aiohttp import web

from cargohold.handlers.target import proxy_of, target_of
from cargohold.keys import CACHE
from cargohold.mediatypes import parse_accept


async def get_manifest(request: web.Request) -> web.Response:
    proxy = proxy_of(request)
    manifest = await proxy.manifest(
        target_of(request), request.match_info["reference"], parse_accept(request.headers.getall("Accept", []))
    )
    request[CACHE] = manifest.cache
    return web.Response(
        body=manifest.body,
        headers={
            "Content-Type": manifest.media_type,
            "Docker-Content-Digest": manifest.digest,
            "ETag": f'"{manifest.digest}"',
        },
    )
