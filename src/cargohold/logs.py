"""Logging set-up: readable text by default, one JSON object per line with `log_format: json`.

Every line carries the id of the request it was logged for (from a context variable the observe
middleware sets), and URLs have passwords and tokens masked whatever the format.

Lines logged on the event loop are written once per loop iteration, together (`LoopBatched`): at
thousands of requests a second, one write of each access line was a twentieth of a warm hit's cost.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import secrets
import sys
import time
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TextIO

from cargohold.thisloop import ThisLoop

# A ContextVar is per task by design: each request's handler task sees its own id.
request_id: ContextVar[str] = ContextVar("request_id", default="-")


class RequestIds:
    """Ids for requests that bring none: a random prefix per process and a count. Unique across workers
    and restarts, and no random bytes drawn per request (a `getrandom` call each was 4% of a warm hit)."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(4)
        self._count = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._count) & 0xFFFFFFFF:08x}"


_SECRET_QUERY = re.compile(r"(?i)((?:password|passwd|secret|token|access_token|client_secret)=)[^&\s]*")
_URL_PASSWORD = re.compile(r"(://[^/@:\s]+:)[^/@\s]+@")
ACCESS_LOGGER = "cargohold.access"
# One line per request; its fields are masked already (`AccessLogger`).
ACCESS_LINE = (
    "%(client)s %(user)s %(method)s %(path)s %(status)d %(bytes)d %(ms).1fms kind=%(kind)s cache=%(cache)s"
    " rid=%(request_id)s"
)
_TEXT = "%(asctime)s %(levelname)s %(name)s %(message)s%(rid)s"


def mask_secrets(text: str) -> str:
    """Hide passwords and tokens in URLs before they are logged."""
    if "=" in text:
        text = _SECRET_QUERY.sub(r"\1***", text)
    return _URL_PASSWORD.sub(r"\1***@", text) if "@" in text else text


class _Context(logging.Filter):
    """Adds the current request id; access lines name it already and carry their own fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = getattr(record, "fields", {}).get("request_id") or request_id.get()
        record.request_id = rid
        record.rid = "" if rid == "-" or hasattr(record, "fields") else f" rid={rid}"
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(_TEXT)
        self._second: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        if fields is not None:
            return self.access_line(fields, record.created)
        return mask_secrets(super().format(record))

    def access_line(self, fields: Mapping[str, object], created: float) -> str:
        """An access line from its fields (masked already), as `format` makes it from a record."""
        return f"{self._stamp(created)} INFO {ACCESS_LOGGER} {ACCESS_LINE % fields}"

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's name
        return self._stamp(record.created)

    def _stamp(self, created: float) -> str:
        """As logging's default time, with the seconds formatted once per second (thousands of lines a second)."""
        second = int(created)
        if self._second[0] != second:
            self._second = (second, time.strftime("%Y-%m-%d %H:%M:%S", self.converter(created)))
        return f"{self._second[1]},{int((created - second) * 1000):03d}"


class JsonFormatter(logging.Formatter):
    """`{"time","level","logger","message","request_id", ...fields}` per line."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        if fields is not None:
            return self.access_line(fields, record.created)
        entry = {
            "time": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": mask_secrets(record.getMessage()),
        }
        rid = getattr(record, "request_id", "-")
        if rid != "-":
            entry["request_id"] = rid
        if record.exc_info:
            entry["exception"] = mask_secrets(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)

    def access_line(self, fields: Mapping[str, object], created: float) -> str:
        entry = {"time": _iso(created), "level": "info", "logger": ACCESS_LOGGER, "message": ACCESS_LINE % fields}
        return json.dumps({**entry, **fields}, default=str)


def _iso(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")


# Writes to a pipe (a container's log) up to this size are never interleaved with another worker's.
PIPE_BUF = 4096


class LoopBatched(logging.Handler):
    """Like `StreamHandler`, but lines logged on a running event loop wait for the end of the loop's
    current iteration and go out in one write (in pieces of whole lines up to PIPE_BUF, so workers
    sharing the stream never interleave within a line). Warnings and worse, and lines from other
    threads, are written at once (after what waits, to keep the order).

    Access lines may skip logging's record, filters and handler chain (`access`, see `direct_access`):
    that machinery was an eighth of a warm hit's cost."""

    def __init__(self, stream: TextIO, formatter: TextFormatter | JsonFormatter) -> None:
        super().__init__()
        self._stream = stream
        self._waiting: list[str] = []
        self._loop = ThisLoop()
        self._lines = formatter
        self.setFormatter(formatter)
        self.addFilter(_Context())  # the formats name the request id

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - logging's contract: a bad record is reported, never raised
            self.handleError(record)
            return
        # `handle` holds this handler's lock around `emit`.
        self._add(line, at_once=record.levelno >= logging.WARNING)

    def access(self, fields: Mapping[str, object], created: float) -> None:
        """An access line, as `emit` would write it for its record."""
        line = self._lines.access_line(fields, created)
        self.acquire()
        try:
            self._add(line, at_once=False)
        finally:
            self.release()

    def _add(self, line: str, *, at_once: bool) -> None:
        loop = self._loop.get()
        if not self._waiting and loop is not None and not at_once:
            loop.call_soon(self.flush)
        self._waiting.append(line + "\n")
        if loop is None or at_once:
            self._write_waiting()

    def flush(self) -> None:
        self.acquire()
        try:
            self._write_waiting()
        finally:
            self.release()

    def _write_waiting(self) -> None:
        waiting, self._waiting = self._waiting, []
        piece: list[str] = []
        size = 0
        for line in waiting:
            if piece and size + len(line) > PIPE_BUF:
                self._write("".join(piece))
                piece, size = [], 0
            piece.append(line)
            size += len(line)
        if piece:
            self._write("".join(piece))

    def _write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):  # stderr closed or gone (a closed pipe): nothing to report to
            pass


def setup_logging(level: str, log_format: str) -> None:
    """Send cargohold's logs to stderr in the configured format (replacing earlier handlers)."""
    # Neither format shows the thread or the process: logging need not look them up for every record.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = LoopBatched(sys.stderr, JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))


def direct_access(logger: logging.Logger) -> LoopBatched | None:
    """The handler `logger`'s access lines may go to directly (`LoopBatched.access`): only when logging
    would send them to that handler alone, unfiltered (as `setup_logging` sets it up; not, say, under
    a test's log capture, which gets records)."""
    handlers: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        handlers.extend(current.handlers)
        current = current.parent if current.propagate else None
    only = handlers[0] if len(handlers) == 1 else None
    if isinstance(only, LoopBatched) and only.level <= logging.INFO:
        return only
    return None
