"""Checking a user name and password: throttled, bcrypt off the event loop, verified results cached."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import ipaddress
import logging
import time
from collections.abc import Callable

from cargohold.auth.expiring import Expiring
from cargohold.auth.htpasswd import (
    PasswordError,
    Users,
    check_password,
    valid_username,
    verify_password,
)
from cargohold.auth.throttle import LoginThrottle
from cargohold.errors import TooManyRequests, Unauthorized
from cargohold.flight import SingleFlight
from cargohold.identity import ClientAddress
from cargohold.tasks import Tasks

log = logging.getLogger("cargohold.auth")

CACHE_TTL = 60.0
MAX_CACHED = 10_000
# Longer Basic headers are checked afresh each time rather than remembered whole.
MAX_REMEMBERED_HEADER = 1024
ADDRESS_FACTOR = 3  # failures an address may have, in multiples of the per-login limit
# Failures an IPv6 /64 may have, in multiples of an address's: a host holds a whole /64 and could take a
# fresh address for every guess; a subnet's hosts share one, so it is a multiple, and only for logins.
NETWORK_FACTOR = 10
IPV6_NETWORK = 64
# Checked when the user does not exist, so an unknown name costs as much as a wrong password.
_NO_SUCH_USER = b"$2b$10$CWUxvK1EDNtOZjvU.mqo5OD6F13IysETFPlm64zKloqIEP.KBe5bm"


def basic_credentials(header: str) -> tuple[str, str] | None:
    """(user, password) from `Authorization: Basic ...`, None for any other scheme or garbage."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep and user else None


def login_key(user: str, address: ClientAddress) -> str:
    """The throttle key of one user name from one address: a digest, so a long name costs no memory."""
    if valid_username(user):  # at most 255 characters: remembered, as a client sending Basic asks on every request
        return _valid_login_key(user, address)
    return _digest_key(user, address)


def _digest_key(user: str, address: ClientAddress) -> str:
    return f"login:{address}/{hashlib.sha256(user.encode(errors='replace')).hexdigest()[:24]}"


_valid_login_key = functools.lru_cache(maxsize=4096)(_digest_key)


def network_key(address: ClientAddress) -> str | None:
    """The throttle key of an IPv6 address's /64; None for IPv4 (an IPv4-mapped address is IPv4 by now)
    and an unknown address, which are counted as themselves only."""
    if isinstance(address, ipaddress.IPv6Address):
        return _ipv6_network_key(address)
    return None


@functools.lru_cache(maxsize=4096)
def _ipv6_network_key(address: ipaddress.IPv6Address) -> str:
    return f"net:{ipaddress.IPv6Network((address, IPV6_NETWORK), strict=False)}"


class Logins:
    """The one place a password is checked, for Basic auth on /v2/ and for /token alike.

    Failures are counted per (user, address) and per address, never per user alone: a user's right
    password from an address that has not failed is always checked, whoever guesses at her name
    elsewhere. An address gets ADDRESS_FACTOR times the limit, for the users sharing it (a NAT), and an
    IPv6 /64 NETWORK_FACTOR times an address's, for its addresses together.

    A verified login is remembered for CACHE_TTL under a hash of user, password and stored hash,
    so a pull sending Basic on every request costs one bcrypt check, and a changed password or
    a removed user stops matching at once.
    """

    def __init__(
        self, users: Users, limit: int, window: float, tasks: Tasks, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.users = users
        self.per_login = LoginThrottle(limit, window, clock)
        self.per_address = LoginThrottle(limit * ADDRESS_FACTOR, window, clock)
        self.per_network = LoginThrottle(limit * ADDRESS_FACTOR * NETWORK_FACTOR, window, clock)
        self._clock = clock
        self._verified: Expiring[bytes, bool] = Expiring(MAX_CACHED, clock)
        self._headers: Expiring[str, tuple[str, bytes]] = Expiring(MAX_CACHED, clock)
        # One bcrypt check per (user, password, hash) at a time, however many requests bring it.
        self._checking: SingleFlight[bool] = SingleFlight(tasks, "password check")

    async def check(self, user: str, password: str, address: ClientAddress) -> bytes:
        """The stored hash the password proved right against; Unauthorized or TooManyRequests otherwise.

        That hash, not a later read of the file, is what a refresh token is bound to: the file may be
        reread (a password changed) while bcrypt runs. A user name no htpasswd entry can have (too
        long, spaces, a colon) and a password bcrypt cannot take whole are refused at the door,
        counted like a wrong password, without bcrypt.
        """
        self.refuse_if_throttled(address, user)
        if not valid_username(user):
            self.failed(address, user)
            raise Unauthorized("login refused: not a valid user name")
        try:
            raw = check_password(password)
        except PasswordError as exc:
            self.failed(address, user)
            raise Unauthorized(f"login refused: {exc}") from None
        stored = await self._verify(user, raw)
        if stored is None:
            self.failed(address, user)
            raise Unauthorized("wrong user name or password")
        self.per_login.succeeded(login_key(user, address))
        return stored

    async def check_basic(self, header: str, address: ClientAddress) -> tuple[str, bytes]:
        """The user of `Authorization: Basic` credentials and the stored hash they proved right against,
        as `check`. A header proven within CACHE_TTL, its user's hash unchanged, is not decoded and
        hashed again (a pull sends it on every request); it is still refused while throttled."""
        known = self._headers.get(header)
        if known is not None and self.users.hash_of(known[0]) == known[1]:
            user = known[0]
            self.refuse_if_throttled(address, user)
            self.per_login.succeeded(login_key(user, address))
            return known
        creds = basic_credentials(header)
        if creds is None:
            raise Unauthorized("unsupported credentials; use Basic (user name and password) or a Bearer token")
        stored = await self.check(*creds, address)
        if len(header) <= MAX_REMEMBERED_HEADER:
            self._headers.put(header, (creds[0], stored), self._clock() + CACHE_TTL)
        return creds[0], stored

    def refuse_if_throttled(self, address: ClientAddress, user: str | None = None) -> None:
        """TooManyRequests while the address, its IPv6 /64, or this user name from it, has failed too often."""
        wait = self.per_address.retry_after([f"ip:{address}"])
        network = network_key(address)
        if network is not None:
            wait = max(wait, self.per_network.retry_after([network]))
        if user is not None:
            wait = max(wait, self.per_login.retry_after([login_key(user, address)]))
        if wait:
            raise TooManyRequests(
                "too many failed logins; try again later", {"retry_after": wait}, {"Retry-After": str(wait)}
            )

    def failed(self, address: ClientAddress, user: str | None, named: str | None = None) -> None:
        """Count it and say so (the name only, never the password), for operators and fail2ban alike."""
        self.per_address.failed([f"ip:{address}"])
        network = network_key(address)
        if network is not None:
            self.per_network.failed([network])
        if user is not None:
            self.per_login.failed([login_key(user, address)])
        log.warning("failed login for user %r from %s", (named or user or "")[:64], address)

    async def _verify(self, user: str, password: bytes) -> bytes | None:
        """The hash read once, before the check, that `password` matches; None when it does not."""
        stored = self.users.hash_of(user)
        key = hashlib.sha256(b"\0".join((user.encode(), password, stored or b""))).digest()
        if stored is not None and self._verified.get(key):
            return stored
        checking = self._checking.run(
            key, lambda: asyncio.to_thread(verify_password, password, stored or _NO_SUCH_USER)
        )
        if not await checking or stored is None:
            return None
        self._verified.put(key, True, self._clock() + CACHE_TTL)
        return stored
