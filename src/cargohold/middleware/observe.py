"""Request ids, the access log, and the one place where errors become OCI JSON responses."""

from __future__ import annotations

import asyncio
import logging
import re
from time import time as wall_time

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler

from cargohold import logs
from cargohold.errors import NotFound, RegistryError, Unsupported, error_response
from cargohold.identity import IDENTITY, Identity, client_address
from cargohold.keys import CACHE, KIND, REQUEST_ID, REQUEST_IDS, SETTINGS
from cargohold.logs import ACCESS_LINE, mask_secrets
from cargohold.metrics import kind_of_route, route_of

log = logging.getLogger("cargohold.server")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # fullmatch: a final newline would end up in the log
# The status the access log shows for a client that went away before its answer was out (as nginx).
CLIENT_GONE = 499


def _as_registry_error(exc: web.HTTPException) -> web.Response:
    if exc.status == 404:
        return NotFound("no such endpoint").response()
    if exc.status == 405:
        return Unsupported("method not supported by this mirror").response()
    return error_response(exc.status, "UNKNOWN" if exc.status >= 500 else "UNSUPPORTED", exc.reason)


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost middleware: every failure leaves as an OCI error, never as a traceback."""
    given = request.headers.get("X-Request-Id", "")
    request[REQUEST_ID] = given if given and _REQUEST_ID.fullmatch(given) else request.app[REQUEST_IDS].next()
    logs.request_id.set(request[REQUEST_ID])
    request[CACHE] = "-"
    request[KIND] = kind_of_route(route_of(request))  # here, routed: the access log may see a request that never was
    request[IDENTITY] = Identity(client_address(request, request.app[SETTINGS].rate_limit.trusted_proxies))
    try:
        return await handler(request)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - the one place where a failure becomes an answer
        answer = _answer(request, exc)
    # A response on its way already (an error now would be read as the rest of its body), or a client
    # gone: cutting the connection is the only signal left. aiohttp then fails to send `answer`
    # quietly and access-logs it.
    if (request.writer.output_size or answer.status == CLIENT_GONE) and request.transport is not None:
        request.transport.abort()
    return answer


def _answer(request: web.Request, exc: Exception) -> web.StreamResponse:
    if isinstance(exc, RegistryError):
        return exc.response()
    if isinstance(exc, web.HTTPException):
        return _as_registry_error(exc)
    if isinstance(exc, ConnectionResetError):  # the client went away before its answer was out
        log.debug("client went away: %s %s: %s", request.method, mask_secrets(request.path), exc)
        return web.Response(status=CLIENT_GONE)
    log.error(
        "request %s %s failed (rid=%s)", request.method, mask_secrets(request.path), request[REQUEST_ID], exc_info=exc
    )
    return error_response(500, "UNKNOWN", "internal error", {"request_id": request[REQUEST_ID]})


def stamp_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Headers every response carries, streamed ones included (runs just before headers go out)."""
    response.headers["X-Request-Id"] = request.get(REQUEST_ID, "-")
    # Content comes from upstreams and bundles: a browser must take its Content-Type as given, never sniff HTML.
    response.headers["X-Content-Type-Options"] = "nosniff"
    if request.path.startswith("/v2"):
        response.headers["Docker-Distribution-API-Version"] = "registry/2.0"


class AccessLogger(AbstractAccessLogger):
    """One line per request: who, what, status, bytes, time, and whether the cache answered."""

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        self._direct = logs.direct_access(logger)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        who = request.get(IDENTITY) or Identity(client_address(request, ()))
        fields = {
            "client": who.address,
            "user": who.user or "-",
            "method": request.method,
            "path": mask_secrets(request.path_qs),
            "status": response.status,
            "bytes": response.body_length,
            "ms": round(time * 1000, 1),
            "kind": request.get(KIND, "-"),
            "cache": request.get(CACHE, "-"),
            "request_id": request.get(REQUEST_ID, "-"),
        }
        if self._direct is not None:
            self._direct.access(fields, wall_time())
            return
        # A record made here, not through `info()`: logging would walk the stack for the caller's file and
        # line, which an access line does not show, on every request.
        # The fields are the format's mapping as they are (logging would test a 1-tuple for one).
        record = self.logger.makeRecord(
            self.logger.name, logging.INFO, "", 0, ACCESS_LINE, fields, None, extra={"fields": fields}
        )
        self.logger.handle(record)
