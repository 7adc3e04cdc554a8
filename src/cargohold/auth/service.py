"""Everything auth needs at run time, built once per app when `auth` is configured."""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass, field

from cargohold.auth.acl import Acl
from cargohold.auth.expiring import Expiring
from cargohold.auth.htpasswd import HtpasswdError, Users
from cargohold.auth.logins import Logins
from cargohold.auth.tokens import ExpiredToken, InvalidToken, Tokens, load_or_create_key
from cargohold.config import ConfigError, Settings
from cargohold.errors import Unauthorized
from cargohold.identity import ClientAddress, Identity
from cargohold.tasks import Tasks

log = logging.getLogger("cargohold.auth")


@functools.lru_cache(maxsize=1024)  # one per user's hash, asked for on every request a user sends
def password_fingerprint(stored_hash: bytes) -> str:
    """Ties a token (access or refresh) to the password it was issued under: a SHA-256 a check costs
    microseconds of, and no use for guessing the password."""
    return hashlib.sha256(b"cargohold-refresh\0" + stored_hash).hexdigest()[:32]


@dataclass(frozen=True)
class Proof:
    """A user who proved who they are, and the fingerprint of the password hash that proved it."""

    user: str
    fingerprint: str


# How long a request's admission is remembered (`Auth.admitted`), and for how many different requests.
ADMITTED_FOR = 1.0
MAX_ADMITTED = 10_000
# Longer Authorization headers are checked afresh each time rather than remembered whole.
MAX_ADMITTED_HEADER = 4096
# Nor are requests with a longer Host (a DNS name is at most 253 characters, and a port): any string a client sends.
MAX_ADMITTED_HOST = 300
# (Authorization header, client address, Host, repository name, ?ns=): what a request's admission depends on.
AdmissionKey = tuple[str, ClientAddress, str, str | None, str | None]


@dataclass
class Auth:
    users: Users
    logins: Logins
    tokens: Tokens
    acl: Acl
    # Who requests were let in as, for ADMITTED_FOR seconds: a client sends the same credentials for every
    # request of a pull, and checking them and the rules again was a fifth of a warm hit's cost. A removed
    # user, a changed password, a newly throttled address or an expired token is refused within that time.
    admitted: Expiring[AdmissionKey, Identity] = field(default_factory=lambda: Expiring(MAX_ADMITTED))

    @classmethod
    def open(cls, settings: Settings, tasks: Tasks) -> Auth:
        """Users, signing key and rules; an htpasswd file that cannot be read stops the start (a bad
        entry in it is left out and logged)."""
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
            logins=Logins(users, config.max_failed_logins, config.failed_login_window, tasks),
            tokens=Tokens(load_or_create_key(settings.data_dir), config.token_ttl, config.refresh_token_ttl),
            acl=Acl.from_config(config),
        )

    def identity(self, address: ClientAddress, user: str | None) -> Identity:
        """The Identity of a client that proved to be `user` (None: anonymous)."""
        return Identity(address, user=user, groups=self.acl.groups_of(user) if user else frozenset())

    async def login(self, anonymous: Identity, authorization: str) -> Identity:
        """Without credentials the anonymous client (where allowed), else the user of Basic ones.

        Raises Unauthorized (the caller adds its challenge) or TooManyRequests.
        """
        proof = await self.login_proof(anonymous, authorization)
        return anonymous if proof is None else self.identity(anonymous.address, proof.user)

    async def login_proof(self, anonymous: Identity, authorization: str) -> Proof | None:
        """As `login`, with the proof a token is bound to; None for an anonymous client let in."""
        if not authorization:
            if self.acl.anonymous_allowed(anonymous.address):
                return None
            raise Unauthorized("authentication required")
        user, stored = await self.logins.check_basic(authorization, anonymous.address)
        return Proof(user, password_fingerprint(stored))

    async def login_password(self, anonymous: Identity, user: str, password: str) -> Proof:
        """The user of Basic credentials or of an OAuth2 `grant_type=password` form, checked and throttled."""
        stored = await self.logins.check(user, password, anonymous.address)
        return Proof(user, password_fingerprint(stored))

    def holds(self, user: str, fingerprint: str | None) -> bool:
        """Whether `user` still exists with the password hash `fingerprint` was taken of."""
        stored = self.users.hash_of(user)
        return stored is not None and fingerprint == password_fingerprint(stored)

    def refresh_token(self, proof: Proof) -> str:
        """A refresh token (OAuth2 `access_type=offline`) bound to the password hash that was checked."""
        return self.tokens.issue_refresh(proof.user, proof.fingerprint)

    def refresh(self, anonymous: Identity, token: str) -> Proof:
        """The user of a refresh token, if it is ours, unexpired, and they still have the same password.

        A refused one counts as a failed login of the address, so tokens cannot be guessed freely;
        an expired one (our signature, so no guess) does not.
        """
        self.logins.refuse_if_throttled(anonymous.address)
        try:
            user, fingerprint = self.tokens.verify_refresh(token)
        except ExpiredToken:
            raise Unauthorized("the refresh token has expired; log in again") from None
        except InvalidToken:
            user, fingerprint = "", ""
        if not user or not self.holds(user, fingerprint):
            self.logins.failed(anonymous.address, None, user or "(refresh token)")
            raise Unauthorized("the refresh token is invalid, or its user was removed or changed password")
        return Proof(user, fingerprint)
