"""Domain errors, each knowing its OCI error code and HTTP status; turned into responses in one place."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web


class RegistryError(Exception):
    """An error a registry client should see as `{"errors":[{"code","message","detail"}]}`."""

    status = 500
    code = "UNKNOWN"

    def __init__(self, message: str, detail: Any = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        return error_response(self.status, self.code, self.message, self.detail, self.headers)


def error_response(
    status: int, code: str, message: str, detail: Any = None, headers: Mapping[str, str] | None = None
) -> web.Response:
    """The OCI distribution error body with the given status."""
    body = {"errors": [{"code": code, "message": message, "detail": detail if detail is not None else {}}]}
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json", headers=headers)


class NameInvalid(RegistryError):
    status, code = 400, "NAME_INVALID"


class NameUnknown(RegistryError):
    status, code = 404, "NAME_UNKNOWN"


class DigestInvalid(RegistryError):
    status, code = 400, "DIGEST_INVALID"


class ManifestUnknown(RegistryError):
    status, code = 404, "MANIFEST_UNKNOWN"


class BlobUnknown(RegistryError):
    status, code = 404, "BLOB_UNKNOWN"


class RangeInvalid(RegistryError):
    status, code = 416, "RANGE_INVALID"


class Unsupported(RegistryError):
    status, code = 405, "UNSUPPORTED"


class BadRequest(RegistryError):
    """A request that is not one cargohold understands (a form without its required fields)."""

    status, code = 400, "UNSUPPORTED"


class NotFound(RegistryError):
    """No such endpoint: the spec defines no code for it, UNSUPPORTED is the one that fits."""

    status, code = 404, "UNSUPPORTED"


class Unauthorized(RegistryError):
    """No usable credentials: the client should log in (the challenge goes in WWW-Authenticate)."""

    status, code = 401, "UNAUTHORIZED"


class Denied(RegistryError):
    """Logged in, but the access rules do not allow this."""

    status, code = 403, "DENIED"


class UpstreamError(RegistryError):
    """The upstream could not give a usable answer; serving stale content is allowed."""

    status, code = 502, "UNAVAILABLE"


class UpstreamUnavailable(UpstreamError):
    """Refused connection, 5xx or 429 after retries."""

    status = 503


class UpstreamTimeout(UpstreamError):
    status = 504


class UpstreamRateLimited(UpstreamError):
    """The upstream's pull quota is spent (a 429), or at the reserve kept for waiting clients: 429 with the
    upstream's Retry-After, not 503, so clients back off as the upstream asked; stale content may be served."""

    status, code = 429, "TOOMANYREQUESTS"


class UpstreamInvalid(UpstreamError):
    """The upstream answered with something we refuse to cache or serve (bad digest, bad JSON, too big)."""

    status = 502


class TooManyRequests(RegistryError):
    """A client went over one of its rate-limit budgets; Retry-After says when to come back."""

    status, code = 429, "TOOMANYREQUESTS"


class StorageUnavailable(RegistryError):
    """The cache's shared storage (a bucket) failed or changed under a request; a retry may work."""

    status, code = 503, "UNAVAILABLE"
