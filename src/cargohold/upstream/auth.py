"""The upstream side of the registry token dance: challenges, token requests, a token cache per scope."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
from dataclasses import dataclass

import aiohttp

from cargohold.errors import UpstreamInvalid, UpstreamTimeout, UpstreamUnavailable
from cargohold.flight import SingleFlight
from cargohold.upstream.egress import Egress
from cargohold.upstream.realms import RealmPolicy

log = logging.getLogger("cargohold.upstream")

_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
DEFAULT_TOKEN_LIFETIME = 60.0
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
        self._tokens: dict[str, tuple[str, float]] = {}
        self._flight: SingleFlight[str] = SingleFlight()
        self.challenge: Challenge | None = None

    def use(self, challenge: Challenge) -> None:
        """Adopt a Bearer challenge. One with an unusable realm is refused and the previous one
        kept, so a single bad answer cannot break every later request until a restart."""
        self._realms.check(challenge.params.get("realm", ""))
        self.challenge = challenge

    def cached(self, scope: str) -> str | None:
        entry = self._tokens.get(scope)
        if entry and entry[1] > time.monotonic():
            return entry[0]
        return None

    def forget(self, scope: str) -> None:
        self._tokens.pop(scope, None)

    async def token(self, scope: str) -> str:
        """A token for `scope`, from cache or one request to the realm shared by concurrent callers."""
        return self.cached(scope) or await self._flight.run(scope, lambda: self._fetch(scope))

    async def _fetch(self, scope: str) -> str:
        assert self.challenge is not None
        realm = self.challenge.params["realm"]  # checked against the realm policy in use()
        query = {"scope": scope}
        if "service" in self.challenge.params:
            query["service"] = self.challenge.params["service"]
        headers = {}
        if self._credentials:
            headers["Authorization"] = basic_header(*self._credentials)
        started = time.monotonic()
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
                    raise UpstreamUnavailable(
                        f"token service of {self._name} answered {resp.status}", {"upstream": self._name}
                    )
                body = await resp.json(content_type=None)
        except asyncio.TimeoutError:
            raise UpstreamTimeout(f"token service of {self._name} timed out", {"upstream": self._name}) from None
        except (aiohttp.ClientError, ValueError) as exc:
            raise UpstreamUnavailable(
                f"token service of {self._name} failed: {type(exc).__name__}", {"upstream": self._name}
            ) from None
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise UpstreamInvalid(f"token service of {self._name} gave no token", {"upstream": self._name})
        lifetime = body.get("expires_in") if isinstance(body.get("expires_in"), int | float) else DEFAULT_TOKEN_LIFETIME
        lifetime = max(float(lifetime), 1.0)
        # Renew a little early so a token never expires between our check and the upstream's.
        self._tokens[scope] = (token, started + lifetime - min(30.0, lifetime / 4))
        log.debug("token for %s scope %s, valid %.0fs", self._name, scope, lifetime)
        return token
