"""The plain-HTTP listener next to HTTPS: ACME HTTP-01 answers, `/health`, and a redirect for the rest."""

from __future__ import annotations

from aiohttp import web

from cargohold.config import Settings
from cargohold.errors import NotFound
from cargohold.handlers.meta import health
from cargohold.keys import ACME_CHALLENGES, HTTPS_PORT, REQUEST_IDS, SETTINGS
from cargohold.logs import RequestIds
from cargohold.middleware.observe import observe

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"


def plain_http_app(settings: Settings, challenges: dict[str, str], https_port: int) -> web.Application:
    """`challenges` is the ACME manager's live token -> key authorization map (empty with cert files)."""
    app = web.Application(middlewares=[observe], client_max_size=4096)
    app[SETTINGS] = settings
    app[REQUEST_IDS] = RequestIds()
    app[ACME_CHALLENGES] = challenges
    app[HTTPS_PORT] = https_port
    app.router.add_get("/health", health)
    app.router.add_get(CHALLENGE_PREFIX + "{token}", acme_challenge)
    app.router.add_route("*", "/{tail:.*}", to_https)
    return app


async def acme_challenge(request: web.Request) -> web.Response:
    """HTTP-01: the CA fetches the key authorization for a token it handed out."""
    answer = request.app[ACME_CHALLENGES].get(request.match_info["token"])
    if answer is None:
        raise NotFound("no such ACME challenge")
    return web.Response(text=answer, content_type="text/plain")


async def to_https(request: web.Request) -> web.Response:
    """Everything else moves to HTTPS: `external_url` when set, else this host on the HTTPS port. With ACME
    the host must be one of its domains (else the first one): a redirect never names a host a client made up."""
    settings = request.app[SETTINGS]
    if settings.external_url:
        base = settings.external_url.rstrip("/")
    else:
        host = request.url.host or "localhost"
        domains = settings.tls.acme.domains if settings.tls.acme is not None else None
        if domains and host.lower() not in domains:
            host = domains[0]
        host = f"[{host}]" if ":" in host else host
        port = request.app[HTTPS_PORT]
        base = f"https://{host}" + ("" if port == 443 else f":{port}")
    return web.Response(status=308, headers={"Location": base + request.path_qs})
