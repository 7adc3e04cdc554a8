"""Requests that are not valid HTTP are refused by aiohttp's parser (400) before any cargohold
code runs. aiohttp logs each with a full traceback; from an open port that is a way to flood the
log, so they become one warning line without the traceback.

The same goes for a body that does not decode (corrupt gzip): the handler has answered 400 already,
and aiohttp meets the error again while draining the rest of the body before closing."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError


class QuietBadRequests(logging.Filter):
    """For the `aiohttp.server` logger: a malformed request is one line, not a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError | web.RequestPayloadError):
            reason = str(exc.message if isinstance(exc, HttpProcessingError) else exc).strip().splitlines() or ["?"]
            peer = record.args[:1] if isinstance(record.args, tuple) and record.args else ("?",)
            record.msg = "refused malformed request from %s: %s"
            record.args = (*peer, reason[0][:200])
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


def quiet_bad_requests() -> None:
    logging.getLogger("aiohttp.server").addFilter(QuietBadRequests())
