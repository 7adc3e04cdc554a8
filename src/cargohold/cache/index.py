"""The cache index: tag -> digest with the time it was checked, manifest media types, last access.

SQLite in WAL mode; lookups take microseconds, so they run on the event loop. Access times are
collected in memory and written in batches so a cache hit never waits for a disk write.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger("cargohold.cache")

SCHEMA = """
CREATE TABLE IF NOT EXISTS tags (
    upstream TEXT NOT NULL, repository TEXT NOT NULL, tag TEXT NOT NULL,
    digest TEXT NOT NULL, media_type TEXT NOT NULL,
    checked_at REAL NOT NULL, last_access REAL NOT NULL,
    PRIMARY KEY (upstream, repository, tag)
);
CREATE TABLE IF NOT EXISTS manifests (
    digest TEXT PRIMARY KEY, media_type TEXT NOT NULL, size INTEGER NOT NULL, last_access REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS blobs (
    digest TEXT PRIMARY KEY, size INTEGER NOT NULL, created_at REAL NOT NULL, last_access REAL NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class TagEntry:
    digest: str
    media_type: str
    checked_at: float


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    media_type: str
    size: int


class Index(Protocol):
    """What the proxy needs from the index; a Redis index implements the same."""

    async def get_tag(self, upstream: str, repository: str, tag: str) -> TagEntry | None: ...
    async def put_tag(self, upstream: str, repository: str, tag: str, digest: str, media_type: str) -> None: ...
    async def mark_checked(self, upstream: str, repository: str, tag: str) -> None: ...
    async def drop_tag(self, upstream: str, repository: str, tag: str) -> None: ...
    async def get_manifest(self, digest: str) -> ManifestEntry | None: ...
    async def put_manifest(self, digest: str, media_type: str, size: int) -> None: ...
    async def put_blob(self, digest: str, size: int) -> None: ...
    def touch(self, table: str, digest: str) -> None: ...
    def touch_tag(self, upstream: str, repository: str, tag: str) -> None: ...
    async def flush(self) -> None: ...
    async def close(self) -> None: ...


class SqliteIndex:
    """The default index: one SQLite file in `data_dir`."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        self._touched: dict[tuple[str, str], float] = {}
        self._touched_tags: dict[tuple[str, str, str], float] = {}

    async def get_tag(self, upstream: str, repository: str, tag: str) -> TagEntry | None:
        row = self._db.execute(
            "SELECT digest, media_type, checked_at FROM tags WHERE upstream=? AND repository=? AND tag=?",
            (upstream, repository, tag),
        ).fetchone()
        return TagEntry(*row) if row else None

    def _write(self, sql: str, params: Sequence[object]) -> None:
        """One write; a full disk is logged, not raised: the answer is served, only not remembered."""
        try:
            self._db.execute(sql, params)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_FULL:
                raise
            log.error("index not updated, disk full: %s", exc)

    async def put_tag(self, upstream: str, repository: str, tag: str, digest: str, media_type: str) -> None:
        now = time.time()
        self._write(
            "INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?, ?, ?, ?)",
            (upstream, repository, tag, digest, media_type, now, now),
        )

    async def mark_checked(self, upstream: str, repository: str, tag: str) -> None:
        self._write(
            "UPDATE tags SET checked_at=? WHERE upstream=? AND repository=? AND tag=?",
            (time.time(), upstream, repository, tag),
        )

    async def drop_tag(self, upstream: str, repository: str, tag: str) -> None:
        self._write("DELETE FROM tags WHERE upstream=? AND repository=? AND tag=?", (upstream, repository, tag))

    async def get_manifest(self, digest: str) -> ManifestEntry | None:
        row = self._db.execute("SELECT media_type, size FROM manifests WHERE digest=?", (digest,)).fetchone()
        return ManifestEntry(*row) if row else None

    async def put_manifest(self, digest: str, media_type: str, size: int) -> None:
        self._write("INSERT OR REPLACE INTO manifests VALUES (?, ?, ?, ?)", (digest, media_type, size, time.time()))

    async def put_blob(self, digest: str, size: int) -> None:
        now = time.time()
        self._write("INSERT OR REPLACE INTO blobs VALUES (?, ?, ?, ?)", (digest, size, now, now))

    def touch(self, table: str, digest: str) -> None:
        """Remember an access to a manifest or blob; written by the next `flush`."""
        self._touched[(table, digest)] = time.time()

    def touch_tag(self, upstream: str, repository: str, tag: str) -> None:
        self._touched_tags[(upstream, repository, tag)] = time.time()

    async def flush(self) -> None:
        touched, self._touched = self._touched, {}
        tags, self._touched_tags = self._touched_tags, {}
        if not touched and not tags:
            return
        self._db.execute("BEGIN")
        try:
            for table in ("manifests", "blobs"):
                self._db.executemany(
                    f"UPDATE {table} SET last_access=? WHERE digest=?",
                    [(when, digest) for (kind, digest), when in touched.items() if kind == table],
                )
            self._db.executemany(
                "UPDATE tags SET last_access=? WHERE upstream=? AND repository=? AND tag=?",
                [(when, *key) for key, when in tags.items()],
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        await self.flush()
        self._db.close()
