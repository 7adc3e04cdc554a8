"""The "CDN" on another loopback host that blob GETs may be redirected to, with signed expiring URLs."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from pathlib import Path

from aiohttp import web

from .wire import read_file


class Cdn:
    """The CDN (a part of `Hub`)."""

    def blob_path(self, digest: str) -> Path:
        """Where the registry keeps a blob's bytes on disk (filesystem driver layout)."""
        algo, _, hexd = digest.partition(":")
        return self.storage_dir / "docker/registry/v2/blobs" / algo / hexd[:2] / hexd / "data"

    def _cdn_sign(self, path: str, expires: int) -> str:
        return hmac.new(self._cdn_secret, f"{path}:{expires}".encode(), hashlib.sha256).hexdigest()

    def cdn_location(self, digest: str, ttl: int = 600) -> str:
        """A presigned CDN URL for a blob, like Docker Hub's redirects to its CDN."""
        path = f"/registry-v2/docker/registry/v2/blobs/sha256/{digest[7:9]}/{digest[7:]}/data"
        expires = int(time.time()) + ttl
        return f"{self.cdn_url}{path}?expires={expires}&signature={self._cdn_sign(path, expires)}"

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        rec, fault, early = await self._enter("cdn", request)
        if early is not None:
            return early
        m = re.match(r"^/registry-v2/docker/registry/v2/blobs/sha256/[a-f0-9]{2}/([a-f0-9]{64})/data$", request.path)
        if m is None:
            rec.status = 404
            return web.Response(status=404, text="NoSuchKey")
        if "Authorization" in request.headers and self.cdn_reject_auth:
            rec.status = 400
            return web.Response(
                status=400,
                content_type="application/xml",
                text="<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed</Message></Error>",
            )
        try:
            expires = int(request.query.get("expires", "0"))
        except ValueError:
            expires = 0
        sig = request.query.get("signature", "")
        if expires < time.time() or not hmac.compare_digest(sig, self._cdn_sign(request.path, expires)):
            rec.status = 403
            return web.Response(
                status=403, content_type="application/xml", text="<Error><Code>AccessDenied</Code></Error>"
            )
        path = self.blob_path("sha256:" + m.group(1))
        if not path.exists():
            rec.status = 404
            return web.Response(status=404, text="NoSuchKey")
        size = path.stat().st_size
        if fault is None and request.method == "GET" and "Range" not in request.headers:
            rec.status = 200
            rec.bytes_sent = size
            return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})
        if "Range" in request.headers and fault is None:
            rec.status = 206
            return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/octet-stream"})
        resp.content_length = size
        rec.status = 200
        await resp.prepare(request)
        if request.method != "HEAD":
            await self._pump(read_file(path), resp, request, fault, rec)
        if not rec.aborted:
            await resp.write_eof()
        return resp
