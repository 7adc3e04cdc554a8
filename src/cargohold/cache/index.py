"""The cache index: tag -> digest with the time it was checked, manifest media types, last access,
and links: which upstream repository has shown it holds a digest (content is stored once, but
served to a repository only once linked to it). Also what operators keep: ad-hoc pins (eviction
leaves their content alone) and the history of tags that moved to a new digest.

SQLite in WAL mode; lookups take microseconds, so they run on the event loop. Access times are
collected in memory and written in batches so a cache hit never waits for a disk write.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Collection, Sequence
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
CREATE TABLE IF NOT EXISTS links (
    upstream TEXT NOT NULL, repository TEXT NOT NULL, digest TEXT NOT NULL,
    PRIMARY KEY (upstream, repository, digest)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value REAL NOT NULL);
CREATE TABLE IF NOT EXISTS pins (pattern TEXT PRIMARY KEY, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tag_moves (
    upstream TEXT NOT NULL, repository TEXT NOT NULL, tag TEXT NOT NULL,
    old_digest TEXT NOT NULL, new_digest TEXT NOT NULL, moved_at REAL NOT NULL
);
"""
# Columns added after the first release; added to older index files when they are opened.
MIGRATIONS = (("tags", "pulls", "INTEGER NOT NULL DEFAULT 0"),)
# Manifests and blobs share the blob store; both are evicted by last access.
CONTENT_TABLES = ("manifests", "blobs")
# The tag-move history keeps this many newest moves (all repositories together): bounded, and plenty to audit.
MAX_TAG_MOVES = 10_000


@dataclass(frozen=True, slots=True)
class TagEntry:
    digest: str
    media_type: str
    checked_at: float


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    media_type: str
    size: int


@dataclass(frozen=True, slots=True)
class Stored:
    """One manifest or blob in the store, as the index records it."""

    table: str
    digest: str
    size: int
    last_access: float


@dataclass(frozen=True, slots=True)
class TagRow:
    upstream: str
    repository: str
    tag: str
    digest: str
    last_access: float
    pulls: int


@dataclass(frozen=True, slots=True)
class TagMove:
    """A tag found pointing at a new digest (newest first in `tag_moves`)."""

    upstream: str
    repository: str
    tag: str
    old_digest: str
    new_digest: str
    moved_at: float


@dataclass(frozen=True, slots=True)
class Usage:
    size: int
    blobs: int
    manifests: int
    tags: int


class Index(Protocol):
    """What the proxy needs from the index; a Redis index implements the same."""

    async def get_tag(self, upstream: str, repository: str, tag: str) -> TagEntry | None: ...
    async def put_tag(self, upstream: str, repository: str, tag: str, digest: str, media_type: str) -> None: ...
    async def mark_checked(self, upstream: str, repository: str, tag: str) -> None: ...
    async def drop_tag(self, upstream: str, repository: str, tag: str) -> None: ...
    async def get_manifest(self, digest: str) -> ManifestEntry | None: ...
    async def put_manifest(self, digest: str, media_type: str, size: int) -> None: ...
    async def put_blob(self, digest: str, size: int) -> None: ...
    async def has_link(self, upstream: str, repository: str, digest: str) -> bool: ...
    async def put_link(self, upstream: str, repository: str, digest: str) -> None: ...
    def touch(self, table: str, digest: str) -> None: ...
    def touch_tag(self, upstream: str, repository: str, tag: str) -> None: ...
    def add_count(self, name: str, value: float) -> None: ...
    async def counters(self) -> dict[str, float]: ...
    async def usage(self) -> Usage: ...
    async def least_recent(self, limit: int, offset: int = 0) -> list[Stored]: ...
    async def stored(self) -> list[Stored]: ...
    async def sizes(self, digests: Collection[str]) -> dict[str, int]: ...
    async def forget(self, table: str, digest: str) -> None: ...
    async def tag_rows(self) -> list[TagRow]: ...
    async def add_pin(self, pattern: str) -> bool: ...
    async def remove_pin(self, pattern: str) -> bool: ...
    async def pins(self) -> list[str]: ...
    async def record_tag_move(
        self, upstream: str, repository: str, tag: str, old_digest: str, new_digest: str
    ) -> None: ...
    async def tag_moves(
        self, upstream: str | None = None, repository: str | None = None, tag: str | None = None, limit: int = 100
    ) -> list[TagMove]: ...
    async def flush(self) -> None: ...
    async def close(self) -> None: ...


class AccessBuffer:
    """Access times and counters gathered in memory, so a cache hit never waits for a write; `flush` writes them."""

    def __init__(self) -> None:
        self._touched: dict[tuple[str, str], float] = {}
        self._touched_tags: dict[tuple[str, str, str], float] = {}
        self._tag_pulls: Counter[tuple[str, str, str]] = Counter()
        self._counts: dict[str, float] = {}

    def touch(self, table: str, digest: str) -> None:
        """Remember an access to a manifest or blob; written by the next `flush`."""
        self._touched[(table, digest)] = time.time()

    def touch_tag(self, upstream: str, repository: str, tag: str) -> None:
        """Remember a pull of a tag (its time and one more pull); written by the next `flush`."""
        self._touched_tags[(upstream, repository, tag)] = time.time()
        self._tag_pulls[(upstream, repository, tag)] += 1

    def add_count(self, name: str, value: float) -> None:
        """Add to a lasting counter (hits, misses, bytes), so figures survive restarts; written by `flush`."""
        self._counts[name] = self._counts.get(name, 0) + value

    def _take(
        self,
    ) -> tuple[
        dict[tuple[str, str], float], dict[tuple[str, str, str], float], Counter[tuple[str, str, str]], dict[str, float]
    ]:
        """What was gathered since the last flush (touched, tags, tag pulls, counts), and start afresh."""
        taken = self._touched, self._touched_tags, self._tag_pulls, self._counts
        self._touched, self._touched_tags, self._tag_pulls, self._counts = {}, {}, Counter(), {}
        return taken


class SqliteIndex(AccessBuffer):
    """The default index: one SQLite file in `data_dir`."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        for table, column, kind in MIGRATIONS:
            if column not in {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

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
            "INSERT INTO tags (upstream, repository, tag, digest, media_type, checked_at, last_access, pulls)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, 1) ON CONFLICT DO UPDATE SET digest=excluded.digest,"
            " media_type=excluded.media_type, checked_at=excluded.checked_at, last_access=excluded.last_access",
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

    async def has_link(self, upstream: str, repository: str, digest: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM links WHERE upstream=? AND repository=? AND digest=?", (upstream, repository, digest)
        ).fetchone()
        return row is not None

    async def put_link(self, upstream: str, repository: str, digest: str) -> None:
        self._write("INSERT OR IGNORE INTO links VALUES (?, ?, ?)", (upstream, repository, digest))

    async def counters(self) -> dict[str, float]:
        return dict(self._db.execute("SELECT name, value FROM counters").fetchall())

    async def usage(self) -> Usage:
        size, blobs, manifests = self._db.execute(
            "SELECT COALESCE(SUM(size), 0), COUNT(*) FILTER (WHERE t='blobs'), COUNT(*) FILTER (WHERE t='manifests')"
            " FROM (SELECT 'blobs' AS t, size FROM blobs UNION ALL SELECT 'manifests', size FROM manifests)"
        ).fetchone()
        (tags,) = self._db.execute("SELECT COUNT(*) FROM tags").fetchone()
        return Usage(size, blobs, manifests, tags)

    async def least_recent(self, limit: int, offset: int = 0) -> list[Stored]:
        """Manifests and blobs, least recently used first (`limit` -1: all)."""
        rows = self._db.execute(
            "SELECT 'blobs', digest, size, last_access FROM blobs"
            " UNION ALL SELECT 'manifests', digest, size, last_access FROM manifests"
            " ORDER BY last_access LIMIT ? OFFSET ?",
            (limit, offset),
        ).fetchall()
        return [Stored(*row) for row in rows]

    async def stored(self) -> list[Stored]:
        """Every manifest and blob the index knows (for the start-up check against the files)."""
        return await self.least_recent(-1)

    async def sizes(self, digests: Collection[str]) -> dict[str, int]:
        """The stored size of each of these digests the index knows (the others are left out)."""
        found: dict[str, int] = {}
        wanted = list(digests)
        for start in range(0, len(wanted), 500):  # SQLite bounds the parameters of one statement
            batch = wanted[start : start + 500]
            marks = ",".join("?" * len(batch))
            for table in CONTENT_TABLES:
                found.update(self._db.execute(f"SELECT digest, size FROM {table} WHERE digest IN ({marks})", batch))
        return found

    async def forget(self, table: str, digest: str) -> None:
        """Drop a manifest or blob row; its file is removed after this, never before."""
        if table not in CONTENT_TABLES:
            raise ValueError(f"not a content table: {table}")
        self._db.execute(f"DELETE FROM {table} WHERE digest=?", (digest,))

    async def tag_rows(self) -> list[TagRow]:
        rows = self._db.execute(
            "SELECT upstream, repository, tag, digest, last_access, pulls FROM tags ORDER BY upstream, repository, tag"
        ).fetchall()
        return [TagRow(*row) for row in rows]

    async def add_pin(self, pattern: str) -> bool:
        """Pin an `upstream/repository[:tag]` glob; False if it was pinned already."""
        return self._db.execute("INSERT OR IGNORE INTO pins VALUES (?, ?)", (pattern, time.time())).rowcount > 0

    async def remove_pin(self, pattern: str) -> bool:
        return self._db.execute("DELETE FROM pins WHERE pattern=?", (pattern,)).rowcount > 0

    async def pins(self) -> list[str]:
        return [row[0] for row in self._db.execute("SELECT pattern FROM pins ORDER BY pattern")]

    async def record_tag_move(self, upstream: str, repository: str, tag: str, old_digest: str, new_digest: str) -> None:
        self._write(
            "INSERT INTO tag_moves VALUES (?, ?, ?, ?, ?, ?)",
            (upstream, repository, tag, old_digest, new_digest, time.time()),
        )
        self._write("DELETE FROM tag_moves WHERE rowid <= (SELECT MAX(rowid) FROM tag_moves) - ?", (MAX_TAG_MOVES,))

    async def tag_moves(
        self, upstream: str | None = None, repository: str | None = None, tag: str | None = None, limit: int = 100
    ) -> list[TagMove]:
        """Recorded moves, newest first, of one tag, one repository or all (None: any)."""
        rows = self._db.execute(
            "SELECT upstream, repository, tag, old_digest, new_digest, moved_at FROM tag_moves"
            " WHERE (?1 IS NULL OR upstream=?1) AND (?2 IS NULL OR repository=?2) AND (?3 IS NULL OR tag=?3)"
            " ORDER BY rowid DESC LIMIT ?4",
            (upstream, repository, tag, limit),
        ).fetchall()
        return [TagMove(*row) for row in rows]

    async def flush(self) -> None:
        touched, tags, pulls, counts = self._take()
        if not touched and not tags and not counts:
            return
        self._db.execute("BEGIN")
        try:
            self._db.executemany(
                "INSERT INTO counters VALUES (?, ?) ON CONFLICT DO UPDATE SET value=value+excluded.value",
                list(counts.items()),
            )
            for table in CONTENT_TABLES:
                self._db.executemany(
                    f"UPDATE {table} SET last_access=? WHERE digest=?",
                    [(when, digest) for (kind, digest), when in touched.items() if kind == table],
                )
            self._db.executemany(
                "UPDATE tags SET last_access=?, pulls=pulls+? WHERE upstream=? AND repository=? AND tag=?",
                [(when, pulls[key], *key) for key, when in tags.items()],
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        await self.flush()
        self._db.close()
