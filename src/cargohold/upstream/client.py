"""HTTP client for one upstream registry: token dance, redirects without leaking credentials, retries."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from urllib.parse import urljoin, urlsplit

import aiohttp

from cargohold.config import UpstreamConfig
from cargohold.errors import UpstreamTimeout, UpstreamUnavailable
from cargohold.upstream.auth import TokenCache, basic_header, parse_challenge

log = logging.getLogger("cargohold.upstream")

MANIFEST_TIMEOUT = aiohttp.ClientTimeout(total=60, connect=10, sock_read=30)
# Blobs can take as long as they take; only a stalled connection is an error.
BLOB_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10, sock_read=60)
ATTEMPTS = 3
BACKOFF = 0.25
MAX_REDIRECTS = 5
_REDIRECTS = {301, 302, 303, 307, 308}


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


class UpstreamClient:
    """Talks to one upstream; never sends its credentials or tokens to any other host."""

    def __init__(
        self, config: UpstreamConfig, session: aiohttp.ClientSession, gate: asyncio.Semaphore | None = None
    ) -> None:
        self.config = config
        # Shared by all upstreams: at most this many requests wait for an upstream answer at once.
        self._gate = gate
        self.name = config.name
        self.base = config.url
        self._origin = _origin(config.url)
        self._session = session
        self._credentials = (
            (config.username, config.password.get_secret_value())
            if config.username is not None and config.password is not None
            else None
        )
        self.tokens = TokenCache(session, config.name, self._credentials)
        self._basic = False

    async def open(
        self,
        method: str,
        repository: str,
        path: str,
        headers: Mapping[str, str] | None = None,
        *,
        timeout: aiohttp.ClientTimeout = MANIFEST_TIMEOUT,
        params: Mapping[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """Send a pull request for `repository`; retried on connection errors and 5xx. Caller releases it."""
        scope = f"repository:{repository}:pull"
        for attempt in range(1, ATTEMPTS + 1):
            last = attempt == ATTEMPTS
            try:
                async with self._gate or contextlib.nullcontext():
                    resp = await self._authorized(method, self.base + path, scope, dict(headers or {}), timeout, params)
            except asyncio.TimeoutError:
                if last:
                    raise UpstreamTimeout(f"upstream {self.name} timed out", {"upstream": self.name}) from None
            except aiohttp.ClientError as exc:
                if last:
                    raise UpstreamUnavailable(
                        f"upstream {self.name} unreachable: {type(exc).__name__}", {"upstream": self.name}
                    ) from None
            else:
                if resp.status < 500 or last:
                    return resp
                resp.release()
            log.info("upstream %s: retrying %s %s (attempt %d)", self.name, method, path, attempt)
            await asyncio.sleep(BACKOFF * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    async def _authorized(
        self,
        method: str,
        url: str,
        scope: str,
        headers: dict[str, str],
        timeout: aiohttp.ClientTimeout,
        params: Mapping[str, str] | None,
    ) -> aiohttp.ClientResponse:
        auth = await self._auth_for(scope)
        resp = await self._follow(method, url, {**headers, **auth}, timeout, params)
        if resp.status != 401:
            return resp
        challenge = parse_challenge(resp.headers.get("WWW-Authenticate"))
        if challenge is None:
            return resp
        if challenge.scheme == "bearer":
            self.tokens.challenge = challenge
            self.tokens.forget(scope)
        elif challenge.scheme == "basic" and self._credentials and not self._basic:
            self._basic = True
        else:
            return resp
        resp.release()
        auth = await self._auth_for(scope)
        return await self._follow(method, url, {**headers, **auth}, timeout, params)

    async def _auth_for(self, scope: str) -> dict[str, str]:
        """Credentials for the next request: a (cached) token once the upstream asked for Bearer."""
        if self._basic and self._credentials:
            return {"Authorization": basic_header(*self._credentials)}
        if self.tokens.challenge is not None:
            return {"Authorization": "Bearer " + await self.tokens.token(scope)}
        return {}

    async def _follow(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        timeout: aiohttp.ClientTimeout,
        params: Mapping[str, str] | None,
    ) -> aiohttp.ClientResponse:
        """Follow redirects here, dropping Authorization as soon as they leave the upstream's origin."""
        for _ in range(MAX_REDIRECTS + 1):
            resp = await self._session.request(
                method, url, headers=headers, allow_redirects=False, timeout=timeout, params=params
            )
            location = resp.headers.get("Location")
            if resp.status not in _REDIRECTS or not location:
                return resp
            resp.release()
            url, params = urljoin(str(resp.url), location), None
            if _origin(url) != self._origin:
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        raise UpstreamUnavailable(f"upstream {self.name} redirected too often", {"upstream": self.name})

    def __repr__(self) -> str:
        return f"UpstreamClient({self.name!r}, {self.base!r})"
