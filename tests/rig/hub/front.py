"""The counting front: a reverse proxy before the registry that records, applies faults and pull limits."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .wire import BLOB_RE, CHUNK, HOP_BY_HOP, MANIFEST_RE, oci_error


class Front:
    """The counting front (a part of `Hub`)."""

    async def _front(self, request: web.Request) -> web.StreamResponse:
        rec, fault, early = await self._enter("registry", request)
        if early is not None:
            return early
        assert self._session is not None
        method = request.method
        mm = MANIFEST_RE.match(request.path)
        extra_headers: dict[str, str] = {}
        counted = ""  # the address or account a manifest GET is counted against, when the quota is on
        if mm and self.pull_limit is not None:
            source = self.pull_source(request)
            remaining = max(0, self.pull_limit - self.pulls(source))
            extra_headers = {
                "ratelimit-limit": f"{self.pull_limit};w=21600",
                "ratelimit-remaining": f"{remaining};w=21600",
                "docker-ratelimit-source": source,
            }
            if method == "GET" and remaining == 0:
                rec.status = 429
                return self.pull_limit_reached(extra_headers)
            counted = source if method == "GET" else ""  # HEAD is never counted
        bm = BLOB_RE.match(request.path)
        redirect = bool(
            self.redirect_blobs and bm and (method == "GET" or (method == "HEAD" and self.redirect_blob_heads))
        )
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP)
        data = request.content if request.body_exists else None
        if data is None:
            headers.popall("Content-Length", None)
        target = URL(self.registry_url + request.raw_path, encoded=True)
        skip = ("User-Agent", "Accept-Encoding", "Content-Type")
        try:
            if redirect:
                # Ask the registry (auth included) whether it would answer 200; only then redirect.
                async with self._session.head(
                    target, headers=headers, allow_redirects=False, skip_auto_headers=skip
                ) as probe:
                    if probe.status == 200:
                        assert bm is not None
                        loc = self.cdn_location(bm.group("digest"))
                        rec.status = 307
                        rec.redirected_to = loc
                        return web.Response(
                            status=307,
                            headers={
                                "Location": loc,
                                "Docker-Distribution-Api-Version": "registry/2.0",
                                "Content-Type": "text/html; charset=utf-8",
                            },
                        )
            up_cm = self._session.request(
                method, target, headers=headers, data=data, allow_redirects=False, skip_auto_headers=skip
            )
            async with up_cm as up:
                rec.status = up.status
                if counted and up.status == 200:
                    remaining = self.count_pull(counted)
                    extra_headers["ratelimit-remaining"] = f"{remaining};w=21600"
                resp = web.StreamResponse(status=up.status, reason=up.reason)
                for k, v in up.headers.items():
                    kl = k.lower()
                    if kl not in HOP_BY_HOP and kl != "content-length":
                        resp.headers.add(k, v)
                for k, v in extra_headers.items():
                    resp.headers[k] = v
                cl = up.headers.get("Content-Length")
                delta = fault.length_delta if fault is not None else 0
                if cl is not None:
                    resp.content_length = int(cl) + delta
                await resp.prepare(request)
                if method != "HEAD":
                    await self._pump(up.content.iter_chunked(CHUNK), resp, request, fault, rec)
                if delta > 0 and method != "HEAD" and request.transport is not None:
                    rec.aborted = True  # the promised extra bytes never come
                    request.transport.abort()
                if not rec.aborted:
                    await resp.write_eof()
                return resp
        except (TimeoutError, aiohttp.ClientConnectionError) as exc:
            if rec.aborted:
                raise asyncio.CancelledError from exc
            rec.status = 502
            return oci_error("UNAVAILABLE", f"hub front: registry unreachable: {exc}", 502)
