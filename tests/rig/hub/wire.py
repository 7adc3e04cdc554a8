"""HTTP pieces every part of the hub uses: OCI error bodies, hop-by-hop headers, the paths it counts."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from aiohttp import web

#: Headers that belong to one hop and are never forwarded by the front.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
BLOB_RE = re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<digest>sha256:[a-f0-9]{64})$")
MANIFEST_RE = re.compile(r"^/v2/(?P<name>.+)/manifests/(?P<ref>[^/]+)$")
CHUNK = 256 * 1024


def oci_error(code: str, message: str, status: int, headers: Mapping[str, str] | None = None) -> web.Response:
    body = json.dumps({"errors": [{"code": code, "message": message, "detail": None}]})
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)


STATUS_CODES = {
    400: "UNSUPPORTED",
    401: "UNAUTHORIZED",
    403: "DENIED",
    404: "NAME_UNKNOWN",
    429: "TOOMANYREQUESTS",
    500: "UNKNOWN",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "UNAVAILABLE",
}


async def read_file(path: Path, chunk: int = CHUNK) -> AsyncIterator[bytes]:
    """Chunks of a file without blocking the loop for long (reads are page-cache fast here)."""
    loop = asyncio.get_running_loop()
    with await loop.run_in_executor(None, path.open, "rb") as f:
        while True:
            data = await loop.run_in_executor(None, f.read, chunk)
            if not data:
                return
            yield data
