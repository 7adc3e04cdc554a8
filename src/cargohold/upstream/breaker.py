"""A pause after an upstream failed: while it lasts, requests fail fast instead of piling up.

Without it every request to a dead or hanging upstream pays the full retry budget (a stale tag
waits for three timeouts), and a 429 storm is answered with more requests. With it an upstream
that just failed is left alone for `failure_pause` (or the `Retry-After` it asked for, capped);
stale tags are then answered at once and cold requests get 503 with `Retry-After` (429 TOOMANYREQUESTS
after a 429: the upstream is limiting us, not down). The first request after the pause goes through
again, so recovery needs no one's help. A 429 to a pull (a manifest GET) pauses pulls only (quota.py).
"""

from __future__ import annotations

import logging
import math
import time

from cargohold.errors import UpstreamError, UpstreamRateLimited, UpstreamUnavailable

log = logging.getLogger("cargohold.upstream")

MAX_PAUSE = 300.0


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header given as a number (HTTP dates are rare from registries)."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None


class Breaker:
    """The pause of one upstream."""

    def __init__(self, upstream: str, pause: float) -> None:
        self._upstream = upstream
        self._pause = pause
        self._until = 0.0
        self._limited = False
        self.trips = 0

    def remaining(self) -> float:
        return max(0.0, self._until - time.monotonic())

    def check(self) -> None:
        """Raise 503 (429 after a 429) with Retry-After while the upstream is paused."""
        left = self.remaining()
        if left > 0:
            what = "is rate limiting us" if self._limited else "failed just now"
            error: type[UpstreamError] = UpstreamRateLimited if self._limited else UpstreamUnavailable
            raise error(
                f"upstream {self._upstream} {what}; not asking it again for {math.ceil(left)}s",
                {"upstream": self._upstream},
                {"Retry-After": str(math.ceil(left))},
            )

    def trip(self, reason: str, seconds: float | None = None, *, limited: bool = False) -> None:
        """Pause for `seconds` (a Retry-After) or `failure_pause`; `limited`: the upstream answered 429."""
        pause = min(MAX_PAUSE, self._pause if seconds is None else max(seconds, 1.0))
        if time.monotonic() + pause > self._until:
            self._until = time.monotonic() + pause
            self._limited = limited
        self.trips += 1
        log.warning("upstream %s paused for %.0fs: %s", self._upstream, pause, reason)
