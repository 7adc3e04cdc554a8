"""Counting requests against budgets with `limits` (moving windows), and saying when to come back."""

from __future__ import annotations

import enum
import logging
import math
import time
from dataclasses import dataclass
from typing import Protocol

from limits import RateLimitItem, RateLimitItemPerHour, RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.errors import StorageError

from cargohold.config import RateLimitConfig
from cargohold.errors import TooManyRequests
from cargohold.identity import Identity
from cargohold.ratelimit.budgets import Budget, budget_for
from cargohold.ratelimit.connections import Connections
from cargohold.ratelimit.memory import MovingWindowMemory

log = logging.getLogger("cargohold.ratelimit")

MAX_CACHED = 10_000


class Kind(enum.Enum):
    """What a request is counted as: a blob, a pull (manifest by tag) or anything else."""

    REQUEST = "requests"
    BLOB = "blobs"
    PULL = "pulls"


def bucket(rate: int, burst: int) -> RateLimitItem | None:
    """`rate` per second allowing `burst` at once, as a moving window of ceil(burst/rate) seconds:
    the sustained rate is exact and an instant burst may be a little larger than asked, never smaller."""
    if rate == 0:
        return None
    window = max(1, math.ceil(burst / rate))
    return RateLimitItemPerSecond(rate * window, window)


@dataclass(frozen=True, slots=True)
class Window:
    """One moving window of a budget: at most `amount` hits in `expiry` seconds.

    `suffix` is limits' key for the item, built once: with the client's key in front it names the
    window in the storage (building it per request was a fifth of the cost of counting)."""

    name: str
    amount: int
    expiry: int
    suffix: str

    @classmethod
    def of(cls, name: str, item: RateLimitItem) -> Window:
        return cls(name, item.amount, item.get_expiry(), item.key_for(name))


@dataclass(frozen=True, slots=True)
class Items:
    """The windows of one budget, by kind of request, built once per user and groups."""

    budget: Budget
    by_kind: dict[Kind, tuple[Window, ...]]

    @classmethod
    def of(cls, budget: Budget) -> Items:
        requests = bucket(budget.requests_per_second, budget.burst)
        blobs = bucket(budget.blobs_per_second, budget.blob_burst)
        per_minute = RateLimitItemPerMinute(budget.pulls_per_minute) if budget.pulls_per_minute else None
        per_hour = RateLimitItemPerHour(budget.pulls_per_hour) if budget.pulls_per_hour else None

        def windows(*pairs: tuple[str, RateLimitItem | None]) -> tuple[Window, ...]:
            return tuple(Window.of(name, item) for name, item in pairs if item is not None)

        return cls(
            budget,
            {
                Kind.REQUEST: windows(("requests", requests)),
                Kind.BLOB: windows(("blobs", blobs)),
                Kind.PULL: windows(("requests", requests), ("pulls", per_minute), ("pulls", per_hour)),
            },
        )


class MovingWindows(Protocol):
    """The two calls of limits' moving-window storages the limiter makes (its Redis storage, and
    `memory.MovingWindowMemory`)."""

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool: ...

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]: ...


def too_many(key: str, budget: str, limit: int, window: int, retry_after: int) -> TooManyRequests:
    """The 429 a client sees, with the headers Docker Hub uses for its own limits."""
    return TooManyRequests(
        f"too many {budget} from {key}: the limit is {limit} per {window}s",
        {"budget": budget, "limit": limit, "window": window, "retry_after": retry_after},
        {
            "Retry-After": str(retry_after),
            "RateLimit-Limit": f"{limit};w={window}",
            "RateLimit-Remaining": f"0;w={window}",
        },
    )


class RateLimiter:
    """Budgets per identity (cached), counted in the storage; lets requests through if the storage fails."""

    def __init__(self, config: RateLimitConfig, storage: MovingWindows) -> None:
        self.config = config
        self.connections = Connections()
        # The two calls of limits' MovingWindowRateLimiter, made here with keys built once per window.
        self._storage = storage
        # The in-process windows are counted without a coroutine per window (a pull counts in three).
        self._memory = storage if isinstance(storage, MovingWindowMemory) else None
        self._items: dict[tuple[str | None, frozenset[str]], Items] = {}
        self._storage_failing = False
        self.enabled = not (budget_for(config, None, frozenset()).unlimited and not config.users and not config.groups)

    def items(self, identity: Identity) -> Items:
        who = (identity.user, identity.groups)
        found = self._items.get(who)
        if found is None:
            if len(self._items) >= MAX_CACHED:
                self._items.clear()
            found = self._items[who] = Items.of(budget_for(self.config, identity.user, identity.groups))
        return found

    async def check(self, key: str, items: Items, kind: Kind) -> TooManyRequests | None:
        """Count one request of client `key`; the error to answer with when it is over a budget."""
        now = time.time()
        for window in items.by_kind[kind]:
            stored = f"{key}/{window.suffix}"
            try:
                if self._memory is not None:
                    counted = self._memory.hit(stored, window.amount, window.expiry, now)
                else:
                    counted = await self._storage.acquire_entry(stored, window.amount, window.expiry)
                if counted:
                    continue
                oldest, _ = await self._storage.get_moving_window(stored, window.amount, window.expiry)
            except StorageError as exc:
                self._failing(exc)
                return None
            self._failing(None)
            retry = min(window.expiry, max(1, math.ceil(oldest + window.expiry - now)))
            return too_many(key, window.name, window.amount, window.expiry, retry)
        if self._storage_failing:
            self._failing(None)
        return None

    def _failing(self, exc: StorageError | None) -> None:
        """Log once when the storage starts and stops failing, not once per request."""
        if (exc is not None) != self._storage_failing:
            self._storage_failing = exc is not None
            if exc is not None:
                log.warning("rate-limit storage failing, not limiting until it is back: %s", exc)
            else:
                log.warning("rate-limit storage is back, limiting again")
