"""Everything auth needs at run time, built once per app when `auth` is configured."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from cargohold.auth.acl import Acl
from cargohold.auth.htpasswd import HtpasswdError, Users
from cargohold.auth.logins import Logins, basic_credentials
from cargohold.auth.throttle import LoginThrottle
from cargohold.auth.tokens import ExpiredToken, InvalidToken, Tokens, load_or_create_key
from cargohold.config import ConfigError, Settings
from cargohold.errors import Unauthorized
from cargohold.identity import Identity, IPAddress

log = logging.getLogger("cargohold.auth")


def password_fingerprint(stored_hash: bytes) -> str:
    """Ties a refresh token to the password it was issued under (no use for guessing the password)."""
    return hashlib.sha256(b"cargohold-refresh\0" + stored_hash).hexdigest()[:32]


@dataclass(frozen=True)
class Proof:
    """A user who proved who they are, and the fingerprint of the password hash that proved it."""

    user: str
    fingerprint: str


@dataclass
class Auth:
    users: Users
    logins: Logins
    tokens: Tokens
    acl: Acl

    @classmethod
    def open(cls, settings: Settings) -> Auth:
        """Users, signing key and rules; a bad htpasswd entry is a config error that stops the start."""
        config = settings.auth
        if config is None:
            raise ConfigError("auth: not configured")
        try:
            users = Users.open(config.htpasswd)
        except HtpasswdError as exc:
            raise ConfigError(f"auth.htpasswd: {exc}") from None
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        log.info("auth on: %d users from %s, anonymous pulls: %s", len(users.users), users.path, config.anonymous)
        return cls(
            users=users,
            logins=Logins(users, LoginThrottle(config.max_failed_logins, config.failed_login_window)),
            tokens=Tokens(load_or_create_key(settings.data_dir), config.token_ttl, config.refresh_token_ttl),
            acl=Acl.from_config(config),
        )

    def identity(self, address: IPAddress, user: str | None) -> Identity:
        """The Identity of a client that proved to be `user` (None: anonymous)."""
        return Identity(address, user=user, groups=self.acl.groups_of(user) if user else frozenset())

    async def login(self, anonymous: Identity, authorization: str) -> Identity:
        """Without credentials the anonymous client (where allowed), else the user of Basic ones.

        Raises Unauthorized (the caller adds its challenge) or TooManyRequests.
        """
        if not authorization:
            if self.acl.anonymous_allowed(anonymous.address):
                return anonymous
            raise Unauthorized("authentication required")
        creds = basic_credentials(authorization)
        if creds is None:
            raise Unauthorized("unsupported credentials; use Basic (user name and password) or a Bearer token")
        user, password = creds
        await self.logins.check(user, password, anonymous.address)
        return self.identity(anonymous.address, user)

    async def login_password(self, anonymous: Identity, user: str, password: str) -> Proof:
        """The user of an OAuth2 `grant_type=password` form, checked and throttled like Basic credentials."""
        stored = await self.logins.check(user, password, anonymous.address)
        return Proof(user, password_fingerprint(stored))

    def refresh_token(self, proof: Proof) -> str:
        """A refresh token (OAuth2 `access_type=offline`) bound to the password hash that was checked."""
        return self.tokens.issue_refresh(proof.user, proof.fingerprint)

    def refresh(self, anonymous: Identity, token: str) -> Proof:
        """The user of a refresh token, if it is ours, unexpired, and they still have the same password.

        A refused one counts as a failed login of the address, so tokens cannot be guessed freely;
        an expired one (our signature, so no guess) does not.
        """
        keys = (f"ip:{anonymous.address}",)
        self.logins.refuse_if_throttled(keys)
        try:
            user, fingerprint = self.tokens.verify_refresh(token)
        except ExpiredToken:
            raise Unauthorized("the refresh token has expired; log in again") from None
        except InvalidToken:
            user, fingerprint = "", ""
        stored = self.users.hash_of(user) if user else None
        if stored is None or fingerprint != password_fingerprint(stored):
            self.logins.failed(keys, user or "(refresh token)", anonymous.address)
            raise Unauthorized("the refresh token is invalid, or its user was removed or changed password")
        return Proof(user, fingerprint)
