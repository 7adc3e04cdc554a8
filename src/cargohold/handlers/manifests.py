"""GET/HEAD /v2/<name>/manifests/<reference>."""

from __future__ import annotations

from aiohttp import hdrs, web

from cargohold.handlers.target import proxy_of, target_of
from cargohold.keys import CACHE
from cargohold.mediatypes import parse_accept


def _headers(media_type: str, digest: str) -> dict[str, str]:
    return {"Content-Type": media_type, "Docker-Content-Digest": digest, "ETag": f'"{digest}"'}


async def get_manifest(request: web.Request) -> web.Response:
    proxy = proxy_of(request)
    reference = request.match_info["reference"]
    accept = parse_accept(request.headers.getall("Accept", []))
    if request.method == hdrs.METH_HEAD:
        head = await proxy.manifest_head(target_of(request), reference, accept)
        request[CACHE] = head.cache
        return web.Response(headers={**_headers(head.media_type, head.digest), "Content-Length": str(head.size)})
    manifest = await proxy.manifest(target_of(request), reference, accept)
    request[CACHE] = manifest.cache
    return web.Response(body=manifest.body, headers=_headers(manifest.media_type, manifest.digest))
