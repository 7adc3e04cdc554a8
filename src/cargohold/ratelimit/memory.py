"""An in-process moving window whose cost per hit does not grow with the number of clients.

limits' own MemoryStorage starts a sweep over every key (with a thread hop per key) after nearly
every hit; with a thousand client addresses that cost a quarter of the throughput of warm manifest
hits (docs/ratelimit.md). Here each key's window is a deque trimmed when it is used, and keys whose
window has emptied are dropped by a sweep at most every SWEEP seconds. It keeps limits' storage
interface for the two calls the limiter makes (`limiter.MovingWindows`), so the Redis storage stays the
library's; it is not a subclass of limits' storages, whose every call is wrapped in one more coroutine
that turns backend errors into StorageError (this one has no backend to fail).

With `workers: N` each worker keeps its own windows and counts every hit N times: each has 1/N of
the configured budget (at least one request per window), so a client's requests, wherever the kernel sends its connections, add up to
at most the budget (Redis storage counts across workers exactly).
"""

from __future__ import annotations

import time
from collections import deque

SWEEP = 10.0


class MovingWindowMemory:
    """Moving windows only (what the limiter uses): per key its expiry and the hit times, oldest first."""

    def __init__(self, share: int = 1) -> None:
        self._share = share  # the workers the budget is split among
        self._windows: dict[str, tuple[int, deque[float]]] = {}
        self._swept = time.time()

    def _window(self, key: str, expiry: int, now: float) -> deque[float]:
        found = self._windows.get(key)
        if found is None:
            found = self._windows[key] = (expiry, deque())
        hits = found[1]
        while hits and hits[0] <= now - expiry:
            hits.popleft()
        return hits

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        return self.hit(key, limit, expiry, time.time(), amount)

    def hit(self, key: str, limit: int, expiry: int, now: float, amount: int = 1) -> bool:
        """`acquire_entry` at `now`, without a coroutine: the limiter counts a pull in three windows per request."""
        if now - self._swept > SWEEP:
            self._sweep(now)
        hits = self._window(key, expiry, now)
        if len(hits) + amount > max(1, limit // self._share):
            return False
        if amount == 1:
            hits.append(now)
        else:
            hits.extend([now] * amount)
        return True

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        """(time of the oldest hit in the window, hits in the window), as limits expects."""
        now = time.time()
        hits = self._window(key, expiry, now)
        return (hits[0], len(hits) * self._share) if hits else (now, 0)

    def _sweep(self, now: float) -> None:
        self._swept = now
        for key in [k for k, (expiry, hits) in self._windows.items() if not hits or hits[-1] <= now - expiry]:
            del self._windows[key]
