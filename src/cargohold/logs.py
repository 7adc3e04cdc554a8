"""Logging set-up: readable text by default, one JSON object per line with `log_format: json`.

Every line carries the id of the request it was logged for (from a context variable the observe
middleware sets), and URLs have passwords and tokens masked whatever the format.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from contextvars import ContextVar
from datetime import UTC, datetime

# A ContextVar is per task by design: each request's handler task sees its own id.
request_id: ContextVar[str] = ContextVar("request_id", default="-")

_SECRET_QUERY = re.compile(r"(?i)((?:password|passwd|secret|token|access_token|client_secret)=)[^&\s]*")
_URL_PASSWORD = re.compile(r"(://[^/@:\s]+:)[^/@\s]+@")
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
        line = super().format(record)
        return line if hasattr(record, "fields") else mask_secrets(line)  # an access line's fields are masked

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's name
        """As logging's default, with the seconds formatted once per second (thousands of lines a second)."""
        second = int(record.created)
        if self._second[0] != second:
            self._second = (second, time.strftime("%Y-%m-%d %H:%M:%S", self.converter(record.created)))
        return f"{self._second[1]},{int(record.msecs):03d}"


class JsonFormatter(logging.Formatter):
    """`{"time","level","logger","message","request_id", ...fields}` per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": mask_secrets(record.getMessage()),
        }
        rid = getattr(record, "request_id", "-")
        if rid != "-":
            entry["request_id"] = rid
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = mask_secrets(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


def setup_logging(level: str, log_format: str) -> None:
    """Send cargohold's logs to stderr in the configured format (replacing earlier handlers)."""
    # Neither format shows the thread or the process: logging need not look them up for every record.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Context())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
