"""Concurrent requests per client key, counted in this process.

Over the cap a request waits for a free slot instead of failing: registry clients open several
connections for one pull (skopeo 6, dockerd 3 per pull) and few of them retry a refused blob, and a
CI fleet or a cluster behind one NAT address is many pulls from one key at once. Waiting costs a
coroutine and a socket; refusing a legitimate pull costs a failed deploy. So a request is refused
only past QUEUE waiters per slot (a flood: thousands of requests from one key), or after waiting
WAIT seconds without getting a slot (the key's running requests are stuck, not just busy).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

WAIT = 300.0  # as long as the default send_timeout lets one stalled blob response hold a slot
QUEUE = 32  # waiters per slot: 20 clients x 3 blobs behind one address wait 2 per slot of team's 20


@dataclass(slots=True)
class _Gate:
    slots: asyncio.Semaphore
    cap: int
    users: int = 0  # running plus waiting


class Connections:
    """One semaphore per active key; dropped again when nobody holds or waits for it."""

    def __init__(self, wait: float = WAIT, queue: int = QUEUE) -> None:
        self._gates: dict[str, _Gate] = {}
        self._wait = wait
        self._queue = queue

    async def acquire(self, key: str, cap: int) -> bool:
        """Take a slot (waiting for one if needed); False when the key has too many requests open."""
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = _Gate(asyncio.Semaphore(cap), cap)
        if gate.users >= (1 + self._queue) * gate.cap:
            return False
        gate.users += 1
        try:
            if gate.slots.locked():
                await asyncio.wait_for(gate.slots.acquire(), self._wait)
            else:
                await gate.slots.acquire()
        except TimeoutError:
            self._leave(key, gate)
            return False
        except BaseException:
            self._leave(key, gate)
            raise
        return True

    def release(self, key: str) -> None:
        gate = self._gates[key]
        gate.slots.release()
        self._leave(key, gate)

    def active(self, key: str) -> int:
        """Requests running or waiting for `key` (for tests and metrics)."""
        gate = self._gates.get(key)
        return gate.users if gate else 0

    def _leave(self, key: str, gate: _Gate) -> None:
        gate.users -= 1
        if gate.users == 0:
            del self._gates[key]
