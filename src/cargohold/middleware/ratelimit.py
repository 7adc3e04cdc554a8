"""Rate limiting, right after auth: count the request against its identity's budgets, hold a
connection slot while its handler runs, answer 429 TOOMANYREQUESTS with Retry-After when over."""

from __future__ import annotations

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from cargohold.identity import IDENTITY
from cargohold.keys import METRICS, RATE_LIMITER
from cargohold.oci.digests import looks_like_digest
from cargohold.ratelimit.limiter import Kind, too_many

# Health checks must answer however busy a client is.
UNLIMITED = frozenset({"/health", "/ready"})


def kind_of(request: web.Request) -> Kind:
    """Blobs have their own budget; a manifest by tag (GET, or HEAD as containerd asks) is a pull."""
    info = request.match_info
    if "digest" in info:
        return Kind.BLOB
    reference = info.get("reference")
    if reference is not None and request.method in (hdrs.METH_GET, hdrs.METH_HEAD) and not looks_like_digest(reference):
        return Kind.PULL
    return Kind.REQUEST


@web.middleware
async def ratelimit(request: web.Request, handler: Handler) -> web.StreamResponse:
    limiter = request.app[RATE_LIMITER]
    if not limiter.enabled or request.path in UNLIMITED:
        return await handler(request)
    identity = request[IDENTITY]
    key, items, kind = identity.key, limiter.items(identity), kind_of(request)
    refused = await limiter.check(key, items, kind)
    cap = items.budget.connections
    if refused is None and cap and not await limiter.connections.acquire(key, cap):
        refused = too_many(key, "connections", cap, 1, 1)
    if refused is not None:
        request.app[METRICS].ratelimit_rejections.inc()
        raise refused
    if not cap:
        return await handler(request)
    # Held while the handler runs. A blob's body is written before its handler returns (see
    # `cargohold.blobsource`), so the slot lasts until the client has it; other bodies are small
    # and go out at once. No response is prepared here: that is aiohttp's, once.
    try:
        return await handler(request)
    finally:
        limiter.connections.release(key)
