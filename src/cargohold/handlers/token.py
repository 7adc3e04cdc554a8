"""`/token`: the Docker registry token service (what `docker login` and every pull ask).

`GET` checks Basic credentials; `POST` is the OAuth2 form (`grant_type=password` or
`refresh_token`) that containerd sends when it has credentials. The JWT returned carries
`access` claims for the requested repository scopes that the rules allow (none asked, as by
`docker login`: none given).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import UTC, datetime

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import MultiDictProxy

from cargohold.auth.service import Auth, Proof
from cargohold.auth.tokens import ROUTE, Scope, parse_scopes
from cargohold.errors import (
    BadRequest,
    NotFound,
    RegistryError,
    Unauthorized,
    error_response,
)
from cargohold.handlers.target import proxy_of
from cargohold.identity import IDENTITY, Identity
from cargohold.keys import AUTH

BASIC_CHALLENGE = {"WWW-Authenticate": 'Basic realm="cargohold"'}
GRANTABLE = frozenset({"pull"})  # a mirror is read-only
NO_STORE = {"Cache-Control": "no-store"}


def _granted(request: web.Request, auth: Auth, who: Identity, scope: Scope) -> Scope | None:
    """The part of a requested scope the rules allow, in the name the client asked for.

    The name is resolved as the pull will be routed: under the Host the challenge was answered
    at (the realm's `route`, see middleware/auth.py), which behind `external_url` is not the Host
    of this request. A client naming another route gains nothing: every pull is checked against
    the rules for where it is actually routed, whatever its token says.
    """
    actions = scope.actions & GRANTABLE
    if not actions:
        return None
    try:
        target = proxy_of(request).router.resolve(scope.name, host=request.query.get(ROUTE) or request.host)
    except RegistryError:
        return None
    if not auth.acl.allows(who, target.upstream.name, target.repository):
        return None
    return Scope(scope.type, scope.name, actions)


def _auth_of(request: web.Request) -> Auth:
    auth = request.app.get(AUTH)
    if auth is None:
        raise NotFound("this mirror has no token service: auth is not configured")
    return auth


def _access(request: web.Request, auth: Auth, proof: Proof | None, scopes: Iterable[str]) -> tuple[str, list[Scope]]:
    """An access token for what the client (None: anonymous) asked and may have, and what it grants.

    It is bound to the password hash that was checked, as refresh tokens are: a user removed and
    added again under the same name within the token's lifetime does not get it back.
    """
    who = request[IDENTITY] = auth.identity(request[IDENTITY].address, proof.user if proof else None)
    granted = [g for s in parse_scopes(scopes) if (g := _granted(request, auth, who, s)) is not None]
    return auth.tokens.issue(who.user, granted, proof.fingerprint if proof else None), granted


# What aiohttp's form parsing raises on a malformed body: ValueError (no multipart boundary, a part
# without a name, bytes that do not decode), LookupError (an unknown charset), RuntimeError (an
# unknown Content-Transfer-Encoding), HttpProcessingError (bad part headers), RequestPayloadError
# (a body that does not decode as its Content-Encoding says: corrupt gzip), and AssertionError from
# its internal checks. Too large a body (decoded) is aiohttp's own 413 (client_max_size, 64 KiB).
_MALFORMED_FORM = (ValueError, LookupError, RuntimeError, HttpProcessingError, web.RequestPayloadError, AssertionError)
# A token form is a few hundred bytes: a client that takes longer than this to send it is not a
# client, and each such body would otherwise hold a connection open for as long as it dribbles.
FORM_TIMEOUT = 10.0


class _SlowBody(Exception):
    """The form did not arrive within FORM_TIMEOUT."""


async def _form(request: web.Request) -> MultiDictProxy[str | bytes | bytearray | web.FileField]:
    """The POST form; 400 for a body that cannot be read as one (the client's fault, not ours)."""
    try:
        async with asyncio.timeout(FORM_TIMEOUT):
            return await request.post()
    except TimeoutError:
        raise _SlowBody from None
    except _MALFORMED_FORM as exc:
        raise BadRequest("the form could not be read", {"reason": str(exc)[:200]}) from None


def _issued_at() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


async def issue_token(request: web.Request) -> web.Response:
    auth = _auth_of(request)
    try:
        proof = await auth.login_proof(request[IDENTITY], request.headers.get("Authorization", ""))
    except Unauthorized as exc:
        exc.headers.update(BASIC_CHALLENGE)
        raise
    token, _ = _access(request, auth, proof, request.query.getall("scope", []))
    return web.json_response(
        {"token": token, "access_token": token, "expires_in": auth.tokens.ttl, "issued_at": _issued_at()},
        headers=NO_STORE,
    )


async def issue_oauth_token(request: web.Request) -> web.Response:
    """The OAuth2 form of the token spec; a refresh token is returned when `access_type=offline`."""
    auth = _auth_of(request)
    try:
        form = await _form(request)
    except _SlowBody:
        response = error_response(408, "UNSUPPORTED", f"the form did not arrive within {FORM_TIMEOUT:.0f} s")
        response.force_close()  # the rest of the body is never read: the connection cannot be reused
        return response
    field = {k: v for k, v in form.items() if isinstance(v, str)}
    grant_type = field.get("grant_type", "")
    if grant_type == "password":
        if not field.get("username") or "password" not in field:
            raise BadRequest("grant_type=password needs username and password")
        proof = await auth.login_password(request[IDENTITY], field["username"], field["password"])
    elif grant_type == "refresh_token":
        if not field.get("refresh_token"):
            raise BadRequest("grant_type=refresh_token needs refresh_token")
        proof = auth.refresh(request[IDENTITY], field["refresh_token"])
    else:
        raise BadRequest("unsupported grant_type; use password or refresh_token", {"grant_type": grant_type[:64]})
    token, granted = _access(request, auth, proof, [v for k, v in form.items() if k == "scope" and isinstance(v, str)])
    body: dict[str, object] = {
        "access_token": token,
        "expires_in": auth.tokens.ttl,
        "scope": " ".join(map(str, granted)),
        "issued_at": _issued_at(),
    }
    if field.get("access_type") == "offline":
        body["refresh_token"] = auth.refresh_token(proof)
    return web.json_response(body, headers=NO_STORE)
