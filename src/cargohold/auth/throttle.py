"""Failed-login throttling: after `limit` failures in a window, a key waits the window out.

Keys are built by the caller (`auth/logins.py`) from the client address, and from the address with
a digest of the user name, never from the user name alone: anyone can send a wrong password for
`alice`, so a count per user would let anyone lock her out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

MAX_TRACKED = 100_000  # entries; with keys of bounded length (~100 bytes) a few tens of MB at most


@dataclass(slots=True)
class _Window:
    started: float
    failures: int


class LoginThrottle:
    """Counts failed logins per key in fixed windows, in a table bounded in entries and age.

    Blocked keys are refused before any password check, so a guessing client costs no bcrypt.
    Lapsed windows are swept once per window; when the table is full of live ones, the oldest
    makes room, so a flood of new keys costs memory up to MAX_TRACKED and no more.
    """

    def __init__(
        self, limit: int, window: float, clock: Callable[[], float] = time.monotonic, max_tracked: int = MAX_TRACKED
    ) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._max = max_tracked
        self._windows: dict[str, _Window] = {}
        self._swept = clock()

    def __len__(self) -> int:
        return len(self._windows)

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
        if now - self._swept >= self.window:
            self._sweep(now)
        for key in keys:
            w = self._windows.get(key)
            if w is not None and now - w.started < self.window:
                w.failures += 1
                continue
            self._windows.pop(key, None)  # a new window goes to the end: the dict stays oldest first
            while len(self._windows) >= self._max:
                del self._windows[next(iter(self._windows))]
            self._windows[key] = _Window(now, 1)

    def succeeded(self, key: str) -> None:
        self._windows.pop(key, None)

    def _sweep(self, now: float) -> None:
        self._swept = now
        self._windows = {k: w for k, w in self._windows.items() if now - w.started < self.window}
