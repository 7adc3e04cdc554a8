"""The pull-through rules: what comes from cache, what goes upstream, and what happens when upstream fails."""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp

from cargohold.blobsource import BlobSource, BucketObject, Described, Follower, LocalFile
from cargohold.cache.download import Download, Downloads, is_disk_full
from cargohold.cache.index import Index, TagEntry
from cargohold.cache.peers import Lease, Peers
from cargohold.cache.store import BlobStore, RemoteBlob
from cargohold.digests import Digest, looks_like_digest
from cargohold.errors import (
    BlobUnknown,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    StorageUnavailable,
    UpstreamError,
    UpstreamInvalid,
    UpstreamUnavailable,
)
from cargohold.flight import SingleFlight
from cargohold.mediatypes import FULL_ACCEPT, KNOWN, accepts, media_type_of, takes_everything
from cargohold.names import check_tag
from cargohold.upstream.routes import Router, Target

log = logging.getLogger("cargohold.proxy")

MAX_MANIFEST = 4 << 20
# HEAD answers remembered for tags whose manifest no GET has fetched yet (per process, least recent dropped).
HEAD_ANSWERS = 10_000
MAX_TAG_LIST = 16 << 20


@dataclass(frozen=True, slots=True)
class Manifest:
    """A manifest ready to send, and how it was obtained (hit, miss or stale) for the access log."""

    body: bytes
    media_type: str
    digest: str
    cache: str


@dataclass(frozen=True, slots=True)
class ManifestHead:
    """What a HEAD answers: the manifest's digest, size and type, without its body."""

    digest: str
    size: int
    media_type: str
    cache: str


@dataclass(frozen=True, slots=True)
class TagList:
    body: bytes
    link: str | None


def _upstream_failure(resp: aiohttp.ClientResponse, unknown: type[RegistryError], what: str) -> RegistryError:
    """The error for a non-success upstream answer; only 404/401/403 mean "it does not exist"."""
    detail = {"upstream": str(resp.url.host), "status": resp.status}
    if resp.status in (401, 403, 404):
        return unknown(f"{what} not found upstream", detail)
    if resp.status == 429:
        retry = resp.headers.get("Retry-After")
        return UpstreamUnavailable(f"upstream is rate limiting us while fetching {what}", detail, {"Retry-After": retry} if retry else None)
    if resp.status >= 500:
        return UpstreamUnavailable(f"upstream failed while fetching {what}", detail)
    return UpstreamInvalid(f"unexpected upstream answer while fetching {what}", detail)


async def _read_limited(resp: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    """The whole body, refusing anything over `limit` bytes without reading it all."""
    if resp.content_length is not None and resp.content_length > limit:
        raise UpstreamInvalid(f"upstream {what} is too large", {"size": resp.content_length, "limit": limit})
    body = bytearray()
    async for chunk in resp.content.iter_chunked(65536):
        body += chunk
        if len(body) > limit:
            raise UpstreamInvalid(f"upstream {what} is too large", {"limit": limit})
    return bytes(body)


async def _get_manifest(target: Target, reference: str, accept: str) -> tuple[bytes, str | None, str | None]:
    """GET a manifest upstream: its bytes, Content-Type and claimed Docker-Content-Digest."""
    resp = await target.upstream.open(
        "GET", target.repository, f"/v2/{target.repository}/manifests/{reference}", {"Accept": accept}
    )
    async with resp:
        if resp.status != 200:
            raise _upstream_failure(resp, ManifestUnknown, "manifest")
        body = await _read_limited(resp, MAX_MANIFEST, "manifest")
        return body, resp.headers.get("Content-Type"), resp.headers.get("Docker-Content-Digest")


def _source(target: Target) -> tuple[str, str]:
    return target.upstream.name, target.repository


def _head_size(size: int | None) -> int | None:
    """A manifest size an upstream's HEAD gives, or None when it is not believable (fetch instead)."""
    return size if size is not None and 2 <= size <= MAX_MANIFEST else None


def _is_json_object(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body), dict)
    except ValueError:
        return False


class PullThrough:
    """Serves manifests, blobs and tag lists from cache, going upstream only when the rules say so."""

    def __init__(
        self, router: Router, store: BlobStore, index: Index, downloads: Downloads, peers: Peers | None = None
    ) -> None:
        self.router = router
        self.store = store
        self.index = index
        self.downloads = downloads
        self.peers = peers
        self._peer_fetches: SingleFlight[Download | Path | RemoteBlob] = SingleFlight()
        self._manifests: SingleFlight[Manifest] = SingleFlight()
        self._tags: SingleFlight[TagEntry] = SingleFlight()
        self._links: SingleFlight[None] = SingleFlight()
        self._heads: OrderedDict[tuple[str, str, str], ManifestHead] = OrderedDict()
        self._head_flights: SingleFlight[ManifestHead | None] = SingleFlight()

    @property
    def joins(self) -> int:
        """Requests that joined a manifest or tag fetch already running (single-flight)."""
        return self._manifests.joins + self._tags.joins

    # manifests

    async def manifest(self, target: Target, reference: str, accept: frozenset[str]) -> Manifest:
        if looks_like_digest(reference):
            return await self._by_digest(target, Digest.parse(reference))
        tag = check_tag(reference)
        return await self._by_tag(target, tag, accept, await self.index.get_tag(target.upstream.name, target.repository, tag))

    async def _by_tag(self, target: Target, tag: str, accept: frozenset[str], entry: TagEntry | None) -> Manifest:
        """`entry`: the index's row for the tag, as just read."""
        key = (target.upstream.name, target.repository, tag)
        if entry is None:
            # Fetched with the full Accept and remembered, so a client that accepts the manifest's own type
            # (most do, whatever else they list) is answered from cache next time.
            manifest = await self._manifests.run(("tag",) + key, lambda: self._fetch_tag(target, tag, None, remember=True))
            if not accepts(accept, manifest.media_type):
                return await self._fetch_tag(target, tag, accept, remember=False)
            return manifest
        if not accepts(accept, entry.media_type):
            return await self._fetch_tag(target, tag, accept, remember=False)
        self.index.touch_tag(*key)
        if time.time() - entry.checked_at < target.upstream.config.tag_ttl:
            return await self._by_digest(target, Digest.parse(entry.digest))
        try:
            fresh = await self._tags.run(key, lambda: self._revalidate(target, tag, entry))
        except UpstreamError as exc:
            log.warning("serving stale %s/%s:%s (%s): %s", *key, entry.digest, exc.message)
            return replace(await self._by_digest(target, Digest.parse(entry.digest)), cache="stale")
        manifest = await self._by_digest(target, Digest.parse(fresh.digest))
        return manifest if fresh.digest == entry.digest else replace(manifest, cache="miss")

    async def _revalidate(self, target: Target, tag: str, entry: TagEntry) -> TagEntry:
        """HEAD the tag upstream (free under Docker Hub's pull limit); GET only if the digest moved."""
        key = (target.upstream.name, target.repository, tag)
        digest, content_type, _ = await self._ask(target, tag, FULL_ACCEPT)
        if digest == entry.digest:
            await self.index.mark_checked(*key)
            return entry
        moved = Digest.parse_or_none(digest)
        if moved is None or content_type not in KNOWN:
            manifest = await self._fetch_tag(target, tag, None, remember=True)
            return TagEntry(manifest.digest, manifest.media_type, time.time())
        # The upstream just named this digest for this repository: link it, so no HEAD is needed to serve it.
        await self._link(target, str(moved))
        # Fetch the new manifest before the tag points at it: if that fails, the old one is served stale.
        await self._by_digest(target, moved)
        log.info("tag %s/%s:%s moved from %s to %s", *key, entry.digest, moved)
        await self.index.put_tag(*key, str(moved), content_type)
        return TagEntry(str(moved), content_type, time.time())

    async def _ask(self, target: Target, reference: str, accept: str) -> tuple[str | None, str, int | None]:
        """HEAD a manifest upstream: the digest, media type and size it names. A tag upstream no longer
        has (asked with the full Accept, as the index's entries are) is dropped from the index."""
        resp = await target.upstream.open(
            "HEAD", target.repository, f"/v2/{target.repository}/manifests/{reference}", {"Accept": accept}
        )
        async with resp:
            if resp.status != 200:
                error = _upstream_failure(resp, ManifestUnknown, "manifest")
                if isinstance(error, ManifestUnknown) and accept == FULL_ACCEPT and not looks_like_digest(reference):
                    await self.index.drop_tag(target.upstream.name, target.repository, reference)
                raise error
            content_type = resp.headers.get("Content-Type", "").split(";", 1)[0].strip()
            return resp.headers.get("Docker-Content-Digest"), content_type, resp.content_length

    async def manifest_head(self, target: Target, reference: str, accept: frozenset[str]) -> ManifestHead:
        """For HEAD. A tag or digest whose manifest is not cached is asked upstream with a HEAD, which
        Docker Hub's pull limit does not count: a tag is remembered, the manifest left for a GET to
        fetch. Everything else is answered as for GET."""
        if looks_like_digest(reference):
            digest = Digest.parse(reference)
            if await self.index.get_manifest(str(digest)) is None:
                head = await self._head_digest(target, digest)
                if head is not None:
                    return head
            manifest = await self._by_digest(target, digest)
        else:
            tag = check_tag(reference)
            entry = await self.index.get_tag(target.upstream.name, target.repository, tag)
            if entry is None or await self.index.get_manifest(entry.digest) is None:
                head = await self._head_uncached_tag(target, tag, accept, entry)
                if head is not None:
                    return head
            manifest = await self._by_tag(target, tag, accept, entry)
        return ManifestHead(manifest.digest, len(manifest.body), manifest.media_type, manifest.cache)

    async def _head_digest(self, target: Target, digest: Digest) -> ManifestHead | None:
        """The upstream's answer to a HEAD of the digest; None when it says too little to answer with."""
        claimed, media_type, size = await self._ask(target, str(digest), FULL_ACCEPT)
        size = _head_size(size)
        if (claimed and Digest.parse_or_none(claimed) != digest) or size is None or media_type not in KNOWN:
            return None
        await self._link(target, str(digest))
        return ManifestHead(str(digest), size, media_type, "miss")

    async def _head_uncached_tag(
        self, target: Target, tag: str, accept: frozenset[str], entry: TagEntry | None
    ) -> ManifestHead | None:
        """A HEAD of a tag whose manifest is not cached: within `tag_ttl` the last upstream HEAD's answer
        (remembered for the full Accept), after it one shared upstream HEAD, stale if that fails."""
        key = (target.upstream.name, target.repository, tag)
        if not takes_everything(accept):
            return await self._head_tag(target, tag, accept)
        known = self._heads.get(key)
        if entry is None or known is None or known.digest != entry.digest:
            known = None
        else:
            self._heads.move_to_end(key)
            if time.time() - entry.checked_at < target.upstream.config.tag_ttl:
                return replace(known, cache="hit")
        try:
            return await self._head_flights.run(key, lambda: self._head_tag(target, tag, accept))
        except UpstreamError as exc:
            if known is None:
                raise
            log.warning("serving stale %s/%s:%s (%s): %s", *key, known.digest, exc.message)
            return replace(known, cache="stale")

    async def _head_tag(self, target: Target, tag: str, accept: frozenset[str]) -> ManifestHead | None:
        """The upstream's answer to a HEAD of the tag; None when it says too little to answer with."""
        everything = takes_everything(accept)
        claimed, media_type, size = await self._ask(target, tag, FULL_ACCEPT if everything else ", ".join(sorted(accept)))
        digest, size = Digest.parse_or_none(claimed), _head_size(size)
        if digest is None or size is None or media_type not in KNOWN:
            return None
        await self._link(target, str(digest))
        head = ManifestHead(str(digest), size, media_type, "miss")
        if everything:  # the index holds answers to the full Accept only
            key = (target.upstream.name, target.repository, tag)
            await self.index.put_tag(*key, str(digest), media_type)
            self._heads[key] = head
            self._heads.move_to_end(key)
            if len(self._heads) > HEAD_ANSWERS:
                self._heads.popitem(last=False)
        return head

    async def _fetch_tag(self, target: Target, tag: str, accept: frozenset[str] | None, remember: bool) -> Manifest:
        """GET a manifest by tag; `remember` records the tag (only for answers to the full Accept)."""
        accept_header = FULL_ACCEPT if accept is None else ", ".join(sorted(accept))
        body, content_type, claimed = await _get_manifest(target, tag, accept_header)
        parsed = Digest.parse_or_none(claimed)
        digest = Digest.of(body, parsed.algorithm if parsed else "sha256")
        if claimed and parsed != digest:
            raise UpstreamInvalid("upstream manifest does not match its Docker-Content-Digest", {"claimed": claimed, "actual": str(digest)})
        manifest = await self._keep_manifest(target, digest, body, content_type)
        if remember:
            await self.index.put_tag(target.upstream.name, target.repository, tag, manifest.digest, manifest.media_type)
        return manifest

    async def _by_digest(self, target: Target, digest: Digest) -> Manifest:
        entry = await self.index.get_manifest(str(digest))
        if entry is not None:
            body = await self.store.load(digest)
            if body is not None:
                await self._confirm(target, digest, "manifests")
                self.index.touch("manifests", str(digest))
                return Manifest(body, entry.media_type, str(digest), "hit")
        key = ("digest", target.upstream.name, target.repository, str(digest))
        return await self._manifests.run(key, lambda: self._fetch_digest(target, digest))

    async def _fetch_digest(self, target: Target, digest: Digest) -> Manifest:
        body, content_type, _ = await _get_manifest(target, str(digest), FULL_ACCEPT)
        if Digest.of(body, digest.algorithm) != digest:
            raise UpstreamInvalid("upstream manifest does not match the requested digest", {"digest": str(digest)})
        return await self._keep_manifest(target, digest, body, content_type)

    async def _keep_manifest(self, target: Target, digest: Digest, body: bytes, content_type: str | None) -> Manifest:
        """Store a verified manifest by digest, index its media type and link it to the repository it came from."""
        try:
            media_type = media_type_of(content_type, body)
        except ValueError:
            raise UpstreamInvalid("upstream sent a manifest that is not a JSON object", {"digest": str(digest)}) from None
        manifest = Manifest(body, media_type, str(digest), "miss")
        try:
            await self.store.save(digest, body)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            log.error("disk full: serving manifest %s without caching it: %s", digest, exc)
            return manifest
        await self.index.put_manifest(str(digest), media_type, len(body))
        await self._link(target, str(digest))
        return manifest

    # blobs

    async def blob(self, target: Target, digest: Digest, *, body: bool = True) -> BlobSource:
        """The blob ready to send: the cached copy (pinned, and open when it is a file), or the (joined)
        download fetching it now. Without `body` (HEAD) an uncached blob is sized by the upstream's
        HEAD instead of fetched. A copy evicted between finding and opening it is fetched again."""
        found = await self.store.locate(digest)
        if found is not None:
            await self._confirm(target, digest, "blobs")
            self.index.touch("blobs", str(digest))
            source = await self._cached(target, digest, found, refetch=True)
            if source is not None:
                return source
        if not body:
            return await self._described(target, digest)
        return await self._fetch_blob(target, digest, refetch=True)

    async def _cached(
        self, target: Target, digest: Digest, found: Path | RemoteBlob, *, refetch: bool
    ) -> BlobSource | None:
        """A stored blob as a source, pinned; None if its file is gone already. `refetch`: an object
        found gone later is fetched again, once (never from the source that refetch returned)."""
        pin = self.store.pin(digest)
        if not isinstance(found, Path):
            again = (lambda: self._fetch_blob(target, digest, refetch=False)) if refetch else None
            return BucketObject(digest, found, pin, again)
        try:
            return await LocalFile.open(digest, found, pin)
        except FileNotFoundError:
            return None

    async def _fetch_blob(self, target: Target, digest: Digest, *, refetch: bool) -> BlobSource:
        """Join (or start) the download of a blob; also for a cached copy that vanished (evicted) just now.
        With peers (replicas sharing a bucket), the blob may come from another replica's download instead.
        What came through another repository is confirmed for this one before it is served."""
        if self.peers is None or self.downloads.active(digest) is not None:
            found: Path | RemoteBlob | Download = await self._join(target, digest)
        else:
            found = await self._peer_fetches.run(str(digest), lambda: self._fetch_among_peers(target, digest))
        if not isinstance(found, Download) or found.source != _source(target):
            await self._confirm(target, digest, "blobs")
        if isinstance(found, Download):
            return Follower(found)
        source = await self._cached(target, digest, found, refetch=refetch)
        if source is None:  # landed by another replica and gone again at once: the client's retry finds it
            raise StorageUnavailable("blob moved in the cache while being served; try again", {"digest": str(digest)})
        return source

    async def _join(self, target: Target, digest: Digest) -> Download:
        return await self.downloads.join(digest, lambda: self._open_blob(target, digest), _source(target))

    async def _fetch_among_peers(self, target: Target, digest: Digest) -> Download | Path | RemoteBlob:
        """Download under the cluster's lock for this digest, or take what another replica landed."""
        assert self.peers is not None
        claim = await self.peers.claim(digest, self.store)
        if claim is not None and not isinstance(claim, Lease):
            self.index.touch("blobs", str(digest))
            return claim
        try:
            download = await self._join(target, digest)
        except BaseException:
            if claim is not None:
                await claim.release()
            raise
        if claim is not None:
            claim.hold_until(download)
        return download

    async def _open_blob(self, target: Target, digest: Digest) -> aiohttp.ClientResponse:
        resp = await target.upstream.open(
            "GET", target.repository, f"/v2/{target.repository}/blobs/{digest}", stream=True
        )
        if resp.status != 200:
            resp.release()
            raise _upstream_failure(resp, BlobUnknown, "blob")
        await self._link(target, str(digest))
        return resp

    async def _described(self, target: Target, digest: Digest) -> BlobSource:
        """For HEAD, an uncached blob without fetching it: the size of its download in progress, else
        what a HEAD upstream says."""
        active = self.downloads.active(digest)
        if active is not None and active.size is not None:
            if active.source != _source(target):
                await self._confirm(target, digest, "blobs")
            return Follower(active)
        resp = await target.upstream.open("HEAD", target.repository, f"/v2/{target.repository}/blobs/{digest}")
        async with resp:
            if resp.status != 200:
                raise _upstream_failure(resp, BlobUnknown, "blob")
            if resp.content_length is None:
                raise UpstreamInvalid("upstream gave no blob size", {"digest": str(digest)})
        await self._link(target, str(digest))
        return Described(digest, resp.content_length)

    # links: content is stored once, but a repository only gets what its upstream has shown it holds

    async def _confirm(self, target: Target, digest: Digest, kind: str) -> None:
        """Before cached content goes to a repository it never came through, one HEAD upstream must find it there."""
        key = (target.upstream.name, target.repository, str(digest))
        if await self.index.has_link(*key):
            return
        await self._links.run(key, lambda: self._head(target, digest, kind))

    async def _head(self, target: Target, digest: Digest, kind: str) -> None:
        headers = {"Accept": FULL_ACCEPT} if kind == "manifests" else None
        resp = await target.upstream.open("HEAD", target.repository, f"/v2/{target.repository}/{kind}/{digest}", headers)
        async with resp:
            if resp.status != 200:
                unknown = ManifestUnknown if kind == "manifests" else BlobUnknown
                raise _upstream_failure(resp, unknown, kind[:-1])
        log.info("linked cached %s %s to %s/%s", kind[:-1], digest, target.upstream.name, target.repository)
        await self._link(target, str(digest))

    async def _link(self, target: Target, digest: str) -> None:
        await self.index.put_link(target.upstream.name, target.repository, digest)

    # tags

    async def tags(self, target: Target, n: str | None, last: str | None) -> TagList:
        """The upstream's tag list, passed through (tags change too often to be worth caching)."""
        params = {k: v for k, v in (("n", n), ("last", last)) if v is not None}
        resp = await target.upstream.open(
            "GET", target.repository, f"/v2/{target.repository}/tags/list", params=params
        )
        async with resp:
            if resp.status != 200:
                raise _upstream_failure(resp, NameUnknown, "repository")
            body = await _read_limited(resp, MAX_TAG_LIST, "tag list")
            link = resp.headers.get("Link")
        if not _is_json_object(body):
            raise UpstreamInvalid("upstream sent a tag list that is not a JSON object", {"upstream": str(resp.url.host)})
        return TagList(body, link)
