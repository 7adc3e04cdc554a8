"""Checking a user name and password: throttled, bcrypt off the event loop, verified results cached."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import time
from collections.abc import Callable

from cargohold.auth.expiring import Expiring
from cargohold.auth.htpasswd import PasswordError, Users, check_password, verify_password
from cargohold.auth.throttle import LoginThrottle
from cargohold.errors import TooManyRequests, Unauthorized
from cargohold.identity import IPAddress

log = logging.getLogger("cargohold.auth")

CACHE_TTL = 60.0
MAX_CACHED = 10_000
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


class Logins:
    """The one place a password is checked, for Basic auth on /v2/ and for /token alike.

    A verified login is remembered for CACHE_TTL under a hash of user, password and stored hash,
    so a pull sending Basic on every request costs one bcrypt check, and a changed password or
    a removed user stops matching at once.
    """

    def __init__(self, users: Users, throttle: LoginThrottle, clock: Callable[[], float] = time.monotonic) -> None:
        self.users = users
        self.throttle = throttle
        self._clock = clock
        self._verified: Expiring[bytes, bool] = Expiring(MAX_CACHED, clock)
        self._checking: dict[bytes, asyncio.Future[bool]] = {}

    async def check(self, user: str, password: str, address: IPAddress) -> bytes:
        """The stored hash the password proved right against; Unauthorized or TooManyRequests otherwise.

        That hash, not a later read of the file, is what a refresh token is bound to: the file may be
        reread (a password changed) while bcrypt runs.
        """
        keys = (f"user:{user}", f"ip:{address}")
        self.refuse_if_throttled(keys)
        try:
            raw = check_password(password)
        except PasswordError as exc:
            self.failed(keys, user, address)
            raise Unauthorized(f"login refused: {exc}") from None
        stored = await self._verify(user, raw)
        if stored is None:
            self.failed(keys, user, address)
            raise Unauthorized("wrong user name or password")
        self.throttle.succeeded(keys[0])
        return stored

    def refuse_if_throttled(self, keys: tuple[str, ...]) -> None:
        """TooManyRequests while any of `keys` (`user:NAME`, `ip:ADDRESS`) has failed too often."""
        wait = self.throttle.retry_after(keys)
        if wait:
            raise TooManyRequests(
                "too many failed logins; try again later", {"retry_after": wait}, {"Retry-After": str(wait)}
            )

    def failed(self, keys: tuple[str, ...], user: str, address: IPAddress) -> None:
        """Count it and say so (the name only, never the password), for operators and fail2ban alike."""
        self.throttle.failed(keys)
        log.warning("failed login for user %r from %s", user[:64], address)

    async def _verify(self, user: str, password: bytes) -> bytes | None:
        """The hash read once, before the check, that `password` matches; None when it does not."""
        stored = self.users.hash_of(user)
        key = hashlib.sha256(b"\0".join((user.encode(), password, stored or b""))).digest()
        if stored is not None and self._verified.get(key):
            return stored
        pending = self._checking.get(key)
        if pending is None:
            pending = asyncio.ensure_future(asyncio.to_thread(verify_password, password, stored or _NO_SUCH_USER))
            self._checking[key] = pending
            pending.add_done_callback(lambda _: self._checking.pop(key, None))
        if not await asyncio.shield(pending) or stored is None:
            return None
        self._verified.put(key, True, self._clock() + CACHE_TTL)
        return stored
