"""`GET /token`: the Docker registry token service (what `docker login` and every pull ask).

Basic credentials are checked once here; the JWT returned carries `access` claims for the
requested repository scopes that the rules allow (none asked, as by `docker login`: none given).
"""

from __future__ import annotations

from datetime import UTC, datetime

from aiohttp import web

from cargohold.auth.service import Auth
from cargohold.auth.tokens import Scope, parse_scopes
from cargohold.errors import NotFound, RegistryError, Unauthorized
from cargohold.handlers.target import proxy_of
from cargohold.identity import IDENTITY, Identity
from cargohold.keys import AUTH

BASIC_CHALLENGE = {"WWW-Authenticate": 'Basic realm="cargohold"'}
GRANTABLE = frozenset({"pull"})  # a mirror is read-only


def _granted(request: web.Request, auth: Auth, who: Identity, scope: Scope) -> Scope | None:
    """The part of a requested scope the rules allow, in the name the client asked for."""
    actions = scope.actions & GRANTABLE
    if not actions:
        return None
    try:
        target = proxy_of(request).router.resolve(scope.name, host=request.host)
    except RegistryError:
        return None
    if not auth.acl.allows(who, target.upstream.name, target.repository):
        return None
    return Scope(scope.type, scope.name, actions)


async def issue_token(request: web.Request) -> web.Response:
    auth = request.app.get(AUTH)
    if auth is None:
        raise NotFound("this mirror has no token service: auth is not configured")
    try:
        who = request[IDENTITY] = await auth.login(request[IDENTITY], request.headers.get("Authorization", ""))
    except Unauthorized as exc:
        exc.headers.update(BASIC_CHALLENGE)
        raise
    scopes = parse_scopes(request.query.getall("scope", []))
    granted = [g for s in scopes if (g := _granted(request, auth, who, s)) is not None]
    token = auth.tokens.issue(who.user, granted)
    return web.json_response(
        {
            "token": token,
            "access_token": token,
            "expires_in": auth.tokens.ttl,
            "issued_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        headers={"Cache-Control": "no-store"},
    )
