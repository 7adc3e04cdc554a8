"""Single-flight across replicas that share a bucket and a Redis: one upstream fetch per digest per cluster.

A replica about to download a blob takes `cargohold:lock:<digest>` (SET NX PX) and renews it until the
download has ended, committed or not; it then deletes it. Another replica asked for the same blob polls
for the lock with backoff: once it gets it, the blob has landed in the bucket (serve it from there) or
the holder failed or died (the lease ran out) and this replica downloads it. After `index.peer_wait`
it stops waiting and downloads too, so a wedged holder delays clients by a bounded time only.
`index.lease` is how long a lock lives without renewal: how long a dead holder keeps others waiting.

`Peers` is the waiting and taking over that every kind of lock shares; `RedisPeers` locks across
machines, `cache/filelocks.py` across the worker processes of one machine.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import secrets
import socket
import weakref
from collections import Counter
from dataclasses import replace
from pathlib import Path

import redis.asyncio as redis

from cargohold.cache.download import Download
from cargohold.cache.peerfile import Publication, Wait
from cargohold.cache.store import BlobStore, RemoteBlob
from cargohold.errors import StorageUnavailable
from cargohold.oci.digests import Digest

log = logging.getLogger("cargohold.peers")

POLL_FIRST, POLL_MAX = 0.05, 0.5
# Renew or delete the lock only while it is still ours (it may have expired and been taken over).
RENEW_SCRIPT = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
)
RELEASE_SCRIPT = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class Lease:
    """This replica's turn to download one digest; held until that download ends."""

    def __init__(self, peers: Peers, key: str, token: str) -> None:
        self._peers = peers
        self.key = key
        self.token = token

    async def hold_until(self, download: Download) -> None:
        """Keep the lock alive while `download` runs, then let the waiting replicas look in the bucket
        (run in the background by the app's `Tasks`, which cancels it at shutdown: the lock is released)."""
        try:
            await self._peers.publish(self, download)
            while True:
                try:
                    await asyncio.wait_for(download.wait_finished(), self._peers.lease / 3)
                    return
                except TimeoutError:
                    if not await self._peers.renew(self):
                        log.warning("lost the cluster lock on %s (another replica may fetch it too)", download.digest)
        finally:
            await asyncio.shield(self.release())

    async def release(self) -> None:
        await self._peers.release(self)


class Peers(abc.ABC):
    """Download locks per digest shared with other processes: take one, or wait for its holder's download."""

    poll_max = POLL_MAX  # the longest pause between two looks at a held lock

    def __init__(self, wait: float, lease: float) -> None:
        self.wait = wait
        self.lease = lease
        # How waits for another replica's download ended: landed, took_over, timed_out, followed (for metrics),
        # each counted once (see `claim`).
        self.waits: Counter[str] = Counter()
        # The last wait per lock that found a download to follow, while one of its followers lives.
        self._follows: weakref.WeakValueDictionary[str, Wait] = weakref.WeakValueDictionary()

    @abc.abstractmethod
    def key(self, digest: Digest) -> str:
        """The lock's name for `digest`."""

    @abc.abstractmethod
    async def take(self, key: str, token: str) -> bool:
        """Take the lock `key` as `token` when nobody holds it."""

    @abc.abstractmethod
    async def renew(self, lease: Lease) -> bool:
        """Keep `lease` alive; False when it is no longer ours."""

    @abc.abstractmethod
    async def release(self, lease: Lease) -> None: ...

    async def publish(self, lease: Lease, download: Download) -> None:
        """Tell the others how to follow `download`, the one `lease` is held for (where they can: see
        `published`)."""
        return

    async def published(self, digest: Digest, store: BlobStore) -> Publication | None:
        """How to follow the download of `digest` in progress elsewhere; None where others cannot
        (across machines) or nothing is published."""
        return None

    async def claim(
        self, digest: Digest, store: BlobStore, *, follow: bool = False
    ) -> Lease | Path | RemoteBlob | Publication | None:
        """A lease to download `digest`; or the blob, landed meanwhile by another replica; with `follow`,
        the download in progress elsewhere that can be followed; or None when the wait ran out (download
        without a lease).
        A claim that waited counts how its wait ended in `waits`, once; one that found a download to follow
        leaves that to its `Wait`: `followed` once a follower has a piece to send, else the claim without
        `follow` its client falls back to ends that same wait (counted even if that claim did not wait)."""
        key = self.key(digest)
        resumed = None if follow else self._follows.get(key)
        token = secrets.token_hex(8)
        loop = asyncio.get_running_loop()
        deadline, delay, waited = loop.time() + self.wait, POLL_FIRST, False
        while True:
            if await self.take(key, token):
                lease = Lease(self, key, token)
                try:
                    found = await store.locate(digest)  # it may have landed since the caller looked
                except BaseException:
                    await asyncio.shield(lease.release())
                    raise
                self._count("took_over" if found is None else "landed", waited, resumed)
                if found is None:
                    return lease
                await lease.release()
                return found
            publication = await self.published(digest, store) if follow else None
            if not waited:
                what = "following its download" if publication else "waiting for it to land"
                log.info("another replica is fetching %s; %s", digest, what)
                waited = True
            if publication is not None:
                wait = Wait(self.waits)
                self._follows[key] = wait
                return replace(publication, wait=wait)
            if loop.time() >= deadline:
                self._count("timed_out", waited, resumed)
                log.warning(
                    "waited %.0fs for another replica's download of %s; fetching it here too", self.wait, digest
                )
                return None
            await asyncio.sleep(min(delay, max(deadline - loop.time(), 0)))
            delay = min(delay * 2, self.poll_max)

    def _count(self, outcome: str, waited: bool, resumed: Wait | None) -> None:
        """Count a claim's end: as the end of the follow it falls back from, else as a wait of its own."""
        if resumed is not None:
            resumed.count(outcome)
        elif waited:
            self.waits[outcome] += 1


class RedisPeers(Peers):
    """The cluster's download locks in Redis (shared with the index's connection pool)."""

    def __init__(self, client: redis.Redis, wait: float, lease: float) -> None:
        super().__init__(wait, lease)
        self._client = client
        self._renew = client.register_script(RENEW_SCRIPT)
        self._release = client.register_script(RELEASE_SCRIPT)
        self._replica = f"{socket.gethostname()}:{secrets.token_hex(4)}"

    def key(self, digest: Digest) -> str:
        return f"cargohold:lock:{digest}"

    async def take(self, key: str, token: str) -> bool:
        try:
            return bool(await self._client.set(key, f"{self._replica}:{token}", nx=True, px=int(self.lease * 1000)))
        except redis.RedisError as exc:
            log.error("cluster lock %s: %s", key, exc)
            raise StorageUnavailable("the cache's index failed", {"operation": "lock"}) from None

    async def renew(self, lease: Lease) -> bool:
        try:
            args: list[str | int] = [f"{self._replica}:{lease.token}", int(self.lease * 1000)]
            return bool(await self._renew(keys=[lease.key], args=args))
        except redis.RedisError:
            return False

    async def release(self, lease: Lease) -> None:
        try:
            await self._release(keys=[lease.key], args=[f"{self._replica}:{lease.token}"])
        except redis.RedisError as exc:  # it expires by itself
            log.warning("could not release the cluster lock %s: %s", lease.key, exc)
