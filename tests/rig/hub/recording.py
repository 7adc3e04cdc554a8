"""Queries over the recorded requests: how many manifest and blob requests, bytes sent, tokens asked."""

from __future__ import annotations

import re
import time

from aiohttp import web

from .records import Recorded


class Recording:
    """The hub's record of requests (a part of `Hub`)."""

    @property
    def requests(self) -> list[Recorded]:
        """A snapshot of every request recorded since the last reset (all services)."""
        with self._lock:
            return list(self._records)

    def requests_matching(
        self,
        method: str | None = None,
        path_regex: str | None = None,
        *,
        service: str | None = "registry",
        status: int | None = None,
        has_auth: bool | None = None,
    ) -> list[Recorded]:
        """Recorded requests filtered by service (None = any), method, path regex, status, auth."""
        out = []
        for r in self.requests:
            if service is not None and r.service != service:
                continue
            if method is not None and r.method != method.upper():
                continue
            if path_regex is not None and not re.search(path_regex, r.path):
                continue
            if status is not None and r.status != status:
                continue
            if has_auth is not None and r.has_auth != has_auth:
                continue
            out.append(r)
        return out

    def count(
        self,
        method: str | None = None,
        path_regex: str | None = None,
        *,
        service: str | None = "registry",
        status: int | None = None,
        has_auth: bool | None = None,
    ) -> int:
        """How many recorded requests match (default: requests that reached the front)."""
        return len(self.requests_matching(method, path_regex, service=service, status=status, has_auth=has_auth))

    def manifest_count(self, method: str | None = None, repo: str | None = None) -> int:
        """Requests for manifests (optionally of one repo) that reached the front."""
        rx = rf"^/v2/{re.escape(repo)}/manifests/" if repo else r"^/v2/.+/manifests/"
        return self.count(method, rx)

    def blob_count(self, method: str | None = None, digest: str | None = None) -> int:
        """Blob requests that reached the front (optionally for one digest)."""
        rx = rf"/blobs/{re.escape(digest)}$" if digest else r"/blobs/sha256:[a-f0-9]{64}$"
        return self.count(method, rx)

    def bytes_sent(self, path_regex: str | None = None, *, service: str | None = None) -> int:
        """Body bytes the hub (front and CDN by default) sent for matching requests."""
        rs = self.requests_matching(None, path_regex, service=service)
        return sum(r.bytes_sent for r in rs if r.service != "token")

    @property
    def cdn_requests(self) -> list[Recorded]:
        return self.requests_matching(service="cdn")

    @property
    def token_requests(self) -> list[Recorded]:
        return self.requests_matching(service="token")

    def reset_counts(self) -> None:
        """Forget recorded requests and the pull-limit counter."""
        with self._lock:
            self._records.clear()
            self._pulls.clear()

    def _record(self, service: str, request: web.Request) -> Recorded:
        headers: dict[str, str] = {}
        for name, v in request.headers.items():
            k = name.lower()
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
        rec = Recorded(
            service=service,
            method=request.method,
            path=request.path,
            query_string=request.query_string,
            query=list(request.query.items()),
            headers=headers,
            remote=request.remote,
            time=time.time(),
        )
        with self._lock:
            self._records.append(rec)
        return rec
