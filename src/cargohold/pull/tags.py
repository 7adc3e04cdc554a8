"""Manifests by tag: within `tag_ttl` from the index with no upstream request; after it revalidated with a HEAD
(free under Docker Hub's pull limit), fetched only when the digest moved, and served stale when upstream fails.

The index holds answers to the full Accept. A client that does not take the type a tag points at gets upstream's
answer for its own Accept, asked once for concurrent clients and remembered (per process) within `tag_ttl`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from cargohold.cache.index import Index, TagEntry
from cargohold.digests import Digest
from cargohold.errors import ManifestUnknown, UpstreamError
from cargohold.flight import SingleFlight
from cargohold.mediatypes import FULL_ACCEPT, KNOWN, accepts, takes_everything
from cargohold.pull.accepts import OtherAccepts
from cargohold.pull.links import Links
from cargohold.pull.manifests import Head, Manifest, Manifests, answerable, head_of
from cargohold.pull.recent import Recent
from cargohold.upstream.repository import Descriptor, Remote

log = logging.getLogger("cargohold.proxy")

TagKey = tuple[str, str, str]


class Tags:
    """Tag -> manifest, wrapping the index (tags), the manifests by digest and the remote."""

    def __init__(self, index: Index, manifests: Manifests, links: Links) -> None:
        self._index = index
        self._manifests = manifests
        self._links = links
        self._fetches: SingleFlight[Manifest] = SingleFlight()
        self._revalidations: SingleFlight[TagEntry] = SingleFlight()
        self._heads: Recent[TagKey, Descriptor] = Recent()
        self._head_flights: SingleFlight[Descriptor | None] = SingleFlight()
        self._other_accepts = OtherAccepts(manifests, links)

    @property
    def joins(self) -> int:
        """Requests that joined a fetch or revalidation already running (single-flight)."""
        return self._fetches.joins + self._revalidations.joins + self._other_accepts.joins

    async def get(self, remote: Remote, tag: str, accept: frozenset[str]) -> Manifest:
        return await self._get(remote, tag, accept, await self._index.get_tag(remote.upstream, remote.repository, tag))

    async def _get(self, remote: Remote, tag: str, accept: frozenset[str], entry: TagEntry | None) -> Manifest:
        """`entry`: the index's row for the tag, as just read."""
        key = (remote.upstream, remote.repository, tag)
        if entry is None:
            # Upstream may have answered this client's own Accept already: that answer, without asking anew.
            known = self._other_accepts.remembered(remote, tag, accept)
            if known is not None:
                return await self._manifests.get(remote, known.digest)
            # Fetched with the full Accept and remembered, so a client that accepts the manifest's own type
            # (most do, whatever else they list) is answered from cache next time.
            manifest = await self._fetches.run(key, lambda: self._fetch(remote, tag))
            if not accepts(accept, manifest.descriptor.media_type):
                return await self._other_accepts.get(remote, tag, accept)
            return manifest
        if not accepts(accept, entry.media_type):
            return await self._other_accepts.get(remote, tag, accept)
        self._index.touch_tag(*key)
        if time.time() - entry.checked_at < remote.tag_ttl:
            return await self._manifests.get(remote, Digest.parse(entry.digest))
        try:
            fresh = await self._revalidations.run(key, lambda: self._revalidate(remote, tag, entry))
        except UpstreamError as exc:
            log.warning("serving stale %s/%s:%s (%s): %s", *key, entry.digest, exc.message)
            return replace(await self._manifests.get(remote, Digest.parse(entry.digest)), cache="stale")
        manifest = await self._manifests.get(remote, Digest.parse(fresh.digest))
        return manifest if fresh.digest == entry.digest else replace(manifest, cache="miss")

    async def _fetch(self, remote: Remote, tag: str) -> Manifest:
        """GET the tag with the full Accept, keep the manifest and point the tag at it."""
        descriptor, body = await remote.get_manifest(tag, FULL_ACCEPT)
        manifest = await self._manifests.keep(remote, descriptor, body)
        await self._index.put_tag(remote.upstream, remote.repository, tag, str(descriptor.digest), descriptor.media_type)
        return manifest

    async def _ask(self, remote: Remote, tag: str) -> Descriptor | None:
        """HEAD the tag with the full Accept; a tag upstream no longer has is dropped from the index."""
        try:
            return await remote.head_manifest(tag, FULL_ACCEPT)
        except ManifestUnknown:
            await self._index.drop_tag(remote.upstream, remote.repository, tag)
            raise

    async def _revalidate(self, remote: Remote, tag: str, entry: TagEntry) -> TagEntry:
        """HEAD the tag upstream; GET only if the digest moved."""
        key = (remote.upstream, remote.repository, tag)
        found = await self._ask(remote, tag)
        if found is not None and str(found.digest) == entry.digest:
            await self._index.mark_checked(*key)
            return entry
        if found is None or found.media_type not in KNOWN:
            fetched = (await self._fetch(remote, tag)).descriptor
            return TagEntry(str(fetched.digest), fetched.media_type, time.time())
        # The upstream just named this digest for this repository: link it, so no HEAD is needed to serve it.
        await self._links.add(remote, str(found.digest))
        # Fetch the new manifest before the tag points at it: if that fails, the old one is served stale.
        await self._manifests.get(remote, found.digest)
        log.info("tag %s/%s:%s moved from %s to %s", *key, entry.digest, found.digest)
        await self._index.put_tag(*key, str(found.digest), found.media_type)
        return TagEntry(str(found.digest), found.media_type, time.time())

    async def head(self, remote: Remote, tag: str, accept: frozenset[str]) -> Head:
        """For HEAD. A tag whose manifest is not cached is asked upstream with a HEAD: remembered, the
        manifest left for a GET to fetch. Everything else is answered as for GET."""
        entry = await self._index.get_tag(remote.upstream, remote.repository, tag)
        if entry is None or await self._index.get_manifest(entry.digest) is None:
            found = await self._head_uncached(remote, tag, accept, entry)
            if found is not None:
                return found
        return head_of(await self._get(remote, tag, accept, entry))

    async def _head_uncached(self, remote: Remote, tag: str, accept: frozenset[str], entry: TagEntry | None) -> Head | None:
        """Within `tag_ttl` the last upstream HEAD's answer (remembered for the full Accept), after it one
        shared upstream HEAD, stale if that fails; None when upstream says too little to answer with."""
        if not takes_everything(accept):
            return await self._other_accepts.head(remote, tag, accept)
        key = (remote.upstream, remote.repository, tag)
        known = self._heads.get(key)
        if entry is None or known is None or str(known.digest) != entry.digest:
            known = None
        elif time.time() - entry.checked_at < remote.tag_ttl:
            return Head(known, "hit")
        try:
            found = await self._head_flights.run(key, lambda: self._head_tag(remote, tag))
        except UpstreamError as exc:
            if known is None:
                raise
            log.warning("serving stale %s/%s:%s (%s): %s", *key, known.digest, exc.message)
            return Head(known, "stale")
        return None if found is None else Head(found, "miss")

    async def _head_tag(self, remote: Remote, tag: str) -> Descriptor | None:
        """Upstream's answer to a HEAD of the tag, remembered in the index and here when it can be answered with."""
        found = await self._ask(remote, tag)
        if found is None or not answerable(found):
            return None
        key = (remote.upstream, remote.repository, tag)
        await self._links.add(remote, str(found.digest))
        await self._index.put_tag(*key, str(found.digest), found.media_type)
        self._heads.put(key, found)
        return found
