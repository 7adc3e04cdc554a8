"""The upstream side of the registry token dance: challenges, token requests, a token cache per scope."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import re
import time
from dataclasses import dataclass

import aiohttp

from cargohold.auth.expiring import Expiring
from cargohold.errors import UpstreamError, UpstreamInvalid, UpstreamTimeout, UpstreamUnavailable
from cargohold.flight import SingleFlight
from cargohold.tasks import Tasks
from cargohold.upstream.bodies import read_bounded
from cargohold.upstream.egress import Egress
from cargohold.upstream.failures import cause, where
from cargohold.upstream.realms import RealmPolicy

log = logging.getLogger("cargohold.upstream")

_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
DEFAULT_TOKEN_LIFETIME = 60.0
# Tokens are a few KiB (Docker Hub's about 2): a realm sending more is refused, not read on.
MAX_TOKEN_RESPONSE = 64 << 10
# Upstream tokens held at once (one per repository asked for; a few KB each).
MAX_TOKENS = 1024
TOKEN_TIMEOUT = aiohttp.ClientTimeout(total=30, connect=10)


@dataclass(frozen=True)
class Challenge:
    """A parsed `WWW-Authenticate` header."""

    scheme: str
    params: dict[str, str]


def parse_challenge(header: str | None) -> Challenge | None:
    if not header:
        return None
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3)) for m in _PARAM.finditer(rest)}
    return Challenge(scheme.lower(), params)


def basic_header(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


class TokenCache:
    """Bearer tokens for one upstream, cached per scope until shortly before they expire."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        upstream_name: str,
        credentials: tuple[str, str] | None,
        realms: RealmPolicy,
        timeout: aiohttp.ClientTimeout = TOKEN_TIMEOUT,
        egress: Egress | None = None,
    ) -> None:
        self._session = session
        self._egress = egress or Egress(None)
        self._timeout = timeout
        self._name = upstream_name
        self._credentials = credentials
        self._realms = realms
        # One per scope (repository) asked for: any name a client sends, so bounded, and expired ones go.
        self._tokens: Expiring[str, str] = Expiring(MAX_TOKENS)
        # Token fetches are the client's own tasks: they use its session, so they stop before it closes.
        self._fetches = Tasks()
        self._flight: SingleFlight[str] = SingleFlight(self._fetches, f"token for {upstream_name}")
        self.challenge: Challenge | None = None

    def use(self, challenge: Challenge) -> None:
        """Adopt a Bearer challenge. One with an unusable realm is refused and the previous one
        kept, so a single bad answer cannot break every later request until a restart."""
        self._realms.check(challenge.params.get("realm", ""))
        self.challenge = challenge

    async def close(self) -> None:
        """Cancel token fetches still running, before the session they use closes."""
        await self._fetches.close()

    def cached(self, scope: str) -> str | None:
        return self._tokens.get(scope)

    def forget(self, scope: str) -> None:
        self._tokens.discard(scope)

    async def token(self, scope: str) -> str:
        """A token for `scope`, from cache or one request to the realm shared by concurrent callers."""
        return self.cached(scope) or await self._flight.run(scope, lambda: self._fetch(scope))

    async def _fetch(self, scope: str) -> str:
        challenge = self.challenge
        assert challenge is not None
        try:
            return await self._request(challenge, scope)
        except UpstreamError:
            # Dropped, so the next request goes without a token and the registry names its realm
            # again: a realm that fails (or moved) cannot break every request until a restart.
            if self.challenge is challenge:
                self.challenge = None
            raise

    async def _request(self, challenge: Challenge, scope: str) -> str:
        realm = challenge.params["realm"]  # checked against the realm policy in use()
        query = {"scope": scope}
        if "service" in challenge.params:
            query["service"] = challenge.params["service"]
        headers = {}
        if self._credentials:
            headers["Authorization"] = basic_header(*self._credentials)
        started = time.monotonic()
        detail = {"upstream": self._name}
        try:
            # No redirects: the realm check must hold for the host that finally gets the request.
            async with self._session.get(
                realm,
                params=query,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
                proxy=self._egress.proxy_for(realm),
            ) as resp:
                if resp.status != 200:
                    raise UpstreamUnavailable(f"token service of {self._name} answered {resp.status}", detail)
                body = await read_bounded(resp, MAX_TOKEN_RESPONSE, f"token response of {self._name}", detail)
        except (TimeoutError, aiohttp.ClientError) as exc:
            why = cause(exc)
            log.warning("token service of %s (%s) failed: %s", self._name, where(exc, realm), why)
            error = UpstreamTimeout if isinstance(exc, asyncio.TimeoutError) else UpstreamUnavailable
            raise error(f"token service of {self._name} failed: {why}", {**detail, "cause": why}) from None
        try:
            # 64 KiB of JSON can take milliseconds (a list of 30,000 numbers: 4 ms here): off the loop.
            token, lifetime = await asyncio.to_thread(_token_of, body)
        except ValueError:
            raise UpstreamUnavailable(f"token service of {self._name} failed: it sent no JSON", detail) from None
        if token is None:
            raise UpstreamInvalid(f"token service of {self._name} gave no token", detail)
        # Renew a little early so a token never expires between our check and the upstream's.
        self._tokens.put(scope, token, started + lifetime - min(30.0, lifetime / 4))
        log.debug("token for %s scope %s, valid %.0fs", self._name, scope, lifetime)
        return token


def _token_of(body: bytes) -> tuple[str | None, float]:
    """The token and its lifetime from a token response; (None, _) when it holds none. ValueError
    when it is not JSON."""
    try:
        document = json.loads(body)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not isinstance(document, dict):
        return None, 0.0
    token = document.get("token") or document.get("access_token")
    expires = document.get("expires_in")
    lifetime = DEFAULT_TOKEN_LIFETIME
    if isinstance(expires, int | float) and not isinstance(expires, bool) and math.isfinite(expires):
        lifetime = float(expires)
    return (token if isinstance(token, str) and token else None), max(lifetime, 1.0)
