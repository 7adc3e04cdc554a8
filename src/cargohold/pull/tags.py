"""Manifests by tag: within `tag_ttl` from the index with no upstream request; after it revalidated with a HEAD
(free under Docker Hub's pull limit), fetched only when the digest moved, and served stale when upstream fails.

A tag found pointing at a new digest is recorded in the index's tag-move history. A tag the upstream's
`immutable_tags` match keeps the first digest seen until an operator accepts a move (`cargohold cache accept`,
which drops the row): a move upstream is recorded and logged, not followed; an upstream that says the tag is gone
or refuses it (404, 401, 403) gets it served stale, not dropped; and it is never asked upstream by tag with a
client's other Accept (the tag may have moved there), so such a client gets the kept manifest or nothing.

A GET is a pull on Docker Hub's quota: with content mirrors a new tag is resolved with a free HEAD and its manifest
fetched by digest (from a mirror first); a moved tag nobody asked about within `tag_ttl` is refreshed with a pull
that may be deferred (served stale) when the quota is at its reserve (upstream/quota.py).

The index holds answers to the full Accept. A client that does not take the type a (mutable) tag points at gets
upstream's answer for its own Accept, asked once for concurrent clients and remembered (per process) within `tag_ttl`.

A hit is remembered for a second per Accept (`_hits`, per process): the next GET or HEAD of the tag within it
is answered without reading the rows again, as they would be read from `Fresh` within that second anyway.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from cargohold.cache.index import Index, TagEntry
from cargohold.config import UpstreamConfig
from cargohold.errors import ManifestUnknown, UpstreamError
from cargohold.flight import SingleFlight
from cargohold.oci.digests import Digest
from cargohold.oci.mediatypes import FULL_ACCEPT, KNOWN, accepts, takes_everything
from cargohold.pull.accepts import OtherAccepts
from cargohold.pull.links import Links
from cargohold.pull.manifests import Head, Manifest, Manifests, answerable, head_of
from cargohold.pull.recent import Fresh, Recent
from cargohold.tasks import Tasks
from cargohold.upstream.offline import Offline
from cargohold.upstream.repository import Descriptor, Remote

log = logging.getLogger("cargohold.proxy")

TagKey = tuple[str, str, str]


async def record_move(index: Index, key: TagKey, old: str, new: str, *, once: bool) -> bool:
    """Record in the tag-move history that the tag was found at `new` instead of `old`; with `once` (an immutable
    tag, which stays on `old` and is found moved again and again) not when that is already the last move
    recorded. Whether it was recorded."""
    if once:
        last = await index.tag_moves(*key, limit=1)
        if last and (last[0].old_digest, last[0].new_digest) == (old, new):
            return False
    await index.record_tag_move(*key, old, new)
    return True


# Accept headers whose hits are remembered per tag (a client chooses its Accept).
HIT_ACCEPTS = 8


@dataclass(slots=True)
class _Hits:
    """A tag's hits of the last second by Accept, valid while this process has evicted no manifest since."""

    evictions: int
    by_accept: dict[frozenset[str], Manifest] = field(default_factory=dict)


class Tags:
    """Tag -> manifest, wrapping the index (tags), the manifests by digest and the remote."""

    def __init__(
        self,
        index: Index,
        manifests: Manifests,
        links: Links,
        tasks: Tasks,
        upstreams: Mapping[str, UpstreamConfig] | None = None,
    ) -> None:
        self._index = index
        self._upstreams = upstreams or {}
        # Tag moves found (followed or, for immutable tags, refused), for metrics.
        self.moves = 0
        self._manifests = manifests
        self._links = links
        self._fetches: SingleFlight[Manifest] = SingleFlight(tasks, "tag fetch")
        self._revalidations: SingleFlight[TagEntry] = SingleFlight(tasks, "tag revalidation")
        self._heads: Recent[TagKey, Descriptor] = Recent()
        self._head_flights: SingleFlight[Descriptor | None] = SingleFlight(tasks, "tag head")
        self._asked: Recent[TagKey, float] = Recent()  # when a client last asked for a tag by GET
        self._rows: Fresh[TagKey, TagEntry] = Fresh()  # the index's rows of hot tags, read within a second
        self._hits: Fresh[TagKey, _Hits] = Fresh()  # answers from cache of the last second (`_hit`)
        self._other_accepts = OtherAccepts(manifests, links, tasks)

    @property
    def joins(self) -> int:
        """Requests that joined a fetch or revalidation already running (single-flight)."""
        return self._fetches.joins + self._revalidations.joins + self._other_accepts.joins

    async def get(self, remote: Remote, tag: str, accept: frozenset[str]) -> Manifest:
        key = (remote.upstream, remote.repository, tag)
        hit = self._hit(key, accept)
        if hit is not None:
            return hit
        return await self._get(remote, tag, accept, await self._row(key))

    def _hit(self, key: TagKey, accept: frozenset[str]) -> Manifest | None:
        """This Accept's answer from cache of the last second (the tag's pull counted), unless a manifest
        was evicted meanwhile."""
        hits = self._hits.get(key)
        if hits is None or hits.evictions != self._manifests.evictions:
            return None
        hit = hits.by_accept.get(accept)
        if hit is not None:
            self._index.touch_tag(*key)
        return hit

    def _remember_hit(self, key: TagKey, accept: frozenset[str], manifest: Manifest, fresh_for: float) -> None:
        """Remember a hit for a second, or until the tag is due for revalidation if that comes first."""
        hits = self._hits.get(key)
        if hits is None or hits.evictions != self._manifests.evictions:
            hits = _Hits(self._manifests.evictions)
            self._hits.put(key, hits, fresh_for)
        if len(hits.by_accept) < HIT_ACCEPTS:
            hits.by_accept[accept] = manifest

    async def _row(self, key: TagKey) -> TagEntry | None:
        return await self._rows.read(key, lambda: self._index.get_tag(*key))

    async def _put_tag(self, key: TagKey, digest: str, media_type: str) -> None:
        await self._index.put_tag(*key, digest, media_type)
        self._forget(key)

    async def _mark_checked(self, key: TagKey) -> None:
        await self._index.mark_checked(*key)
        self._forget(key)

    def _forget(self, key: TagKey) -> None:
        """The tag's row changed through this process: read it again."""
        self._rows.forget(key)
        self._hits.forget(key)

    async def _get(self, remote: Remote, tag: str, accept: frozenset[str], entry: TagEntry | None) -> Manifest:
        """`entry`: the index's row for the tag, as just read."""
        key = (remote.upstream, remote.repository, tag)
        now, asked = time.time(), self._asked.get(key)
        self._asked.put(key, now)
        if entry is None:
            # Upstream may have answered this client's own Accept already: that answer, without asking anew.
            known = None if self._immutable(key) else self._other_accepts.remembered(remote, tag, accept)
            if known is not None:
                return await self._manifests.get(remote, known.digest)
            # Fetched with the full Accept and remembered, so a client that accepts the manifest's own type
            # (most do, whatever else they list) is answered from cache next time.
            manifest = await self._fetches.run(key, lambda: self._fetch_new(remote, tag))
            if not accepts(accept, manifest.descriptor.media_type):
                return await self._other_accept(remote, tag, accept, manifest.descriptor.media_type)
            return manifest
        if not accepts(accept, entry.media_type):
            return await self._other_accept(remote, tag, accept, entry.media_type)
        self._index.touch_tag(*key)
        fresh_for = entry.checked_at + remote.tag_ttl - now
        if fresh_for > 0:
            manifest = await self._manifests.get(remote, Digest.parse(entry.digest))
            if manifest.cache == "hit":
                self._remember_hit(key, accept, manifest, fresh_for)
            return manifest
        if asked is None or now - asked >= remote.tag_ttl:
            remote = remote.deferrable()  # nobody else asked for it lately: not worth the reserve
        try:
            return await self._revalidated(remote, tag, entry)
        except UpstreamError as exc:
            return await self._stale(remote, key, entry.digest, exc.message)

    async def _stale(self, remote: Remote, key: TagKey, digest: str, why: str) -> Manifest:
        """The digest the tag last had, served stale (said in the log, counted as stale) because of `why`."""
        log.warning("serving stale %s/%s:%s (%s): %s", *key, digest, why)
        return replace(await self._manifests.get(remote, Digest.parse(digest)), cache="stale")

    async def _other_accept(self, remote: Remote, tag: str, accept: frozenset[str], media_type: str) -> Manifest:
        """For a client that does not take `media_type`, the type the tag points at: upstream's answer for its own
        Accept; none for an immutable tag (`_not_taken`)."""
        if self._immutable((remote.upstream, remote.repository, tag)):
            raise _not_taken(tag, media_type)
        return await self._other_accepts.get(remote, tag, accept)

    async def _revalidated(self, remote: Remote, tag: str, entry: TagEntry) -> Manifest:
        """The tag's manifest after one shared revalidation: a miss when the tag moved; stale when an immutable
        tag is gone upstream or refused (404, 401, 403): it keeps its digest."""
        key = (remote.upstream, remote.repository, tag)
        try:
            fresh = await self._revalidations.run(key, lambda: self._revalidate(remote, tag, entry))
        except ManifestUnknown as exc:
            if not self._kept(key, exc):
                raise
            return await self._stale(remote, key, entry.digest, f"immutable tag kept, {exc.message}: {exc.detail}")
        manifest = await self._manifests.get(remote, Digest.parse(fresh.digest))
        return manifest if fresh.digest == entry.digest else replace(manifest, cache="miss")

    async def refresh(self, remote: Remote, tag: str) -> Manifest:
        """The tag revalidated now whatever its age (a HEAD; a GET only if it moved), or fetched: for sync."""
        key = (remote.upstream, remote.repository, tag)
        entry = await self._row(key)
        if entry is None:
            return await self._fetches.run(key, lambda: self._fetch_new(remote, tag))
        return await self._revalidated(remote, tag, entry)

    async def _moved(self, key: TagKey, old: str, new: str) -> None:
        """Record a tag found pointing at `new` instead of `old` (once per move for an immutable tag, which
        stays on `old` and is found moved at every revalidation)."""
        immutable = self._immutable(key)
        if not await record_move(self._index, key, old, new, once=immutable):
            return
        if immutable:
            log.warning("immutable tag %s/%s:%s moved upstream to %s: still serving %s", *key, new, old)
        else:
            log.info("tag %s/%s:%s moved from %s to %s", *key, old, new)
        self.moves += 1

    def _immutable(self, key: TagKey) -> bool:
        config = self._upstreams.get(key[0])
        return config is not None and config.immutable(key[1], key[2])

    def _kept(self, key: TagKey, exc: ManifestUnknown) -> bool:
        """Whether the upstream said the tag is gone or refused it (404, 401, 403; an offline mirror asked nobody)
        and the tag is immutable: then its row stays, and its digest is served stale."""
        return not isinstance(exc, Offline) and self._immutable(key)

    async def _fetch(self, remote: Remote, tag: str) -> Manifest:
        """GET the tag with the full Accept, keep the manifest and point the tag at it."""
        descriptor, body = await remote.get_manifest(tag, FULL_ACCEPT)
        manifest = await self._manifests.keep(remote, descriptor, body)
        await self._put_tag((remote.upstream, remote.repository, tag), str(descriptor.digest), descriptor.media_type)
        return manifest

    async def _fetch_new(self, remote: Remote, tag: str) -> Manifest:
        """A tag not in the index: with content mirrors, a HEAD names the digest (free) and the manifest comes by
        digest (from a mirror first); else, or when the HEAD says too little, one GET by tag."""
        if remote.content_mirrored:
            found = await self._ask(remote, tag)
            if found is not None and found.media_type in KNOWN:
                await self._links.add(remote, str(found.digest))
                manifest = await self._manifests.get(remote, found.digest)
                got = manifest.descriptor
                await self._put_tag((remote.upstream, remote.repository, tag), str(got.digest), got.media_type)
                return manifest
        return await self._fetch(remote, tag)

    async def _ask(self, remote: Remote, tag: str) -> Descriptor | None:
        """HEAD the tag with the full Accept; a tag upstream no longer has (or refuses) is dropped from the index,
        unless it is immutable (`_kept`: its digest is served stale)."""
        key = (remote.upstream, remote.repository, tag)
        try:
            return await remote.head_manifest(tag, FULL_ACCEPT)
        except ManifestUnknown as exc:
            if not isinstance(exc, Offline) and not self._immutable(key):  # an offline mirror asked nobody
                await self._index.drop_tag(*key)
                self._forget(key)
            raise

    async def _revalidate(self, remote: Remote, tag: str, entry: TagEntry) -> TagEntry:
        """HEAD the tag upstream; GET only if the digest moved."""
        key = (remote.upstream, remote.repository, tag)
        found = await self._ask(remote, tag)
        same = found is not None and str(found.digest) == entry.digest
        if found is not None and not same and self._immutable(key):
            await self._moved(key, entry.digest, str(found.digest))
        if same or self._immutable(key):
            await self._mark_checked(key)
            return entry
        if found is None or found.media_type not in KNOWN:
            fetched = (await self._fetch(remote, tag)).descriptor
            if str(fetched.digest) != entry.digest:
                await self._moved(key, entry.digest, str(fetched.digest))
            return TagEntry(str(fetched.digest), fetched.media_type, time.time())
        # The upstream just named this digest for this repository: link it, so no HEAD is needed to serve it.
        await self._links.add(remote, str(found.digest))
        # Fetch the new manifest before the tag points at it: if that fails, the old one is served stale.
        await self._manifests.get(remote, found.digest)
        await self._moved(key, entry.digest, str(found.digest))
        await self._put_tag(key, str(found.digest), found.media_type)
        return TagEntry(str(found.digest), found.media_type, time.time())

    async def head(self, remote: Remote, tag: str, accept: frozenset[str]) -> Head:
        """For HEAD. A tag whose manifest is not cached is asked upstream with a HEAD: remembered, the
        manifest left for a GET to fetch. Everything else is answered as for GET."""
        hit = self._hit((remote.upstream, remote.repository, tag), accept)
        if hit is not None:
            return head_of(hit)
        entry = await self._row((remote.upstream, remote.repository, tag))
        if entry is None or await self._index.get_manifest(entry.digest) is None:
            found = await self._head_uncached(remote, tag, accept, entry)
            if found is not None:
                return found
        return head_of(await self._get(remote, tag, accept, entry))

    async def _head_uncached(
        self, remote: Remote, tag: str, accept: frozenset[str], entry: TagEntry | None
    ) -> Head | None:
        """Within `tag_ttl` the last upstream HEAD's answer (remembered for the full Accept), after it one
        shared upstream HEAD, stale if that fails; None when upstream says too little to answer with. Another
        Accept gets upstream's answer for it, except for an immutable tag (`_not_taken`)."""
        if takes_everything(accept):
            return await self._head_full(remote, tag, entry)
        if not self._immutable((remote.upstream, remote.repository, tag)):
            return await self._other_accepts.head(remote, tag, accept)
        found = await self._head_full(remote, tag, entry)
        if found is not None and not accepts(accept, found.descriptor.media_type):
            raise _not_taken(tag, found.descriptor.media_type)
        return found

    async def _head_full(self, remote: Remote, tag: str, entry: TagEntry | None) -> Head | None:
        """The answer for the full Accept (see `_head_uncached`)."""
        key = (remote.upstream, remote.repository, tag)
        known = self._heads.get(key)
        if entry is None or known is None or str(known.digest) != entry.digest:
            known = None
        elif time.time() - entry.checked_at < remote.tag_ttl:
            return Head(known, "hit")
        try:
            found = await self._head_flights.run(key, lambda: self._head_tag(remote, tag, entry))
        except UpstreamError as exc:
            if known is None:
                raise
            log.warning("serving stale %s/%s:%s (%s): %s", *key, known.digest, exc.message)
            return Head(known, "stale")
        return None if found is None else Head(found, "miss")

    async def _head_tag(self, remote: Remote, tag: str, entry: TagEntry | None) -> Descriptor | None:
        """Upstream's answer to a HEAD of the tag, remembered in the index and here when it can be answered with;
        None for a kept immutable tag that moved, is gone or refused (the GET path serves the digest it keeps,
        asking upstream again: a rare path, the manifest was evicted)."""
        key = (remote.upstream, remote.repository, tag)
        try:
            found = await self._ask(remote, tag)
        except ManifestUnknown as exc:
            if entry is None or not self._kept(key, exc):
                raise
            return None
        if found is None or not answerable(found):
            return None
        if entry is not None and str(found.digest) != entry.digest:
            await self._moved(key, entry.digest, str(found.digest))
            if self._immutable(key):
                await self._mark_checked(key)
                return None
        await self._links.add(remote, str(found.digest))
        await self._put_tag(key, str(found.digest), found.media_type)
        self._heads.put(key, found)
        return found


def _not_taken(tag: str, media_type: str) -> ManifestUnknown:
    """An immutable tag is never asked upstream by tag with a client's other Accept (the tag may have moved there),
    and an index it keeps is not resolved to a platform's manifest here: a client that does not take the kept
    manifest's type gets this 404."""
    return ManifestUnknown(
        f"the immutable tag {tag} is kept at a manifest of type {media_type}, which the request's Accept does not take",
        {"tag": tag, "mediaType": media_type},
    )
