"""Bounded disk: least-recently-used eviction by the index's last access, and the start-up repair.

The index row goes first, the file after it, so a crash in between leaves a file without a row,
which the start-up repair puts back in the index (and the next eviction removes again). A blob
that a client of this process is reading, or that is being downloaded, is never evicted; nor is
pinned content (see `cache/pins.py`), whose bytes still count toward the cap.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable

from cargohold.cache.index import Index, Stored
from cargohold.cache.pins import Pinned, resolve_pins
from cargohold.cache.store import BlobStore
from cargohold.config import CacheConfig
from cargohold.oci.digests import Digest
from cargohold.oci.mediatypes import media_type_of

log = logging.getLogger("cargohold.evict")

BATCH = 500
INTERVAL = 60.0
MAX_MANIFEST = 4 << 20

Busy = Callable[[Digest], bool]
Evicted = Callable[[Stored], None]
PinnedBytes = Callable[[int], None]
Pins = Callable[[], Awaitable[Pinned]]


def _never_busy(digest: Digest) -> bool:
    return False


async def evict(
    index: Index,
    store: BlobStore,
    *,
    max_size: int | None = None,
    unused_since: float | None = None,
    incoming: int = 0,
    busy: Busy = _never_busy,
    evicted: Evicted | None = None,
    pins: Pins | None = None,
) -> list[Stored]:
    """Remove least-recently-used content until the cache plus `incoming` bytes fit in `max_size`,
    and everything not used since `unused_since`, except pinned content. Returns what was removed.
    `pins` is asked once, and only when something is to go (it reads manifests)."""
    await index.flush()  # access times still in memory count too
    over = (await index.usage()).size + incoming - max_size if max_size is not None else 0
    if over <= 0 and unused_since is None:
        return []
    removed: list[Stored] = []
    skipped = 0
    kept: frozenset[str] | None = None
    while True:
        batch = await index.least_recent(BATCH, offset=skipped)
        if not batch:
            return removed
        for entry in batch:
            too_old = unused_since is not None and entry.last_access < unused_since
            if over <= 0 and not too_old:
                return removed
            if kept is None:
                kept = (await pins()).digests if pins is not None else frozenset()
            digest = Digest.parse(entry.digest)
            if entry.digest in kept or busy(digest):
                skipped += 1
                continue
            await index.forget(entry.table, entry.digest)
            await store.delete(digest)
            over -= entry.size
            removed.append(entry)
            if evicted is not None:
                evicted(entry)
        await asyncio.sleep(0)  # let requests run between batches


def _manifest_type(body: bytes) -> str | None:
    """The media type if `body` is an image manifest or index (not a config blob), else None."""
    try:
        document = json.loads(body)
        media_type = media_type_of(None, body)
    except (ValueError, RecursionError):  # any cached blob: an upstream's bytes
        return None
    is_manifest = isinstance(document, dict) and any(k in document for k in ("layers", "manifests", "fsLayers"))
    return media_type if is_manifest else None


async def repair(index: Index, store: BlobStore) -> tuple[int, int]:
    """Make index and files agree after a crash: rows without a file go, files without a row are
    indexed again (manifests recognised by their content). Returns (rows dropped, files indexed).
    Rows are read before files are listed: content is stored before its row is written, so a replica
    committing meanwhile (shared storage) cannot look like a row without a file."""
    known = {entry.digest: entry for entry in await index.stored()}
    files = {digest: size async for digest, size in store.entries()}
    on_disk = {str(d): size for d, size in files.items()}
    dropped = [entry for digest, entry in known.items() if digest not in on_disk]
    for entry in dropped:
        await index.forget(entry.table, entry.digest)
    adopted = [d for d in files if str(d) not in known]
    for digest in adopted:
        body = await store.load(digest) if files[digest] <= MAX_MANIFEST else None
        media_type = _manifest_type(body) if body is not None else None
        if media_type is not None:
            await index.put_manifest(str(digest), media_type, files[digest])
        else:
            await index.put_blob(str(digest), files[digest])
    if dropped or adopted:
        log.warning(
            "index repaired: %d rows without a file dropped, %d files without a row indexed", len(dropped), len(adopted)
        )
    return len(dropped), len(adopted)


class Evictor:
    """Keeps one instance's cache within `cache.max_size` and `cache.max_age`, pinned content aside;
    `pinned_bytes` hears what pins hold whenever they were resolved (every periodic run; a metric)."""

    def __init__(
        self,
        index: Index,
        store: BlobStore,
        config: CacheConfig,
        busy: Busy,
        evicted: Evicted | None = None,
        pinned_bytes: PinnedBytes | None = None,
    ) -> None:
        self._index = index
        self._store = store
        self._config = config
        self._busy = busy
        self._evicted = evicted
        self._pinned_bytes = pinned_bytes
        self._pins_over_cap = False
        self._lock = asyncio.Lock()

    @property
    def bounded(self) -> bool:
        return self._config.max_size is not None or self._config.max_age is not None

    async def pinned(self) -> Pinned:
        return await resolve_pins(self._index, self._store, self._config.pin)

    def _report(self, pinned: Pinned) -> None:
        """Tell the metric, and the log when pins alone outgrow the cap (once, not at every run)."""
        if self._pinned_bytes is not None:
            self._pinned_bytes(pinned.size)
        cap = self._config.max_size
        over = cap is not None and pinned.size > cap
        if over and not self._pins_over_cap:
            log.warning(
                "pinned images alone take %d bytes, more than cache.max_size (%s bytes): they are kept,"
                " everything else is evicted",
                pinned.size,
                cap,
            )
        self._pins_over_cap = over

    async def enforce(self, incoming: int = 0, pinned: Pinned | None = None) -> list[Stored]:
        """Evict what the limits say must go now, making room for `incoming` more bytes."""
        if not self.bounded:
            return []
        resolved = pinned

        async def pins() -> Pinned:
            nonlocal resolved
            if resolved is None:
                resolved = await self.pinned()
            return resolved

        async with self._lock:
            max_age = self._config.max_age
            removed = await evict(
                self._index,
                self._store,
                max_size=self._config.max_size,
                unused_since=time.time() - max_age if max_age is not None else None,
                incoming=incoming,
                busy=self._busy,
                evicted=self._evicted,
                pins=pins,
            )
        if resolved is not None:
            self._report(resolved)
        if removed:
            log.info("evicted %d entries, %d bytes", len(removed), sum(e.size for e in removed))
        return removed

    async def make_room(self, incoming: int) -> bool:
        """Called before downloads write `incoming` bytes: evict first if they would exceed the cap.
        False when they do not fit even so (what is left is in use)."""
        max_size = self._config.max_size
        if max_size is None:
            return True
        try:
            await self.enforce(incoming)
            return (await self._index.usage()).size + incoming <= max_size
        except Exception:  # a full cache must not fail the download that is waiting
            log.exception("eviction before a download failed")
            return True

    async def run_forever(self, interval: float = INTERVAL) -> None:
        while True:
            try:
                await self.enforce(pinned=await self.pinned())
            except Exception:
                log.exception("eviction failed")
            await asyncio.sleep(interval)
