"""HTTP client for one upstream registry: token dance, redirects without leaking credentials, retries.

Redirects go only where the upstream's redirect policy allows (realms.py) and to no address it may
not reach (addresses.py); both are checked before the request is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Literal, Protocol
from urllib.parse import urljoin, urlsplit

import aiohttp
from yarl import URL

from cargohold import __version__
from cargohold.config import UpstreamConfig
from cargohold.errors import UpstreamInvalid, UpstreamTimeout, UpstreamUnavailable
from cargohold.upstream.addresses import AddressGuard, ForbiddenAddress
from cargohold.upstream.auth import TokenCache, basic_header, parse_challenge
from cargohold.upstream.breaker import Breaker, retry_after_seconds
from cargohold.upstream.egress import Egress
from cargohold.upstream.failures import cause, where
from cargohold.upstream.mirrors import ContentMirrors, mirror_config
from cargohold.upstream.quota import Quota
from cargohold.upstream.realms import RealmPolicy, RedirectPolicy, normal_host

log = logging.getLogger("cargohold.upstream")

ATTEMPTS = 3
BACKOFF = 0.25
MAX_REDIRECTS = 5
_REDIRECTS = {301, 302, 303, 307, 308}
# A manifest GET is a pull Docker Hub counts: one a client waits for, or one that may be deferred (see quota.py).
Pull = Literal["waited", "deferrable"]
# How much of an upstream body may wait in memory: large enough that the socket keeps being
# read while a chunk is written to disk (aiohttp's 64 KiB default stalls blob downloads).
UPSTREAM_READ_BUFFER = 1 << 20


def timeouts(silence: float) -> tuple[aiohttp.ClientTimeout, aiohttp.ClientTimeout]:
    """(small answers, streamed blobs) for an upstream that may stay silent `silence` seconds.

    Small answers are also bounded in total; blobs take as long as they take, only a stall fails.
    """
    connect = min(10.0, silence)
    small = aiohttp.ClientTimeout(total=2 * silence, connect=connect, sock_read=silence)
    stream = aiohttp.ClientTimeout(total=None, connect=connect, sock_connect=connect, sock_read=silence)
    return small, stream


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


class UpstreamObserver(Protocol):
    """Told about every request that leaves (metrics, upstream state); `kind` is timeout or connection. Also told
    where content by digest came from (the upstream or one of its content mirrors)."""

    def upstream_answered(
        self, upstream: str, method: str, response: aiohttp.ClientResponse, seconds: float
    ) -> None: ...
    def upstream_failed(self, upstream: str, method: str, kind: str, seconds: float) -> None: ...
    def content_fetched(self, upstream: str, source: str, kind: str, outcome: str, size: int) -> None:
        """Content by digest (`kind` manifest or blob) asked of `source` (the upstream or a content mirror):
        `outcome` served (`size` bytes announced), missing, invalid (wrong content) or failed."""


class UpstreamClient:
    """Talks to one upstream; never sends its credentials or tokens to any other host."""

    def __init__(
        self,
        config: UpstreamConfig,
        session: aiohttp.ClientSession,
        *,
        observer: UpstreamObserver | None = None,
        gate: asyncio.Semaphore | None = None,
        guard: AddressGuard | None = None,
        mirrors: ContentMirrors | None = None,
    ) -> None:
        self.config = config
        self.observer = observer
        # This upstream's own: at most this many of its requests wait for an answer at once
        # (held for the request itself, never while a token is fetched).
        self._gate = gate
        self.name = config.name
        self.base = config.url
        self._origin = _origin(config.url)
        self._session = session
        self._small_timeout, self._stream_timeout = timeouts(config.timeout)
        self._credentials = (
            (config.username, config.password.get_secret_value())
            if config.username is not None and config.password is not None
            else None
        )
        self._egress = Egress(config.proxy)
        # Without a guard of its own (a session made elsewhere) literal addresses are still checked.
        self._guard = guard or guard_for(config)
        self._redirects = RedirectPolicy(config)
        self.tokens = TokenCache(
            session, config.name, self._credentials, RealmPolicy(config), self._small_timeout, self._egress
        )
        self._basic = False
        self.breaker = Breaker(config.name, config.failure_pause)
        account = config.username if config.username is not None else "anonymous"
        self.quota = Quota(config.name, account, config.quota_reserve, config.failure_pause)
        self.mirrors = mirrors or ContentMirrors()

    @classmethod
    def connect(
        cls, config: UpstreamConfig, *, observer: UpstreamObserver | None = None, gate: asyncio.Semaphore | None = None
    ) -> UpstreamClient:
        """A client with a session of its own, whose resolver refuses addresses the upstream may not
        reach (DNS rebinding included), and a client of each content mirror; `close()` closes them."""
        mirrors = ContentMirrors(
            [cls.connect(mirror_config(config, url), observer=observer) for url in config.content_mirrors]
        )
        guard = guard_for(config)
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64, ttl_dns_cache=300, resolver=guard),
            headers={"User-Agent": f"cargohold/{__version__}"},
            auto_decompress=False,
            read_bufsize=UPSTREAM_READ_BUFFER,
        )
        return cls(config, session, observer=observer, gate=gate, guard=guard, mirrors=mirrors)

    async def close(self) -> None:
        await self.tokens.close()
        await self._session.close()
        await self._guard.close()
        await self.mirrors.close()

    async def open(
        self,
        method: str,
        repository: str,
        path: str,
        headers: Mapping[str, str] | None = None,
        *,
        stream: bool = False,
        params: Mapping[str, str] | None = None,
        pull: Pull | None = None,
    ) -> aiohttp.ClientResponse:
        """Send a pull request for `repository`; retried on connection errors, timeouts and 5xx.
        `stream`: a blob body follows, bounded only by silence, not in total. Caller releases it.
        `pull`: a manifest GET, which the upstream's quota counts (quota.py): refused with 429 while the quota is
        spent (or, if deferrable, at its reserve), and a 429 to it pauses pulls only. Any other failure (after the
        retries) or 429 pauses the upstream (see breaker.py)."""
        if pull is not None:
            self.quota.check(deferrable=pull == "deferrable")
        self.breaker.check()
        timeout = self._stream_timeout if stream else self._small_timeout
        try:
            resp = await self._attempts(method, repository, path, headers, timeout, params)
        except (UpstreamUnavailable, UpstreamTimeout) as exc:
            self.breaker.trip(exc.message)
            raise
        self.quota.observe(resp.headers)
        retry_after = retry_after_seconds(resp.headers.get("Retry-After"))
        if resp.status == 429 and pull is not None:
            self.quota.refused(retry_after)
        elif resp.status == 429:
            self.breaker.trip("429 Too Many Requests", retry_after, limited=True)
        elif resp.status >= 500:
            self.breaker.trip(f"{method} {path} answered {resp.status}")
        elif resp.status == 200 and pull is not None:
            self.quota.spent_one()
        return resp

    async def _attempts(
        self,
        method: str,
        repository: str,
        path: str,
        headers: Mapping[str, str] | None,
        timeout: aiohttp.ClientTimeout,
        params: Mapping[str, str] | None,
    ) -> aiohttp.ClientResponse:
        scope = f"repository:{repository}:pull"
        for attempt in range(1, ATTEMPTS + 1):
            last = attempt == ATTEMPTS
            started = time.monotonic()
            try:
                resp = await self._authorized(method, self.base + path, scope, dict(headers or {}), timeout, params)
            except (TimeoutError, aiohttp.ClientError) as exc:
                if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, ForbiddenAddress):
                    raise self._refused(where(exc, self.base), str(exc.os_error)) from None
                timed_out = isinstance(exc, asyncio.TimeoutError)
                self._failed(method, "timeout" if timed_out else "connection", started)
                why = cause(exc)
                place = where(exc, self.base)  # host:port of what failed (a CDN, a proxy): the log's, not the client's
                level = logging.WARNING if last else logging.INFO
                log.log(level, "upstream %s (%s): %s %s failed: %s", self.name, place, method, path, why)
                if last:
                    detail = {"upstream": self.name, "cause": why}
                    if timed_out:
                        raise UpstreamTimeout(f"upstream {self.name} timed out", detail) from None
                    raise UpstreamUnavailable(f"upstream {self.name} unreachable: {why}", detail) from None
            else:
                if self.observer is not None:
                    self.observer.upstream_answered(self.name, method, resp, time.monotonic() - started)
                if resp.status < 500 or last:
                    return resp
                resp.release()
            log.info("upstream %s: retrying %s %s (attempt %d)", self.name, method, path, attempt)
            await asyncio.sleep(BACKOFF * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    def _refused(self, place: str, reason: str) -> UpstreamInvalid:
        """A redirect (or realm) that would reach an address this upstream may not send us to."""
        log.warning("upstream %s: refused to connect to %s: %s", self.name, place, reason)
        return UpstreamInvalid(f"upstream {self.name} sent us to an address it may not use", {"upstream": self.name})

    def _failed(self, method: str, kind: str, started: float) -> None:
        if self.observer is not None:
            self.observer.upstream_failed(self.name, method, kind, time.monotonic() - started)

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
            try:
                self.tokens.use(challenge)
            except UpstreamInvalid:
                resp.release()
                raise
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
        """Follow redirects here, only where the redirect policy allows, dropping Authorization as soon
        as they leave the upstream's origin. The gate is held for each request until its answer."""
        for _ in range(MAX_REDIRECTS + 1):
            async with self._gate or contextlib.nullcontext():
                resp = await self._session.request(
                    method,
                    url,
                    headers=headers,
                    allow_redirects=False,
                    timeout=timeout,
                    params=params,
                    proxy=self._egress.proxy_for(url),
                )
            location = resp.headers.get("Location")
            if resp.status not in _REDIRECTS or not location:
                return resp
            resp.release()
            url, params = urljoin(str(resp.url), location), None
            self._check_redirect(url)
            if _origin(url) != self._origin:
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        raise UpstreamUnavailable(f"upstream {self.name} redirected too often", {"upstream": self.name})

    def _check_redirect(self, url: str) -> None:
        """Raise UpstreamInvalid for a redirect the policy refuses (it logs where), or to a literal address refused here."""
        self._redirects.check(url)
        try:
            self._guard.check_literal(URL(url).raw_host or "")
        except ForbiddenAddress as exc:
            raise self._refused(where(exc, url), str(exc)) from None

    def __repr__(self) -> str:
        return f"UpstreamClient({self.name!r}, {self.base!r})"


def guard_for(config: UpstreamConfig) -> AddressGuard:
    """The address guard of an upstream: its own host and its egress proxies resolve unchecked."""
    host = normal_host(URL(config.url).raw_host or "")
    return AddressGuard(host, Egress(config.proxy).hosts())
