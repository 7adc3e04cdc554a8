"""The one owner of an app's background tasks: spawned here, cancelled and awaited at shutdown.

Modelled on aiojobs' Scheduler (`spawn`, close in a cleanup context), smaller: a task nobody
awaits that fails is logged once here, with its name; a task whose callers await it
(`spawn_awaited`, as single-flight does behind `asyncio.shield`) hands its failure to them and is
not logged. `close` cancels what is left and awaits it within a bound, so shutdown neither hangs
nor leaves "Task was destroyed but it is pending".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

log = logging.getLogger("cargohold.tasks")

T = TypeVar("T")

# How long shutdown waits for cancelled tasks to finish their cleanup (a download removing its temp file).
CLOSE_TIMEOUT = 10.0


class Closed(RuntimeError):
    """Spawning on a supervisor that has been closed (the app is stopping)."""


class Tasks:
    """Background tasks of one lifetime (an app, the TLS listener); `async with` closes them."""

    def __init__(self, close_timeout: float = CLOSE_TIMEOUT) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._awaited: set[asyncio.Task[Any]] = set()
        self._close_timeout = close_timeout
        self._closed = False

    def spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        """Run `coro` in the background until it ends or the owner closes; a failure is logged."""
        if self._closed:
            coro.close()
            raise Closed(f"cannot start {name}: shutting down")
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def spawn_awaited(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        """Like `spawn`, for a task whose callers await it: its failure is theirs, not logged here."""
        task = self.spawn(coro, name)
        self._awaited.add(task)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        awaited = task in self._awaited
        self._awaited.discard(task)
        if task.cancelled():
            return
        exc = task.exception()  # retrieved, so asyncio does not report it as lost
        if exc is not None and not awaited:
            log.error("background task %s failed: %s: %s", task.get_name(), type(exc).__name__, exc, exc_info=exc)

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        """Cancel every task and await them (at most `close_timeout`); no new ones start after this."""
        self._closed = True
        pending = set(self._tasks)
        for task in pending:
            task.cancel()
        if not pending:
            return
        _, stuck = await asyncio.wait(pending, timeout=self._close_timeout)
        for task in stuck:
            log.error("background task %s did not stop within %.0fs of shutdown", task.get_name(), self._close_timeout)

    async def __aenter__(self) -> Tasks:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
