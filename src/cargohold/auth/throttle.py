"""Failed-login throttling: after `limit` failures in a window, a user or an address waits it out."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

MAX_TRACKED = 100_000  # above this, expired entries are swept before a new one is added


@dataclass
class _Window:
    started: float
    failures: int


class LoginThrottle:
    """Counts failed logins per key (`user:NAME`, `ip:ADDRESS`) in fixed windows.

    Blocked keys are refused before any password check, so a guessing client costs no bcrypt.
    """

    def __init__(self, limit: int, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def retry_after(self, keys: Iterable[str]) -> int:
        """Seconds until every key may try again; 0 when none is blocked."""
        now = self._clock()
        wait = 0.0
        for key in keys:
            w = self._windows.get(key)
            if w is not None and w.failures >= self.limit:
                wait = max(wait, w.started + self.window - now)
        return math.ceil(wait) if wait > 0 else 0

    def failed(self, keys: Iterable[str]) -> None:
        now = self._clock()
        for key in keys:
            w = self._windows.get(key)
            if w is None or now - w.started >= self.window:
                if len(self._windows) >= MAX_TRACKED:
                    self._sweep(now)
                self._windows[key] = _Window(now, 1)
            else:
                w.failures += 1

    def succeeded(self, key: str) -> None:
        self._windows.pop(key, None)

    def _sweep(self, now: float) -> None:
        self._windows = {k: w for k, w in self._windows.items() if now - w.started < self.window}
