"""The cache index in Redis, shared by replicas that share one bucket.

Keys (under `cargohold:`): a hash per tag plus the set `tags` of them; `sizes` (`<table>:<digest>`
-> bytes) and the sorted set `lru` (same members, scored by last access) for manifests and blobs;
`types` (manifest digest -> media type); the set `links`; the hash `counters`; the set `pins`; the
list `tag_moves` (JSON, newest first, trimmed to `MAX_TAG_MOVES`). Access times and
counters are gathered in memory and written in one pipeline by `flush`, as with SQLite.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable, Collection, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar

import redis.asyncio as redis
from redis.typing import ZSetRangeResponse

from cargohold.cache.index import (
    CONTENT_TABLES,
    MAX_TAG_MOVES,
    AccessBuffer,
    ManifestEntry,
    Stored,
    TagEntry,
    TagMove,
    TagRow,
    Usage,
)
from cargohold.errors import StorageUnavailable

log = logging.getLogger("cargohold.cache")
P = ParamSpec("P")
R = TypeVar("R")

PREFIX = "cargohold:"
SEP = "\x1f"
# Update fields of a hash only while it exists (a tag dropped meanwhile is not brought back).
UPDATE_EXISTING = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
if tonumber(ARGV[1]) > 0 then redis.call('HINCRBY', KEYS[1], 'pulls', ARGV[1]) end
return 1
"""


def _unavailable(
    method: Callable[Concatenate[RedisIndex, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[RedisIndex, P], Coroutine[Any, Any, R]]:
    """A Redis failure becomes a 503 for the client (a retry may work), not an internal error."""

    @functools.wraps(method)
    async def call(self: RedisIndex, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(self, *args, **kwargs)
        except redis.RedisError as exc:
            log.error("index (redis) %s failed: %s", method.__name__, exc)
            raise StorageUnavailable("the cache's index failed", {"operation": method.__name__}) from None

    return call


def _text(reply: bytes | str) -> str:
    """A reply as text: the client decodes responses (`decode_responses=True`), which its types do not know."""
    if isinstance(reply, bytes):
        raise TypeError("the redis client must be created with decode_responses=True")
    return reply


def _scored(reply: ZSetRangeResponse) -> list[tuple[str, float]]:
    """The (member, score) pairs of a `zrange(..., withscores=True)`, typed as such."""
    pairs = []
    for item in reply:
        if isinstance(item, (bytes, str)):
            raise TypeError("zrange must be called with withscores=True")
        member, score = item
        pairs.append((_text(member), float(score)))
    return pairs


def _k(name: str) -> str:
    return PREFIX + name


def _tag_key(upstream: str, repository: str, tag: str) -> str:
    return _k("tag:" + SEP.join((upstream, repository, tag)))


def _member(table: str, digest: str) -> str:
    return f"{table}:{digest}"


class RedisIndex(AccessBuffer):
    """The `Index` on a Redis server (index.url: redis://host:port/db)."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__()
        self.client = client
        self._update = client.register_script(UPDATE_EXISTING)

    @_unavailable
    async def get_tag(self, upstream: str, repository: str, tag: str) -> TagEntry | None:
        digest, media_type, checked = await self.client.hmget(
            _tag_key(upstream, repository, tag), ["digest", "media_type", "checked_at"]
        )
        if digest is None or media_type is None or checked is None:
            return None
        return TagEntry(_text(digest), _text(media_type), float(checked))

    @_unavailable
    async def put_tag(self, upstream: str, repository: str, tag: str, digest: str, media_type: str) -> None:
        key, now = _tag_key(upstream, repository, tag), time.time()
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"digest": digest, "media_type": media_type, "checked_at": now, "last_access": now})
            pipe.hsetnx(key, "pulls", 1)
            pipe.sadd(_k("tags"), key)
            await pipe.execute()

    @_unavailable
    async def mark_checked(self, upstream: str, repository: str, tag: str) -> None:
        await self._update(keys=[_tag_key(upstream, repository, tag)], args=[0, "checked_at", time.time()])

    @_unavailable
    async def drop_tag(self, upstream: str, repository: str, tag: str) -> None:
        key = _tag_key(upstream, repository, tag)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.srem(_k("tags"), key)
            await pipe.execute()

    @_unavailable
    async def get_manifest(self, digest: str) -> ManifestEntry | None:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hget(_k("types"), digest)
            pipe.hget(_k("sizes"), _member("manifests", digest))
            media_type, size = await pipe.execute()
        return ManifestEntry(media_type, int(size)) if media_type is not None and size is not None else None

    async def _put_content(self, table: str, digest: str, size: int, media_type: str | None = None) -> None:
        member = _member(table, digest)
        async with self.client.pipeline(transaction=True) as pipe:
            if media_type is not None:
                pipe.hset(_k("types"), digest, media_type)
            pipe.hset(_k("sizes"), member, size)
            pipe.zadd(_k("lru"), {member: time.time()})
            await pipe.execute()

    @_unavailable
    async def put_manifest(self, digest: str, media_type: str, size: int) -> None:
        await self._put_content("manifests", digest, size, media_type)

    @_unavailable
    async def put_blob(self, digest: str, size: int) -> None:
        await self._put_content("blobs", digest, size)

    @_unavailable
    async def has_link(self, upstream: str, repository: str, digest: str) -> bool:
        return bool(await self.client.sismember(_k("links"), SEP.join((upstream, repository, digest))))

    @_unavailable
    async def put_link(self, upstream: str, repository: str, digest: str) -> None:
        await self.client.sadd(_k("links"), SEP.join((upstream, repository, digest)))

    @_unavailable
    async def counters(self) -> dict[str, float]:
        return {_text(name): float(value) for name, value in (await self.client.hgetall(_k("counters"))).items()}

    async def _sizes(self) -> dict[str, int]:
        return {_text(member): int(size) for member, size in (await self.client.hgetall(_k("sizes"))).items()}

    @_unavailable
    async def usage(self) -> Usage:
        sizes = await self._sizes()
        blobs = sum(1 for member in sizes if member.startswith("blobs:"))
        return Usage(sum(sizes.values()), blobs, len(sizes) - blobs, await self.client.scard(_k("tags")))

    @_unavailable
    async def least_recent(self, limit: int, offset: int = 0) -> list[Stored]:
        """Manifests and blobs, least recently used first (`limit` -1: all)."""
        stop = -1 if limit < 0 else offset + limit - 1
        ranked = _scored(await self.client.zrange(_k("lru"), offset, stop, withscores=True))
        if not ranked:
            return []
        sizes = await self.client.hmget(_k("sizes"), [member for member, _ in ranked])
        entries = []
        for (member, when), size in zip(ranked, sizes, strict=True):
            table, _, digest = member.partition(":")
            entries.append(Stored(table, digest, int(size or 0), float(when)))
        return entries

    @_unavailable
    async def stored(self) -> list[Stored]:
        return await self.least_recent(-1)

    @_unavailable
    async def sizes(self, digests: Collection[str]) -> dict[str, int]:
        """The stored size of each of these digests the index knows (the others are left out)."""
        wanted = list(digests)
        if not wanted:
            return {}
        members = [_member(table, digest) for digest in wanted for table in CONTENT_TABLES]
        found = await self.client.hmget(_k("sizes"), members)
        return {member.partition(":")[2]: int(size) for member, size in zip(members, found, strict=True) if size}

    @_unavailable
    async def forget(self, table: str, digest: str) -> None:
        """Drop a manifest or blob; its object is removed after this, never before."""
        if table not in CONTENT_TABLES:
            raise ValueError(f"not a content table: {table}")
        member = _member(table, digest)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.zrem(_k("lru"), member)
            pipe.hdel(_k("sizes"), member)
            if table == "manifests":
                pipe.hdel(_k("types"), digest)
            await pipe.execute()

    @_unavailable
    async def tag_rows(self) -> list[TagRow]:
        keys = sorted(_text(key) for key in await self.client.smembers(_k("tags")))
        async with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(key, ["digest", "last_access", "pulls"])
            values = await pipe.execute()
        rows = []
        for key, (digest, last_access, pulls) in zip(keys, values, strict=True):
            if digest is None:
                continue
            upstream, repository, tag = key.removeprefix(_k("tag:")).split(SEP)
            rows.append(TagRow(upstream, repository, tag, digest, float(last_access or 0), int(pulls or 0)))
        return rows

    @_unavailable
    async def add_pin(self, pattern: str) -> bool:
        return bool(await self.client.sadd(_k("pins"), pattern))

    @_unavailable
    async def remove_pin(self, pattern: str) -> bool:
        return bool(await self.client.srem(_k("pins"), pattern))

    @_unavailable
    async def pins(self) -> list[str]:
        return sorted(_text(pattern) for pattern in await self.client.smembers(_k("pins")))

    @_unavailable
    async def record_tag_move(self, upstream: str, repository: str, tag: str, old_digest: str, new_digest: str) -> None:
        move = TagMove(upstream, repository, tag, old_digest, new_digest, time.time())
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.lpush(_k("tag_moves"), json.dumps(dataclasses.astuple(move)))
            pipe.ltrim(_k("tag_moves"), 0, MAX_TAG_MOVES - 1)
            await pipe.execute()

    @_unavailable
    async def tag_moves(
        self, upstream: str | None = None, repository: str | None = None, tag: str | None = None, limit: int = 100
    ) -> list[TagMove]:
        """Recorded moves, newest first, of one tag, one repository or all (None: any)."""
        moves = []
        for item in await self.client.lrange(_k("tag_moves"), 0, -1):
            move = TagMove(*json.loads(_text(item)))
            if upstream in (None, move.upstream) and repository in (None, move.repository) and tag in (None, move.tag):
                moves.append(move)
                if len(moves) >= limit:
                    break
        return moves

    @_unavailable
    async def flush(self) -> None:
        touched, tags, pulls, counts = self._take()
        if not touched and not tags and not counts:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for name, value in counts.items():
                pipe.hincrbyfloat(_k("counters"), name, value)
            if touched:
                # XX: only members still indexed, so an access does not bring back what was evicted.
                pipe.zadd(_k("lru"), {_member(*key): when for key, when in touched.items()}, xx=True, gt=True)
            for key, when in tags.items():
                await self._update(keys=[_tag_key(*key)], args=[pulls[key], "last_access", when], client=pipe)
            await pipe.execute()

    async def close(self) -> None:
        """Flush what is pending. A Redis already gone costs those counts (the failure is logged by
        `flush`), not a clean shutdown."""
        try:
            await self.flush()
        except StorageUnavailable:
            pass
        finally:
            await self.client.aclose()
