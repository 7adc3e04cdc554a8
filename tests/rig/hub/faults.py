"""Injected faults: which request a fault applies to, and the body pump that delays, throttles, corrupts or cuts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from .records import Fault, Recorded
from .wire import STATUS_CODES, oci_error


class Faults:
    """Fault injection (a part of `Hub`)."""

    def inject(self, **kwargs: Any) -> Fault:
        """Add a Fault (see its doc); the first matching fault applies. Returns it (see .hits)."""
        f = Fault(**kwargs)
        with self._lock:
            self._faults.append(f)
        return f

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, service: str, request: web.Request) -> Fault | None:
        with self._lock:
            for f in self._faults:
                if f.matches(service, request.method, request.path):
                    f.hits += 1
                    return f
        return None

    async def _enter(
        self, service: str, request: web.Request
    ) -> tuple[Recorded, Fault | None, web.StreamResponse | None]:
        """Every service's first steps: drop the request while the service is down, record it, take its fault
        and the early answer that fault gives (None: go on, with the fault still to shape the body)."""
        if self._is_down(service, request):
            raise asyncio.CancelledError
        rec = self._record(service, request)
        fault = self._take_fault(service, request)
        return rec, fault, await self._pre_fault(fault, request, rec)

    async def _pre_fault(self, fault: Fault | None, request: web.Request, rec: Recorded) -> web.StreamResponse | None:
        """Apply the request-level part of a fault; a response means: answer this."""
        if fault is None:
            return None
        rec.fault = fault.describe()
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.hold:
            await fault.park()
        if fault.reset:
            rec.aborted = True
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError  # nothing more to say on a dead connection
        if fault.status is not None:
            rec.status = fault.status
            if fault.body is not None:
                resp = web.Response(status=fault.status, body=fault.body, headers=dict(fault.headers))
            else:
                code = STATUS_CODES.get(fault.status, "UNKNOWN")
                resp = oci_error(code, f"injected fault {fault.status}", fault.status, dict(fault.headers))
            return resp
        return None

    async def _pump(
        self,
        chunks: AsyncIterator[bytes],
        resp: web.StreamResponse,
        request: web.Request,
        fault: Fault | None,
        rec: Recorded,
    ) -> None:
        """Copy a body to the client chunk by chunk, applying rate/corrupt/truncate faults."""
        started = time.monotonic()
        corrupted = False
        held = False
        try:
            async for received in chunks:
                chunk = received  # cut, corrupted or held back below
                if not chunk:
                    continue
                if (
                    fault is not None
                    and fault.hold_after is not None
                    and not held
                    and rec.bytes_sent + len(chunk) >= fault.hold_after
                ):
                    cut = fault.hold_after - rec.bytes_sent
                    head, chunk = chunk[:cut], chunk[cut:]
                    if head:
                        await resp.write(head)
                        rec.bytes_sent += len(head)
                    held = True
                    await fault.park()
                    if not chunk:
                        continue
                if fault is not None:
                    if fault.truncate is not None and rec.bytes_sent + len(chunk) >= fault.truncate:
                        chunk = chunk[: max(0, fault.truncate - rec.bytes_sent)]
                        if chunk:
                            await resp.write(chunk)
                            rec.bytes_sent += len(chunk)
                        rec.aborted = True
                        if request.transport is not None:
                            request.transport.abort()
                        return
                    if fault.corrupt and not corrupted:
                        chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                        corrupted = True
                if fault is None or not fault.rate:
                    await resp.write(chunk)
                    rec.bytes_sent += len(chunk)
                    continue
                # Throttled: small pieces, each sent no earlier than its last byte is due.
                step = max(1, int(fault.rate / 20))
                for i in range(0, len(chunk), step):
                    piece = chunk[i : i + step]
                    due = (rec.bytes_sent + len(piece)) / fault.rate - (time.monotonic() - started)
                    if due > 0:
                        await asyncio.sleep(due)
                    await resp.write(piece)
                    rec.bytes_sent += len(piece)
        except (ConnectionError, aiohttp.ClientConnectionError):
            rec.aborted = True
