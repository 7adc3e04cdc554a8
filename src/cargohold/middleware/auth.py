"""Who is asking and may they: Basic or Bearer credentials -> Identity, then the access rules.

Runs right after observe, before rate limiting and before anything can reach upstream. A client
without usable credentials gets 401 with a Bearer challenge pointing at our /token; a logged-in
user the rules do not allow gets 403 DENIED.
"""

from __future__ import annotations

import re
import time
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Handler
from yarl import URL

from cargohold.auth.service import ADMITTED_FOR, MAX_ADMITTED_HEADER, MAX_ADMITTED_HOST, AdmissionKey, Auth
from cargohold.auth.tokens import ROUTE, SERVICE, Grant, InvalidToken
from cargohold.errors import Denied, RegistryError, Unauthorized
from cargohold.external import public_base_url
from cargohold.handlers.metrics import METRICS_PATH
from cargohold.handlers.target import proxy_of, target_of
from cargohold.identity import IDENTITY, Identity
from cargohold.keys import AUTH, SETTINGS

OPEN_PATHS = frozenset({"/health", "/ready", "/token"})
_SAFE_NAME = re.compile(r"[A-Za-z0-9._/:-]{1,512}")


def token_realm(request: web.Request) -> str:
    """Where clients get tokens: our /token as they reach it (external_url, else a trusted proxy's headers).

    When this request's Host chose its upstream (an upstream's `hosts`) and /token is on another host
    (behind `external_url`), the realm names the Host as `?route=`, so /token resolves the scope's
    name the way this request is routed. Clients keep a realm's query when they add theirs.
    """
    base = public_base_url(request, request.app[SETTINGS])
    host = request.host.lower()
    if urlsplit(base).netloc.lower() == host or not _routed_by_host(request, host):
        return base + "/token"
    return str(URL(base + "/token").with_query({ROUTE: request.host}))


def _routed_by_host(request: web.Request, host: str) -> bool:
    hosts = {h.lower() for u in proxy_of(request).router.upstreams for h in u.config.hosts}
    return host in hosts or host.rsplit(":", 1)[0] in hosts


def _scope(request: web.Request) -> str | None:
    """The scope a client needs for this request, in the names it uses (containerd's ?ns= as a host)."""
    name = request.match_info.get("name")
    if name is None:
        return None
    ns = request.query.get("ns")
    full = f"{ns}/{name}" if ns else name
    return f"repository:{full}:pull" if _SAFE_NAME.fullmatch(full) else None


def _challenge(request: web.Request, auth: Auth, error: str | None = None) -> dict[str, str]:
    params = [f'realm="{token_realm(request)}"', f'service="{SERVICE}"']
    scope = _scope(request)
    if scope:
        params.append(f'scope="{scope}"')
    if error:
        params.append(f'error="{error}"')
    return {"WWW-Authenticate": "Bearer " + ",".join(params)}


def _refuse(request: web.Request, auth: Auth, message: str, error: str | None = None) -> Unauthorized:
    return Unauthorized(message, headers=_challenge(request, auth, error))


async def _identify(request: web.Request, auth: Auth) -> tuple[Identity, Grant | None]:
    """The caller's Identity, and the token's grant when a Bearer token was sent."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        try:
            return await auth.login(request[IDENTITY], header), None
        except Unauthorized as exc:
            exc.headers.update(_challenge(request, auth))
            raise
    try:
        grant = auth.tokens.verify(token.strip())
    except InvalidToken:
        raise _refuse(request, auth, "the token is invalid or has expired", "invalid_token") from None
    address = request[IDENTITY].address
    if grant.user is None and not auth.acl.anonymous_allowed(address):
        raise _refuse(request, auth, "anonymous tokens are not accepted from this address", "invalid_token")
    if grant.user is not None and not auth.holds(grant.user, grant.fingerprint):
        raise _refuse(request, auth, "the token's user no longer exists or changed password", "invalid_token")
    return auth.identity(address, grant.user), grant


def _covers(request: web.Request, grant: Grant, upstream: str, repository: str) -> bool:
    """Whether a token grants pull of this target, under any of the names it was issued for."""
    router = proxy_of(request).router
    for name, actions in grant.access.items():
        if "pull" not in actions:
            continue
        try:
            target = router.resolve(name, host=request.host)  # names as the client used them at this Host
        except RegistryError:
            continue
        if target.upstream.name == upstream and target.repository == repository:
            return True
    return False


def _authorize(request: web.Request, auth: Auth, who: Identity, grant: Grant | None) -> None:
    """Apply the access rules to a repository request (the ping and `/` need a login only, or none where
    anonymous clients are let in; /metrics a login, see `authenticate`)."""
    if "name" not in request.match_info:
        return
    # An anonymous client the rules limit learns nothing of the routing: a name no upstream serves and
    # one it may not pull get the same answer, naming neither the upstream nor the repository.
    hidden = who.user is None and not auth.acl.allows_everything(who)
    try:
        target = target_of(request)
    except RegistryError:
        if hidden:
            raise Unauthorized("log in to pull this repository", None, _challenge(request, auth)) from None
        raise
    upstream, repository = target.upstream.name, target.repository
    if not auth.acl.allows(who, upstream, repository):
        if hidden:
            raise Unauthorized("log in to pull this repository", None, _challenge(request, auth))
        raise Denied("access to this repository is denied", {"upstream": upstream, "repository": repository})
    if grant is not None and not _covers(request, grant, upstream, repository):
        raise _refuse(request, auth, "the token does not grant pull of this repository", "insufficient_scope")


async def _admit(request: web.Request, auth: Auth, header: str, key: AdmissionKey) -> Identity:
    """Identify the caller and apply the access rules; remember the admission for a short while."""
    who, grant = await _identify(request, auth)
    request[IDENTITY] = who  # a refusal below is logged with who it was
    _authorize(request, auth, who, grant)
    if len(header) <= MAX_ADMITTED_HEADER and len(request.host) <= MAX_ADMITTED_HOST:
        auth.admitted.put(key, who, time.monotonic() + ADMITTED_FOR)
    return who


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Replace the anonymous Identity with the authenticated one; refuse before anything else runs."""
    auth = request.app.get(AUTH)
    if auth is None or request.path in OPEN_PATHS:
        return await handler(request)
    header = request.headers.get("Authorization", "")
    key = (header, request[IDENTITY].address, request.host, request.match_info.get("name"), request.query.get("ns"))
    who = auth.admitted.get(key) or await _admit(request, auth, header, key)
    request[IDENTITY] = who
    if request.path == METRICS_PATH and who.user is None and not request.app[SETTINGS].status.public:
        # Upstream and content-mirror names, the upstream account, sync entries: like the status page's
        # details, not for anonymous clients. Checked after the admission cache (keyed without the path).
        raise Unauthorized("log in to read the metrics", None, _challenge(request, auth))
    return await handler(request)
