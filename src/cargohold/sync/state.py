"""What a sync entry did last and is doing now, kept in `data_dir/sync/NAME.json` for `cargohold sync status`,
and the lock that lets one run of an entry go at a time, across processes (and replicas sharing Redis).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydantic
import redis.asyncio as redis

from cargohold.cache.index import Index
from cargohold.cache.peers import RELEASE_SCRIPT
from cargohold.cache.redisindex import RedisIndex

log = logging.getLogger("cargohold.sync")

MAX_ERRORS = 10


@dataclass(slots=True)
class EntryState:
    """One sync entry: the run in progress (`running`) or the last one."""

    name: str
    running: bool = False
    started: float | None = None
    finished: float | None = None
    ok: bool | None = None
    tags_total: int = 0
    tags_done: int = 0
    tags_changed: int = 0  # new or moved tags, fetched
    blobs_fetched: int = 0
    bytes_fetched: int = 0
    errors: list[str] = field(default_factory=list)
    skipped_runs: int = 0  # runs skipped because the previous one still went on

    def starting(self) -> EntryState:
        """A new run's state: counts from zero, the last result kept until this run ends."""
        return EntryState(self.name, True, time.time(), self.finished, self.ok, skipped_runs=self.skipped_runs)

    def fail(self, message: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(message)

    def end(self) -> None:
        self.running, self.finished, self.ok = False, time.time(), not self.errors


def _directory(data_dir: Path) -> Path:
    return data_dir / "sync"


def save(data_dir: Path, name: str, snapshot: str) -> None:
    """`snapshot` (of `dump`) written to a temp name and renamed: a reader never sees half a file. One writer
    per entry at a time (the run's lock)."""
    directory = _directory(data_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o750)
    temp = directory / f".{name}.json.tmp"
    temp.write_text(snapshot)
    os.replace(temp, directory / f"{name}.json")


def dump(state: EntryState) -> str:
    return json.dumps(dataclasses.asdict(state))


def load(data_dir: Path, name: str) -> EntryState:
    """The last saved state of an entry; a fresh one if none, or if it is not what `dump` writes (a JSON object of
    the fields with their types: `null`, `[]` or `{"errors": 5}` too)."""
    try:
        text = (_directory(data_dir) / f"{name}.json").read_bytes()
        raw = pydantic.TypeAdapter(EntryState).validate_json(text, strict=True)
    except (OSError, pydantic.ValidationError):
        return EntryState(name)
    return dataclasses.replace(raw, name=name)


class RunLock:
    """One run of an entry at a time: a file lock in data_dir (processes on this host, the CLI too) and, with a
    Redis index, a Redis key that expires after `ttl` (replicas), so a crashed holder blocks no later run."""

    def __init__(self, data_dir: Path, name: str, client: redis.Redis | None, ttl: float) -> None:
        self._path = _directory(data_dir) / f"{name}.lock"
        self._key = f"cargohold:sync:{name}:lock"
        self._client = client
        self._ttl = ttl
        self._token = secrets.token_hex(8)
        self._fd = -1

    async def acquire(self) -> bool:
        self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        if self._client is not None and not await self._client.set(
            self._key, self._token, nx=True, px=int(self._ttl * 1000)
        ):
            self._unlock_file()
            return False
        return True

    async def release(self) -> None:
        try:
            if self._client is not None:
                with contextlib.suppress(redis.RedisError):  # deleted only if still ours; it expires anyway
                    await self._client.eval(RELEASE_SCRIPT, 1, self._key, self._token)
        finally:
            self._unlock_file()

    def _unlock_file(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1


def redis_of(index: Index) -> redis.Redis | None:
    """The Redis client of a Redis index (replicas lock runs there), else None."""
    return index.client if isinstance(index, RedisIndex) else None


def held(data_dir: Path, name: str) -> bool:
    """Whether a run of the entry holds its file lock now (on this host)."""
    path = _directory(data_dir) / f"{name}.lock"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
