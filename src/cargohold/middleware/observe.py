"""Request ids, the access log, and the one place where errors become OCI JSON responses."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from cargohold.errors import NotFound, RegistryError, Unsupported, error_response
from cargohold.identity import IDENTITY, Identity, client_address
from cargohold.keys import CACHE, REQUEST_ID, SETTINGS

log = logging.getLogger("cargohold.server")
access = logging.getLogger("cargohold.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_SECRET_QUERY = re.compile(r"(?i)((?:password|passwd|secret|token|access_token|client_secret)=)[^&]*")


def mask_secrets(text: str) -> str:
    """Hide passwords and tokens in URLs before they are logged."""
    text = re.sub(r"(://[^/@:\s]+:)[^/@\s]+@", r"\1***@", text)
    return _SECRET_QUERY.sub(r"\1***", text)


def _as_registry_error(exc: web.HTTPException) -> web.Response:
    if exc.status == 404:
        return NotFound("no such endpoint").response()
    if exc.status == 405:
        return Unsupported("method not supported by this mirror").response()
    return error_response(exc.status, "UNKNOWN" if exc.status >= 500 else "UNSUPPORTED", exc.reason)


@web.middleware
async def observe(request: web.Request, handler: web.RequestHandler) -> web.StreamResponse:
    """Outermost middleware: every failure leaves as an OCI error, never as a traceback."""
    given = request.headers.get("X-Request-Id", "")
    request[REQUEST_ID] = given if _REQUEST_ID.match(given) else uuid.uuid4().hex[:16]
    request[CACHE] = "-"
    request[IDENTITY] = Identity(client_address(request, request.app[SETTINGS].rate_limit.trusted_proxies))
    try:
        return await handler(request)
    except RegistryError as exc:
        return exc.response()
    except web.HTTPException as exc:
        return _as_registry_error(exc)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("request %s %s failed (rid=%s)", request.method, mask_secrets(request.path), request[REQUEST_ID])
        return error_response(500, "UNKNOWN", "internal error", {"request_id": request[REQUEST_ID]})


async def stamp_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Headers every response carries, streamed ones included (runs just before headers go out)."""
    response.headers["X-Request-Id"] = request.get(REQUEST_ID, "-")
    if request.path.startswith("/v2"):
        response.headers["Docker-Distribution-API-Version"] = "registry/2.0"


class AccessLogger(AbstractAccessLogger):
    """One line per request: who, what, status, bytes, time, and whether the cache answered."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        who = request.get(IDENTITY) or Identity(client_address(request, ()))
        self.logger.info(
            "%s %s %s %s %d %d %.1fms cache=%s rid=%s",
            who.address,
            who.user or "-",
            request.method,
            mask_secrets(request.path_qs),
            response.status,
            response.body_length,
            time * 1000,
            request.get(CACHE, "-"),
            request.get(REQUEST_ID, "-"),
        )
