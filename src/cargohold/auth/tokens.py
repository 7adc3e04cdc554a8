"""Bearer tokens as in the Docker registry token spec: ES256 JWTs with `access` claims per repository.

The signing key is made on first start and kept in data_dir (mode 0600), so tokens survive a
restart and instances sharing a data_dir accept each other's tokens.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cargohold.auth.expiring import Expiring

ALGORITHM = "ES256"
ISSUER = "cargohold"
SERVICE = "cargohold"
ROUTE = "route"  # realm query parameter: the Host a challenged request was routed by (see handlers/token.py)
REFRESH_AUDIENCE = "cargohold-refresh"  # never accepted as an access token, nor an access token as one
KEY_FILE = "token-signing-key.pem"
LEEWAY = 5  # seconds of clock skew tolerated between instances
MAX_CACHED = 10_000
# A verified token is remembered only if it names at most this many repositories (a pull's token names one or
# two): a client asking /token for 100 scopes per token made each entry about 43 KB.
MAX_CACHED_NAMES = 16


class InvalidToken(Exception):
    """Expired, tampered with, or not ours."""


class ExpiredToken(InvalidToken):
    """Ours and intact, but past its `exp`: no guess, so not worth counting as a failed login."""


@dataclass(frozen=True)
class Scope:
    """One `repository:NAME:ACTIONS` request; NAME may hold a registry host with a port."""

    type: str
    name: str
    actions: frozenset[str]

    @classmethod
    def parse(cls, text: str) -> Scope | None:
        kind, _, rest = text.partition(":")
        name, _, actions = rest.rpartition(":")
        if kind != "repository" or not name:
            return None
        return cls(kind, name, frozenset(a for a in actions.split(",") if a))

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(sorted(self.actions))}"


def parse_scopes(values: Iterable[str]) -> list[Scope]:
    """Every repository scope of `scope` query values (each may hold several, space separated)."""
    return [s for value in values for part in value.split() if (s := Scope.parse(part)) is not None]


@dataclass(frozen=True)
class Grant:
    """A verified token: who (None: anonymous), which repository names it may do what with, and the
    fingerprint of the password hash the user logged in with (None for anonymous tokens)."""

    user: str | None
    access: dict[str, frozenset[str]]
    fingerprint: str | None = None


def load_or_create_key(data_dir: Path) -> ec.EllipticCurvePrivateKey:
    """The instance's signing key; created atomically (link of a finished temp file) when missing."""
    path = data_dir / KEY_FILE
    if not path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        tmp = data_dir / f".{KEY_FILE}.{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, path)  # fails if another instance won the race: use its key
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} is not an EC private key; remove it to have a new one made")
    return loaded


class Tokens:
    """Issues and verifies this instance's tokens.

    An ES256 check costs a few hundred microseconds; a pull sends the same token with every
    request, so verified tokens are remembered until they expire.
    """

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        ttl: float,
        refresh_ttl: float = 30 * 86400,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = key
        self._public = key.public_key()
        self.ttl = int(ttl)
        self.refresh_ttl = int(refresh_ttl)
        self._clock = clock
        # Keyed by a digest of the token (a token may be 8 KB); grants of many names are not kept at all.
        self._verified: Expiring[bytes, Grant] = Expiring(MAX_CACHED, time.time)

    def issue(self, user: str | None, granted: Iterable[Scope], fingerprint: str | None = None) -> str:
        """An access token; a user's carries `pwd`, the fingerprint of their password hash."""
        now = int(self._clock())
        claims: dict[str, object] = {
            "iss": ISSUER,
            "sub": user or "",
            "aud": SERVICE,
            "iat": now,
            "nbf": now - LEEWAY,
            "exp": now + self.ttl,
            "jti": secrets.token_urlsafe(16),
            "access": [{"type": s.type, "name": s.name, "actions": sorted(s.actions)} for s in granted],
        }
        if fingerprint is not None:
            claims["pwd"] = fingerprint
        return jwt.encode(claims, self._key, algorithm=ALGORITHM)

    def issue_refresh(self, user: str, fingerprint: str) -> str:
        """An OAuth2 refresh token, good for `refresh_ttl` while `fingerprint` (of the user's password
        hash) still matches, so removing the user or changing the password revokes it."""
        now = int(self._clock())
        claims = {
            "iss": ISSUER,
            "sub": user,
            "aud": REFRESH_AUDIENCE,
            "iat": now,
            "exp": now + self.refresh_ttl,
            "jti": secrets.token_urlsafe(16),
            "pwd": fingerprint,
        }
        return jwt.encode(claims, self._key, algorithm=ALGORITHM)

    def verify_refresh(self, token: str) -> tuple[str, str]:
        """(user, password fingerprint) of an unexpired refresh token this instance issued.

        ExpiredToken past its `exp`, InvalidToken otherwise (one without `exp`, from before refresh
        tokens expired, too).
        """
        try:
            claims = self._decode(token, REFRESH_AUDIENCE, "pwd", "exp")
        except jwt.ExpiredSignatureError as exc:  # checked after the signature: it is ours
            raise ExpiredToken(str(exc)) from None
        except jwt.PyJWTError as exc:
            raise InvalidToken(str(exc)) from None
        if not isinstance(claims["sub"], str) or not claims["sub"] or not isinstance(claims["pwd"], str):
            raise InvalidToken("malformed refresh token")
        return claims["sub"], claims["pwd"]

    def _decode(self, token: str, audience: str, *required: str) -> dict[str, Any]:
        """The claims of a token signed with our key for `audience`; `required` names claims it must have."""
        return jwt.decode(
            token,
            self._public,
            algorithms=[ALGORITHM],
            audience=audience,
            issuer=ISSUER,
            leeway=LEEWAY,
            options={"require": ["iat", "sub", "aud", "iss", *required]},
        )

    def verify(self, token: str) -> Grant:
        key = hashlib.sha256(token.encode()).digest()
        grant = self._verified.get(key)
        if grant is None:
            expires, grant = self._check(token)
            if len(grant.access) <= MAX_CACHED_NAMES:
                self._verified.put(key, grant, expires)
        return grant

    def _check(self, token: str) -> tuple[float, Grant]:
        try:
            claims = self._decode(token, SERVICE, "exp")
            access = {
                str(a["name"]): frozenset(map(str, a["actions"]))
                for a in claims.get("access", [])
                if a.get("type") == "repository"
            }
        except (jwt.PyJWTError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidToken(str(exc)) from None
        fingerprint = claims.get("pwd")
        return float(claims["exp"]) + LEEWAY, Grant(
            claims["sub"] or None, access, fingerprint if isinstance(fingerprint, str) else None
        )
