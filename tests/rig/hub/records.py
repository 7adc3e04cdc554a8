"""What the hub records of each request, and the faults a test injects into its answers."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from rig.util import RigError


@dataclass
class Recorded:
    """One request seen by the hub (front, token service or CDN)."""

    service: str  # "registry" (the front), "token" or "cdn"
    method: str
    path: str
    query_string: str
    query: list[tuple[str, str]]
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    remote: str | None
    time: float
    status: int | None = None
    bytes_sent: int = 0  # response body bytes written to the client
    user: str | None = None  # token service: the Basic-auth user, if any
    redirected_to: str | None = None  # front: the CDN location of a 307
    fault: str | None = None  # what injected fault (if any) shaped the answer
    aborted: bool = False  # the client went away, or a fault cut the connection

    @property
    def has_auth(self) -> bool:
        """Whether an Authorization header reached this service."""
        return "authorization" in self.headers

    def param(self, name: str) -> list[str]:
        return [v for k, v in self.query if k == name]


@dataclass
class Fault:
    """An injected misbehaviour for requests matching (service, method, path_regex).

    status/body/headers: answer with this instead of forwarding (OCI error JSON by default).
    delay: seconds to wait before handling. rate: bytes/second for the response body.
    corrupt: flip one byte of the body (same length). truncate: cut the connection after that
    many body bytes. reset: cut the connection without any answer. length_delta: the front
    declares a Content-Length this much off the real one (negative: the body is cut short at
    the declared length; positive: the connection closes once the real body is sent). times: how many matching
    requests it applies to (None = until cleared); `hits` counts them.
    hold: park matching requests before they are forwarded until `release()`;
    hold_after: send that many body bytes, then park until `release()` (a download "in flight").
    Parked requests are counted in `waiting`; they give up after hold_timeout seconds.
    """

    service: str = "registry"
    method: str | None = None
    path_regex: str | None = None
    status: int | None = None
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    rate: float | None = None
    corrupt: bool = False
    truncate: int | None = None
    length_delta: int = 0
    reset: bool = False
    hold: bool = False
    hold_after: int | None = None
    hold_timeout: float = 60.0
    times: int | None = None
    hits: int = 0
    waiting: int = 0
    gate: threading.Event = field(default_factory=threading.Event, repr=False)

    def release(self) -> None:
        """Let every held request (now and later) go on."""
        self.gate.set()

    def wait_waiting(self, n: int, timeout: float = 10.0) -> None:
        """Block until at least n requests are parked at this fault (bounded)."""
        deadline = time.monotonic() + timeout
        while self.waiting < n:
            if time.monotonic() > deadline:
                raise RigError(f"only {self.waiting} of {n} requests reached the held fault in {timeout}s")
            time.sleep(0.01)

    async def park(self) -> None:
        self.waiting += 1
        try:
            deadline = time.monotonic() + self.hold_timeout
            # The gate is a threading.Event (tests release it from their own thread): poll it.
            while not self.gate.is_set() and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        finally:
            self.waiting -= 1

    def matches(self, service: str, method: str, path: str) -> bool:
        if self.service != service or (self.times is not None and self.hits >= self.times):
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        return self.path_regex is None or re.search(self.path_regex, path) is not None

    def describe(self) -> str:
        parts = [
            f"{k}={v!r}"
            for k, v in (
                ("status", self.status),
                ("delay", self.delay or None),
                ("rate", self.rate),
                ("corrupt", self.corrupt or None),
                ("truncate", self.truncate),
                ("length_delta", self.length_delta or None),
                ("reset", self.reset or None),
                ("hold", self.hold or None),
                ("hold_after", self.hold_after),
            )
            if v is not None
        ]
        return "Fault(" + ", ".join(parts) + ")"
