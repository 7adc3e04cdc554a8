"""GET/HEAD /v2/<name>/blobs/<digest>: resolve the blob, judge Range and the conditional headers
against its digest (the blob's ETag), and let it send itself (see `cargohold.blobsource`)."""

from __future__ import annotations

import re

from aiohttp import ETag, hdrs, web

from cargohold.errors import RangeInvalid, RegistryError
from cargohold.handlers.sending import blob_headers
from cargohold.handlers.target import proxy_of, target_of
from cargohold.keys import CACHE, SETTINGS
from cargohold.oci.digests import Digest

# One byte range: `first-last`, `first-` or the suffix `-length` (several ranges are not supported).
# ASCII digits, and few enough for int() (which refuses over 4,300): more is a malformed Range.
_RANGE = re.compile(r"bytes=([0-9]{0,100})-([0-9]{0,100})")


class PreconditionFailed(RegistryError):
    """If-Match named no ETag of this blob (its digest)."""

    status, code = 412, "PRECONDITION_FAILED"


async def get_blob(request: web.Request) -> web.StreamResponse:
    digest = Digest.parse(request.match_info["digest"])
    source = await proxy_of(request).blob(target_of(request), digest, body=request.method != hdrs.METH_HEAD)
    request[CACHE] = source.cache
    async with source:
        if not_modified(request, digest):
            return web.Response(status=304, headers=blob_headers(digest))
        span = requested_range(request, source.size) if range_applies(request, digest) else None
        try:
            return await source.send(request, span, request.app[SETTINGS].send_timeout)
        finally:
            request[CACHE] = source.cache  # a copy gone from the bucket meanwhile was fetched again


def _names(etags: tuple[ETag, ...], digest: Digest, *, weak: bool) -> bool:
    """Whether a list of entity tags names this blob (`*` names every blob); a weak tag only in a
    weak comparison (If-None-Match), as RFC 9110 says."""
    return any(e.value in ("*", str(digest)) and (weak or not e.is_weak) for e in etags)


def not_modified(request: web.Request, digest: Digest) -> bool:
    """True for a 304: If-None-Match names the digest. PreconditionFailed when If-Match names other
    tags only. (A blob never changes, so dates say nothing: If-(Un)Modified-Since are ignored.)"""
    if_match, if_none_match = request.if_match, request.if_none_match
    if if_match is not None and not _names(if_match, digest, weak=False):
        raise PreconditionFailed("If-Match does not name this blob", {"digest": str(digest)})
    return if_none_match is not None and _names(if_none_match, digest, weak=True)


def range_applies(request: web.Request, digest: Digest) -> bool:
    """Range counts unless If-Range names something else (another tag, or a date: we send no
    Last-Modified), in which case the whole blob is sent."""
    if_range = request.headers.get(hdrs.IF_RANGE)
    return if_range is None or if_range.strip() == f'"{digest}"'


def requested_range(request: web.Request, size: int | None) -> tuple[int, int] | None:
    """The single byte range asked for as `[start, end)`, None for the whole blob; 416 if unusable."""
    header = request.headers.get(hdrs.RANGE)
    if header is None:
        return None
    found = _RANGE.fullmatch(header.replace(" ", ""))
    if found is None or found.group(1) == found.group(2) == "":
        raise RangeInvalid("malformed Range header", {"range": header[:100]})
    first, last = found.group(1), found.group(2)
    if first and last and int(last) < int(first):
        raise RangeInvalid("malformed Range header", {"range": header[:100]})
    if size is None:
        return None  # size not known yet: send it all, which a Range client must accept
    if first:
        start, end = int(first), size if not last else min(int(last) + 1, size)
    else:  # a suffix: the last N bytes; none at all (`-0`) is not satisfiable
        start, end = max(size - int(last), 0), size if int(last) else 0
    if start >= size or start >= end:
        raise RangeInvalid("requested range not satisfiable", {"size": size}, {"Content-Range": f"bytes */{size}"})
    return start, end
