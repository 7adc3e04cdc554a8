"""GET/HEAD /v2/<name>/manifests/<reference>."""

from __future__ import annotations

from aiohttp import hdrs, web

from cargohold.handlers.target import proxy_of, target_of
from cargohold.keys import CACHE
from cargohold.oci.mediatypes import parse_accept
from cargohold.upstream.repository import Descriptor

# Sent by `cargohold warm`: nobody waits for this pull, so it may be deferred (upstream/quota.py).
PURPOSE = "Cargohold-Purpose"


def _headers(descriptor: Descriptor) -> dict[str, str]:
    digest = str(descriptor.digest)
    return {"Content-Type": descriptor.media_type, "Docker-Content-Digest": digest, "ETag": f'"{digest}"'}


async def get_manifest(request: web.Request) -> web.Response:
    proxy = proxy_of(request)
    reference = request.match_info["reference"]
    accept = parse_accept(request.headers.getall("Accept", []))
    if request.method == hdrs.METH_HEAD:
        head = await proxy.manifest_head(target_of(request), reference, accept)
        request[CACHE] = head.cache
        return web.Response(headers={**_headers(head.descriptor), "Content-Length": str(head.descriptor.size)})
    waited = request.headers.get(PURPOSE) != "prefetch"
    manifest = await proxy.manifest(target_of(request), reference, accept, waited=waited)
    request[CACHE] = manifest.cache
    return web.Response(body=manifest.body, headers=_headers(manifest.descriptor))
