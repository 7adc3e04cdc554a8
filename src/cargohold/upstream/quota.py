"""An upstream's pull quota (Docker Hub's pull limit), as far as its answers tell it, and what cargohold spent of it.

Docker Hub counts a manifest GET as a pull (HEADs and blobs are free) and says on every manifest answer
`ratelimit-limit: 100;w=21600`, `ratelimit-remaining: 76;w=21600` and `docker-ratelimit-source` (the address or
account counted). One `Quota` per upstream client, which is one account (its credentials) or anonymous. Below the
reserve, pulls no client waits for (`warm`, refreshing a tag nobody asked about lately) are refused, so what is left
goes to clients that have nothing else to pull; after a 429 no pull is sent until its `Retry-After` has passed.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from cargohold.errors import UpstreamRateLimited

log = logging.getLogger("cargohold.upstream")

# ASCII digits, few enough for int() and float(): a figure past that is no figure (the header is ignored).
_FIGURE = re.compile(r"^\s*([0-9]{1,12})\s*(?:;\s*w\s*=\s*([0-9]{1,12}))?(?![0-9])")
# Docker Hub's window; assumed until a header names one.
DEFAULT_WINDOW = 21600.0
# The longest window taken from a header (so the longest pause after a 429): an upstream's word, bounded.
MAX_WINDOW = 86400.0
# The spent pulls remembered for "spent in the window" (one timestamp each).
MAX_REMEMBERED = 100_000


def figure(value: str | None) -> tuple[int, float | None] | None:
    """(count, window seconds) of a `N;w=SECONDS` header."""
    match = _FIGURE.match(value or "")
    if match is None:
        return None
    return int(match.group(1)), float(match.group(2)) if match.group(2) else None


def reserve_of(setting: str | int, limit: int) -> int:
    """`quota_reserve` in pulls for this limit: a number as is, a share rounded up."""
    if isinstance(setting, int):
        return setting
    return math.ceil(limit * float(setting.rstrip("%")) / 100)


@dataclass(frozen=True, slots=True)
class QuotaFigures:
    """What the status page shows: None where the upstream has not said (or not yet)."""

    account: str
    limit: int | None
    remaining: int | None
    reserve: int | None
    window: float
    source: str | None
    spent: int
    resets_in: float | None
    paused_for: float


class Quota:
    """The quota of one upstream account, updated from its answers."""

    def __init__(self, upstream: str, account: str, reserve: str | int, pause: float) -> None:
        self.upstream = upstream
        self.account = account
        self._reserve = reserve
        self._pause = pause  # after a 429 without Retry-After
        self.limit: int | None = None
        self.remaining: int | None = None
        self.window = DEFAULT_WINDOW
        self.source: str | None = None
        self.total = 0  # pulls spent since start (the metric)
        self._spent: deque[float] = deque(maxlen=MAX_REMEMBERED)
        self._until = 0.0  # monotonic: no pull before
        self._at_reserve = False

    @property
    def reserve(self) -> int | None:
        return None if self.limit is None else reserve_of(self._reserve, self.limit)

    def observe(self, headers: Mapping[str, str]) -> None:
        """Take the figures of any answer that carries them (HEADs do, and cost nothing)."""
        remaining = figure(headers.get("RateLimit-Remaining"))
        if remaining is None:
            return
        limit = figure(headers.get("RateLimit-Limit"))
        self.remaining = remaining[0]
        self.limit = limit[0] if limit is not None else self.limit
        self.window = min(remaining[1] or (limit[1] if limit is not None else None) or self.window, MAX_WINDOW)
        self.source = headers.get("Docker-RateLimit-Source", self.source)
        if self.remaining > 0 and self.paused_for() > 0:  # pulls left again (a HEAD says so): the pause is over
            log.info("upstream %s: %d pulls left again; pulls resume", self.upstream, self.remaining)
            self._until = 0.0
        reserve = self.reserve
        if reserve is not None and self.remaining > reserve:
            self._at_reserve = False

    def spent_one(self) -> None:
        """A manifest GET the upstream answered: one pull spent."""
        self.total += 1
        self._spent.append(time.time())

    def refused(self, retry_after: float | None) -> None:
        """A 429 to a pull: none is sent again before its Retry-After (else `failure_pause`), at most a window."""
        pause = min(self.window, self._pause if retry_after is None else max(retry_after, 1.0))
        self._until = max(self._until, time.monotonic() + pause)
        log.warning("upstream %s: pull quota of %s spent; no pulls for %.0fs", self.upstream, self.account, pause)

    def paused_for(self) -> float:
        return max(0.0, self._until - time.monotonic())

    def check(self, *, deferrable: bool) -> None:
        """Before a pull: raise UpstreamRateLimited (429) while the quota is spent, or, for a pull no client
        waits for, while it is at the reserve (logged once each time it gets there)."""
        left = self.paused_for()
        if left > 0:
            seconds = str(math.ceil(left))
            raise UpstreamRateLimited(
                f"upstream {self.upstream} pull quota is spent; not asking it again for {seconds}s",
                {"upstream": self.upstream, "reason": "quota_spent"},
                {"Retry-After": seconds},
            )
        reserve = self.reserve
        if not deferrable or reserve is None or self.remaining is None or self.remaining > reserve:
            return
        if not self._at_reserve:
            self._at_reserve = True
            log.warning(
                "upstream %s: %d pulls left of %s, at the reserve of %d: pulls no client waits for are deferred",
                self.upstream,
                self.remaining,
                self.limit,
                reserve,
            )
        raise UpstreamRateLimited(
            f"upstream {self.upstream} pull quota is at its reserve ({self.remaining} left); deferred",
            {"upstream": self.upstream, "reason": "quota_reserve", "remaining": self.remaining, "reserve": reserve},
        )

    def figures(self) -> QuotaFigures:
        """Spent in the window, and when it resets as far as known: when the oldest pull spent in it leaves
        the (rolling) window, or when the pause after a 429 ends, whichever is later."""
        now = time.time()
        while self._spent and self._spent[0] <= now - self.window:
            self._spent.popleft()
        resets = self._spent[0] + self.window - now if self._spent else None
        paused = self.paused_for()
        if paused > 0:
            resets = max(resets or 0.0, paused)
        return QuotaFigures(
            self.account,
            self.limit,
            self.remaining,
            self.reserve,
            self.window,
            self.source,
            len(self._spent),
            resets,
            paused,
        )
