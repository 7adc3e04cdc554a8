"""Where counts live: in this process (`memory://`) or in Redis, shared by every replica."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio
from limits.aio.storage import RedisStorage

from cargohold.ratelimit.limiter import MovingWindows
from cargohold.ratelimit.memory import MovingWindowMemory

# A slow Redis must not stall requests: the limiter lets them through when Redis does not answer.
REDIS_TIMEOUT = 1.0


@asynccontextmanager
async def open_storage(uri: str, workers: int = 1) -> AsyncIterator[MovingWindows]:
    """The storage for `memory://` (a 1/`workers` share of each budget) or `redis[s]://host:port[/db]`, closed on exit."""
    if uri == "memory://":
        yield MovingWindowMemory(workers)
        return
    pool = redis.asyncio.ConnectionPool.from_url(
        uri, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT
    )
    try:
        yield RedisStorage(
            "async+" + uri,
            implementation="redispy",
            connection_pool=pool,  # type: ignore[arg-type]  # limits types its options as scalars; redis-py takes a pool
            key_prefix="cargohold",
            wrap_exceptions=True,
        )
    finally:
        await pool.aclose()
