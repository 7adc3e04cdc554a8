"""Requests that are not valid HTTP are refused by aiohttp's parser (400) before any cargohold
code runs. aiohttp logs each with a full traceback; from an open port that is a way to flood the
log, so they become one warning line without the traceback."""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError


class QuietBadRequests(logging.Filter):
    """For the `aiohttp.server` logger: a malformed request is one line, not a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = "refused malformed request from %s: %s"
            record.args = (*(record.args or ("?",))[:1], str(exc.message).splitlines()[0][:200])  # type: ignore[misc]
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


def quiet_bad_requests() -> None:
    logging.getLogger("aiohttp.server").addFilter(QuietBadRequests())
