"""A bounded memory of upstream answers (per process): the most recently used kept, the least recent dropped."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from time import monotonic
from typing import Generic, TypeVar

# Upstream answers remembered per process in each table.
ANSWERS = 10_000

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Recent(Generic[K, V]):
    """The `limit` most recently used entries."""

    def __init__(self, limit: int = ANSWERS) -> None:
        self._limit = limit
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        if len(self._items) > self._limit:
            self._items.popitem(last=False)

    def pop(self, key: K) -> None:
        self._items.pop(key, None)


class RecentBytes(Generic[K]):
    """The most recently used byte strings, `limit` bytes in all; one larger than `largest` is not kept."""

    def __init__(self, limit: int, largest: int) -> None:
        self._limit = limit
        self._largest = largest
        self._size = 0
        self._items: OrderedDict[K, bytes] = OrderedDict()

    def get(self, key: K) -> bytes | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: bytes) -> None:
        if len(value) > self._largest:
            return
        old = self._items.pop(key, None)
        self._size += len(value) - (len(old) if old is not None else 0)
        self._items[key] = value
        while self._size > self._limit:
            self._size -= len(self._items.popitem(last=False)[1])


class Fresh(Generic[K, V]):
    """Index rows read within the last `seconds` (per process), so a hot tag's hit skips its SQLite reads.
    Writes made through this process forget their key at once; others' (another worker, the cache CLI)
    are seen within `seconds`. Only rows that exist (a true value) are kept: a miss always asks the index."""

    def __init__(self, seconds: float = 1.0, limit: int = ANSWERS) -> None:
        self._seconds = seconds
        self._rows: Recent[K, tuple[float, V]] = Recent(limit)

    def get(self, key: K) -> V | None:
        found = self._rows.get(key)
        if found is None or monotonic() >= found[0]:
            return None
        return found[1]

    def put(self, key: K, value: V, seconds: float | None = None) -> None:
        """Kept for the table's `seconds`, or fewer."""
        kept = self._seconds if seconds is None else min(seconds, self._seconds)
        self._rows.put(key, (monotonic() + kept, value))

    async def read(self, key: K, load: Callable[[], Awaitable[V | None]]) -> V | None:
        """The row read within the last `seconds`, else `load`ed now (and kept if there is one)."""
        value = self.get(key)
        if value is None:
            value = await load()
            if value:
                self.put(key, value)
        return value

    def forget(self, key: K) -> None:
        self._rows.pop(key)
