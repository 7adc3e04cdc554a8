"""The configured storage and index, opened together: filesystem + SQLite for one instance, or a
bucket + Redis shared by replicas (with the cluster's download locks); the workers of one machine
share its download locks as files."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import redis.asyncio as redis

from cargohold.cache.filelocks import FileLocks
from cargohold.cache.index import Index, SqliteIndex
from cargohold.cache.peers import Peers, RedisPeers
from cargohold.cache.redisindex import RedisIndex
from cargohold.cache.store import BlobStore, FsBlobStore, RemoteBlob
from cargohold.config import ConfigError, Settings

if TYPE_CHECKING:
    # Checked assignments: mypy proves each store and index matches its protocol (nothing runs; the
    # protocols are structural, so a drifted method shows up here rather than where it is used).
    from cargohold.cache.s3store import S3BlobStore, S3Object

    _fs_store: type[BlobStore] = FsBlobStore
    _s3_store: type[BlobStore] = S3BlobStore
    _s3_object: type[RemoteBlob] = S3Object
    _sqlite_index: type[Index] = SqliteIndex
    _redis_index: type[Index] = RedisIndex


@dataclass(frozen=True, slots=True)
class Backends:
    store: BlobStore
    index: Index
    peers: Peers | None  # with a shared bucket and a shared (Redis) index, or several workers


@contextlib.asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[BlobStore]:
    if settings.storage.backend == "filesystem":
        yield FsBlobStore(settings.data_dir)
        return
    # Imported here: botocore costs about 0.2 s and 8 MiB that a filesystem cache never needs.
    from botocore.exceptions import BotoCoreError, ClientError

    from cargohold.cache.s3store import open_s3_store

    s3 = settings.storage.s3
    assert s3 is not None  # checked by StorageConfig
    try:
        async with open_s3_store(s3, settings.data_dir) as store:
            yield store
    except (ClientError, BotoCoreError) as exc:
        raise ConfigError(f"storage.s3: bucket {s3.bucket!r} is not usable: {exc}") from None


@contextlib.asynccontextmanager
async def open_backends(settings: Settings) -> AsyncIterator[Backends]:
    """Store and index for as long as the block runs; the index is flushed and closed at its end."""
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    async with open_store(settings) as store:
        index: Index
        peers: Peers | None = None
        if settings.index.redis:
            client = redis.Redis.from_url(settings.index.url, decode_responses=True, socket_timeout=10)
            try:
                await client.ping()
            except redis.RedisError as exc:
                await client.aclose()
                where = urlsplit(settings.index.url)
                raise ConfigError(
                    f"index.url: cannot reach redis at {where.hostname}:{where.port or 6379}: {exc}"
                ) from None
            index = RedisIndex(client)
            if settings.storage.backend == "s3":  # replicas share content only through a bucket
                peers = RedisPeers(client, settings.index.peer_wait, settings.index.lease)
        else:
            index = SqliteIndex(settings.data_dir / "index.sqlite")
        if peers is None and settings.worker_count > 1:  # the workers of this machine share its data_dir
            peers = FileLocks(settings.data_dir / "locks", settings.index.peer_wait)
        try:
            yield Backends(store, index, peers)
        finally:
            await index.close()
