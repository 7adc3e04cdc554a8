"""How clients reach this server: `external_url` when set, else what a trusted proxy forwarded.

Behind Traefik or Caddy TLS ends at the proxy, so the request cargohold sees is plain HTTP to an
internal address; URLs handed back to clients (token realms, redirects) must name the public one.
"""

from __future__ import annotations

import ipaddress

from aiohttp import web

from cargohold.config import Settings


def _from_trusted_proxy(request: web.BaseRequest, settings: Settings) -> bool:
    try:
        peer = ipaddress.ip_address((request.remote or "").strip("[]"))
    except ValueError:
        return False
    return any(peer in net for net in settings.rate_limit.trusted_proxies)


def public_base_url(request: web.BaseRequest, settings: Settings) -> str:
    """`scheme://host[:port]` as the client addressed us, without a trailing slash."""
    if settings.external_url:
        return settings.external_url.rstrip("/")
    scheme, host = request.scheme, request.host
    if _from_trusted_proxy(request, settings):
        scheme = request.headers.get("X-Forwarded-Proto", scheme).split(",")[0].strip() or scheme
        host = request.headers.get("X-Forwarded-Host", host).split(",")[0].strip() or host
    return f"{scheme}://{host}"
