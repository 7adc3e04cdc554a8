"""The token service, like auth.docker.io: anonymous and Basic-auth tokens, refresh tokens, scopes."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import secrets
import time
import uuid
from collections.abc import Iterable
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization

from rig.util import RigError, http_request


def libtrust_key_id(public_key: Any) -> str:
    """The libtrust key id distribution uses for `kid`: base32 of the first 240 bits of the
    SHA-256 of the DER SubjectPublicKeyInfo, in 12 groups of 4 joined by ':'."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode()
    return ":".join(b32[i : i + 4] for i in range(0, 48, 4))


class Tokens:
    """The token service (a part of `Hub`)."""

    def mint_token(
        self,
        access: Iterable[tuple[str, str, Iterable[str]]] = (),
        *,
        subject: str = "",
        ttl: int | None = None,
        audience: str | None = None,
    ) -> str:
        """A registry JWT for (type, name, actions) entries, signed like auth.docker.io's."""
        now = int(time.time())
        ttl = self.token_ttl if ttl is None else ttl
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": audience or self.service,
            "exp": now + ttl,
            "nbf": now - 5,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": [{"type": t, "name": n, "actions": sorted(set(a))} for t, n, a in access],
        }
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self._kid})

    def _allowed(self, user: str | None, typ: str, name: str) -> set[str]:
        if typ != "repository":
            return {"*"} if user else set()
        if user:
            return {"pull", "push", "delete", "*"}
        return set() if name in self.private_repos else {"pull"}

    @staticmethod
    def _parse_scopes(raw: Iterable[str]) -> list[tuple[str, str, list[str]]]:
        out = []
        for item in raw:
            for scope in item.split():
                typ, _, rest = scope.partition(":")
                name, _, actions = rest.rpartition(":")
                if typ and name:
                    out.append((typ, name, [a for a in actions.split(",") if a]))
        return out

    def _grant(self, user: str | None, scopes: list[tuple[str, str, list[str]]]) -> list[tuple[str, str, list[str]]]:
        granted = []
        for typ, name, actions in scopes:
            allowed = self._allowed(user, typ, name)
            granted.append((typ, name, [a for a in actions if a in allowed]))
        return granted

    def _token_body(
        self, user: str | None, scopes: list[tuple[str, str, list[str]]], service: str | None
    ) -> dict[str, Any]:
        token = self.mint_token(self._grant(user, scopes), subject=user or "", audience=service or self.service)
        issued = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
        return {"token": token, "access_token": token, "expires_in": self.token_ttl, "issued_at": issued}

    async def _token_get(self, request: web.Request) -> web.StreamResponse:
        rec, _, early = await self._enter("token", request)
        if early is not None:
            return early
        user: str | None = None
        auth = request.headers.get("Authorization")
        if auth:
            try:
                scheme, _, b64 = auth.partition(" ")
                if scheme.lower() != "basic":
                    raise ValueError(scheme)
                user, _, password = base64.b64decode(b64).decode().partition(":")
            except (ValueError, binascii.Error, UnicodeDecodeError):
                rec.status = 401
                return web.json_response({"details": "malformed Authorization header"}, status=401)
            rec.user = user
            if self.users.get(user) != password:
                rec.status = 401
                return web.json_response({"details": "incorrect username or password"}, status=401)
        body = self._token_body(
            user, self._parse_scopes(request.query.getall("scope", [])), request.query.get("service")
        )
        if user and request.query.get("offline_token") == "true":
            rt = secrets.token_urlsafe(16)
            self._refresh_tokens[rt] = user
            body["refresh_token"] = rt
        rec.status = 200
        return web.json_response(body)

    async def _token_post(self, request: web.Request) -> web.StreamResponse:
        """OAuth2 form flavour (containerd uses it when it has credentials)."""
        rec, _, early = await self._enter("token", request)
        if early is not None:
            return early
        form = await request.post()
        grant = form.get("grant_type")
        user: str | None
        if grant == "password":
            user = str(form.get("username", ""))
            if self.users.get(user) != form.get("password"):
                rec.status = 401
                return web.json_response({"details": "incorrect username or password"}, status=401)
        elif grant == "refresh_token":
            user = self._refresh_tokens.get(str(form.get("refresh_token", "")))
            if user is None:
                rec.status = 401
                return web.json_response({"details": "invalid refresh token"}, status=401)
        else:
            rec.status = 400
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        rec.user = user
        body = self._token_body(
            user, self._parse_scopes([str(form.get("scope", ""))]), str(form.get("service", "")) or None
        )
        if form.get("access_type") == "offline":
            rt = secrets.token_urlsafe(16)
            self._refresh_tokens[rt] = user
            body["refresh_token"] = rt
        rec.status = 200
        return web.json_response(body)

    def get_token(self, *scopes: str, creds: tuple[str, str] | None = None) -> dict[str, Any]:
        """GET a token from the token service over HTTP (recorded), e.g. for a direct test."""
        q = "&".join([f"service={self.service}"] + [f"scope={s}" for s in scopes])
        headers = {}
        if creds:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        res = http_request("GET", f"{self.token_url}?{q}", headers=headers)
        if res.status != 200:
            raise RigError(f"token service said {res.status}: {res.body[:200]!r}")
        return res.json()  # type: ignore[return-value]
