"""The calling thread's running event loop, for work batched until the end of the loop's iteration."""

from __future__ import annotations

import asyncio
import threading


class ThisLoop:
    """Remembered with its thread: `asyncio.get_running_loop` makes a getpid() system call each time on
    Python 3.11, and the access log and the response counters ask on every request."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0

    def get(self) -> asyncio.AbstractEventLoop | None:
        """The loop running in this thread; None when none is (another thread, or no loop at all)."""
        loop = self._loop
        if loop is not None and self._thread == threading.get_ident() and loop.is_running():
            return loop
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        self._loop, self._thread = loop, threading.get_ident()
        return loop
