"""A pause after an upstream failed: while it lasts, requests fail fast instead of piling up.

Without it every request to a dead or hanging upstream pays the full retry budget (a stale tag
waits for three timeouts), and a 429 storm is answered with more requests. With it an upstream
that just failed is left alone for `failure_pause` (or the `Retry-After` it asked for, capped);
stale tags are then answered at once and cold requests get 503 with `Retry-After`. The first
request after the pause goes through again, so recovery needs no one's help.
"""

from __future__ import annotations

import logging
import math
import time

from cargohold.errors import UpstreamUnavailable

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
        self.trips = 0

    def remaining(self) -> float:
        return max(0.0, self._until - time.monotonic())

    def check(self) -> None:
        """Raise 503 with Retry-After while the upstream is paused."""
        left = self.remaining()
        if left > 0:
            raise UpstreamUnavailable(
                f"upstream {self._upstream} failed just now; not asking it again for {math.ceil(left)}s",
                {"upstream": self._upstream},
                {"Retry-After": str(math.ceil(left))},
            )

    def trip(self, reason: str, seconds: float | None = None) -> None:
        pause = min(MAX_PAUSE, self._pause if seconds is None else max(seconds, 1.0))
        if time.monotonic() + pause > self._until:
            self._until = time.monotonic() + pause
        self.trips += 1
        log.warning("upstream %s paused for %.0fs: %s", self._upstream, pause, reason)
