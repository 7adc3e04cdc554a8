"""Everything auth needs at run time, built once per app when `auth` is configured."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from cargohold.auth.acl import Acl
from cargohold.auth.htpasswd import HtpasswdError, Users
from cargohold.auth.logins import Logins, basic_credentials
from cargohold.auth.throttle import LoginThrottle
from cargohold.auth.tokens import InvalidToken, Tokens, load_or_create_key
from cargohold.config import ConfigError, Settings
from cargohold.errors import Unauthorized
from cargohold.identity import Identity, IPAddress

log = logging.getLogger("cargohold.auth")


def password_fingerprint(stored_hash: bytes) -> str:
    """Ties a refresh token to the password it was issued under (no use for guessing the password)."""
    return hashlib.sha256(b"cargohold-refresh\0" + stored_hash).hexdigest()[:32]


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
            tokens=Tokens(load_or_create_key(settings.data_dir), config.token_ttl),
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
        return self.identity(anonymous.address, await self.logins.check(*creds, anonymous.address))

    async def login_password(self, anonymous: Identity, user: str, password: str) -> Identity:
        """The user of an OAuth2 `grant_type=password` form, checked and throttled like Basic credentials."""
        return self.identity(anonymous.address, await self.logins.check(user, password, anonymous.address))

    def refresh_token(self, user: str) -> str:
        """A refresh token for a user who just proved who they are (OAuth2 `access_type=offline`)."""
        return self.tokens.issue_refresh(user, password_fingerprint(self.users.hash_of(user) or b""))

    def refresh(self, anonymous: Identity, token: str) -> Identity:
        """The user of a refresh token, if it is ours and they still exist with the same password.

        A refused one counts as a failed login of the address, so tokens cannot be guessed freely.
        """
        keys = (f"ip:{anonymous.address}",)
        self.logins.refuse_if_throttled(keys)
        try:
            user, fingerprint = self.tokens.verify_refresh(token)
        except InvalidToken:
            user, fingerprint = "", ""
        stored = self.users.hash_of(user) if user else None
        if stored is None or fingerprint != password_fingerprint(stored):
            self.logins.failed(keys, user or "(refresh token)", anonymous.address)
            raise Unauthorized("the refresh token is invalid, or its user was removed or changed password")
        return self.identity(anonymous.address, user)
