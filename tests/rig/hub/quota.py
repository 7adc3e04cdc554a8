"""Docker Hub's pull quota: manifest GETs counted per address, or per account once a token names one.

Like Docker Hub: every manifest answer (HEAD too) carries `ratelimit-limit: N;w=21600`, `ratelimit-remaining`
and `docker-ratelimit-source`; a GET answered 200 spends one pull, a HEAD none; when none is left a GET is
answered 429 TOOMANYREQUESTS with Docker Hub's message (and `Retry-After`, when `pull_retry_after` is set).
"""

from __future__ import annotations

import json

import jwt
from aiohttp import web

#: Docker Hub's message when the pull limit is reached.
PULL_LIMIT_MESSAGE = (
    "You have reached your pull rate limit. You may increase the limit by authenticating and upgrading: "
    "https://www.docker.com/increase-rate-limit"
)


class PullQuota:
    """The pull counts (a part of `Hub`)."""

    def pull_source(self, request: web.Request) -> str:
        """What a pull is counted against: the token's account (its `sub`), else the client's address."""
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            try:
                claims = jwt.decode(auth[7:], options={"verify_signature": False})
            except jwt.PyJWTError:
                claims = {}
            if claims.get("sub"):
                return f"account:{claims['sub']}"
        return request.remote or "127.0.0.1"

    def pulls(self, source: str | None = None) -> int:
        """Pulls spent by one source (an address, or `account:NAME`), or by all."""
        with self._lock:
            return self._pulls.get(source, 0) if source is not None else sum(self._pulls.values())

    def pulls_by_source(self) -> dict[str, int]:
        with self._lock:
            return dict(self._pulls)

    def count_pull(self, source: str) -> int:
        """Spend one pull of `source`; returns what is left of the limit."""
        with self._lock:
            self._pulls[source] = self._pulls.get(source, 0) + 1
            spent = self._pulls[source]
        return max(0, (self.pull_limit or 0) - spent)

    def pull_limit_reached(self, headers: dict[str, str]) -> web.Response:
        """Docker Hub's 429 when a source's pulls are spent (the quota headers too)."""
        body = json.dumps({"errors": [{"code": "TOOMANYREQUESTS", "message": PULL_LIMIT_MESSAGE}]})
        extra = {"Retry-After": str(self.pull_retry_after)} if self.pull_retry_after is not None else {}
        return web.Response(status=429, text=body, content_type="application/json", headers={**headers, **extra})
