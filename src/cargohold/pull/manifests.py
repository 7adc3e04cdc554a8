"""Manifests by digest: immutable, so local first, and on a miss one upstream GET per digest however many ask."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cargohold.cache.download import is_disk_full
from cargohold.cache.index import Index, ManifestEntry
from cargohold.cache.store import BlobStore
from cargohold.flight import SingleFlight
from cargohold.oci.digests import Digest
from cargohold.oci.mediatypes import FULL_ACCEPT, KNOWN
from cargohold.pull.links import Links
from cargohold.pull.recent import Fresh, RecentBytes
from cargohold.tasks import Tasks
from cargohold.upstream.repository import MAX_MANIFEST, Descriptor, Remote

# Bytes of hot manifests kept in memory per process (each at most 1 MiB).
BODIES_IN_MEMORY = 32 << 20

log = logging.getLogger("cargohold.proxy")


@dataclass(frozen=True, slots=True)
class Manifest:
    """A manifest ready to send, and how it was obtained (hit, miss or stale) for the access log."""

    descriptor: Descriptor
    body: bytes
    cache: str


@dataclass(frozen=True, slots=True)
class Head:
    """What a HEAD answers: the manifest's descriptor without its body, and how it was obtained."""

    descriptor: Descriptor
    cache: str


def head_of(manifest: Manifest) -> Head:
    return Head(manifest.descriptor, manifest.cache)


def answerable(found: Descriptor) -> bool:
    """Whether an upstream HEAD's answer can answer a client's HEAD: a manifest type, and a believable size
    (under 2 bytes or over MAX_MANIFEST, or none, is not believed: the manifest is fetched instead)."""
    return found.media_type in KNOWN and 2 <= found.size <= MAX_MANIFEST


class Manifests:
    """Manifests stored by digest in the blob store, their media types in the index, linked per repository."""

    def __init__(self, store: BlobStore, index: Index, links: Links, tasks: Tasks) -> None:
        self._store = store
        self._index = index
        self._links = links
        self._fetches: SingleFlight[Manifest] = SingleFlight(tasks, "manifest fetch")
        # Hot manifests' bytes (immutable by digest), so a warm hit needs no file read on a worker thread;
        # served only while the index holds the manifest (eviction removes the row first), as read within
        # the last second (`_rows`: another worker's or the CLI's removal is seen within it; this
        # process's eviction calls `forget`).
        self._bodies: RecentBytes[Digest] = RecentBytes(BODIES_IN_MEMORY, 1 << 20)
        self._rows: Fresh[Digest, ManifestEntry] = Fresh()
        # How many manifests this process has evicted: answers remembered before a change of it are not served.
        self.evictions = 0

    @property
    def joins(self) -> int:
        """Requests that joined a fetch already running (single-flight)."""
        return self._fetches.joins

    def forget(self, digest: Digest) -> None:
        """The manifest was evicted by this process: not served from memory any more."""
        self._rows.forget(digest)
        self.evictions += 1

    async def get(self, remote: Remote, digest: Digest) -> Manifest:
        entry = await self._rows.read(digest, lambda: self._index.get_manifest(str(digest)))
        if entry is not None:
            body = self._bodies.get(digest)
            if body is None:
                body = await self._store.load(digest)
                if body is not None:
                    self._bodies.put(digest, body)
            if body is not None:
                await self._links.confirm(remote, digest, "manifests")
                self._index.touch("manifests", str(digest))
                return Manifest(Descriptor(digest, entry.media_type, len(body)), body, "hit")
        key = (remote.upstream, remote.repository, str(digest))
        return await self._fetches.run(key, lambda: self._fetch(remote, digest))

    async def head(self, remote: Remote, digest: Digest) -> Head:
        """A digest not cached is asked with a HEAD (not counted by Docker Hub's pull limit) and the manifest
        left for a GET to fetch; a cached one, or one upstream's HEAD says too little about, as for GET."""
        if await self._index.get_manifest(str(digest)) is None:
            found = await remote.head_manifest(str(digest), FULL_ACCEPT)
            if found is not None and answerable(found):
                await self._links.add(remote, str(digest))
                return Head(found, "miss")
        return head_of(await self.get(remote, digest))

    async def _fetch(self, remote: Remote, digest: Digest) -> Manifest:
        return await self.keep(remote, *await remote.get_manifest(str(digest), FULL_ACCEPT))

    async def keep(self, remote: Remote, descriptor: Descriptor, body: bytes) -> Manifest:
        """Store a verified manifest by digest, index its media type and link it to the repository it came from."""
        manifest = Manifest(descriptor, body, "miss")
        try:
            await self._store.save(descriptor.digest, body)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            log.error("disk full: serving manifest %s without caching it: %s", descriptor.digest, exc)
            return manifest
        await self._index.put_manifest(str(descriptor.digest), descriptor.media_type, descriptor.size)
        self._bodies.put(descriptor.digest, body)
        await self._links.add(remote, str(descriptor.digest))
        return manifest
