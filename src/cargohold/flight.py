"""Single-flight for coroutines: concurrent callers with the same key share one execution."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

from cargohold.tasks import Tasks

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """One running task per key, owned by the app's `Tasks` (cancelled and awaited at shutdown).
    A caller that goes away (cancelled) does not cancel the task; its failure goes to its callers."""

    def __init__(self, tasks: Tasks, name: str) -> None:
        self._owner = tasks
        self._name = name
        self._tasks: dict[Hashable, asyncio.Task[T]] = {}
        self.joins = 0

    async def run(self, key: Hashable, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        task = self._tasks.get(key)
        if task is None:
            task = self._owner.spawn_awaited(fn(), f"{self._name} {key}")
            self._tasks[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        else:
            self.joins += 1
        return await asyncio.shield(task)

    def _finished(self, key: Hashable, task: asyncio.Task[T]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]

    def __len__(self) -> int:
        return len(self._tasks)
