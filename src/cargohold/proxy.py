"""The pull-through facade the handlers use: manifests and tags (`cargohold.pull`), links, and blobs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import aiohttp

from cargohold.blobsource import BlobSource, BucketObject, Described, Follower, LocalFile
from cargohold.cache.download import Download, Downloads
from cargohold.cache.index import Index
from cargohold.cache.peers import Lease, Peers
from cargohold.cache.store import BlobStore, RemoteBlob
from cargohold.errors import StorageUnavailable
from cargohold.flight import SingleFlight
from cargohold.oci.digests import Digest, looks_like_digest
from cargohold.oci.names import check_tag
from cargohold.pull.links import Kind, Links
from cargohold.pull.manifests import Head, Manifest, Manifests
from cargohold.pull.referrers import Referrers, ReferrersAnswer
from cargohold.pull.tags import Tags
from cargohold.tasks import Tasks
from cargohold.upstream.offline import OfflineRepository
from cargohold.upstream.repository import Repository, TagList
from cargohold.upstream.routing import Router, Target


def _source(target: Target) -> tuple[str, str]:
    return target.upstream.name, target.repository


def remote_of(target: Target, *, waited: bool = True) -> Repository | OfflineRepository:
    """The typed remote for the request's upstream repository (one that never asks, when it is offline);
    `waited`: False for a prefetch (`warm`)."""
    if target.upstream.config.offline:
        return OfflineRepository(target.upstream.name, target.repository)
    return Repository(target.upstream, target.repository, waited)


class PullThrough:
    """Serves manifests, blobs and tag lists from cache, going upstream only when the rules say so."""

    def __init__(
        self,
        router: Router,
        store: BlobStore,
        index: Index,
        downloads: Downloads,
        tasks: Tasks,
        peers: Peers | None = None,
    ) -> None:
        self.router = router
        self.store = store
        self.index = index
        self.downloads = downloads
        self.peers = peers
        self.tasks = tasks
        self._peer_fetches: SingleFlight[Download | Path | RemoteBlob] = SingleFlight(tasks, "peer fetch")
        self.links = Links(index, tasks)
        self.manifests = Manifests(store, index, self.links, tasks)
        self.tags = Tags(index, self.manifests, self.links, tasks, {u.name: u.config for u in router.upstreams})
        self.referrers = Referrers(self.tags, tasks)

    @property
    def joins(self) -> int:
        """Requests that joined a manifest or tag fetch already running (single-flight)."""
        return self.manifests.joins + self.tags.joins + self.referrers.joins

    # manifests

    async def manifest(
        self, target: Target, reference: str, accept: frozenset[str], *, waited: bool = True
    ) -> Manifest:
        """`waited`: False for a prefetch, whose pulls are deferred when the upstream's quota is at its reserve."""
        remote = remote_of(target, waited=waited)
        if looks_like_digest(reference):
            return await self.manifests.get(remote, Digest.parse(reference))
        return await self.tags.get(remote, check_tag(reference), accept)

    async def manifest_head(self, target: Target, reference: str, accept: frozenset[str]) -> Head:
        """For HEAD: a manifest not cached is asked upstream with a HEAD, which Docker Hub's pull limit does not count."""
        remote = remote_of(target)
        if looks_like_digest(reference):
            return await self.manifests.head(remote, Digest.parse(reference))
        return await self.tags.head(remote, check_tag(reference), accept)

    async def referrers_of(
        self, target: Target, digest: Digest, artifact_type: str | None, page: Mapping[str, str]
    ) -> ReferrersAnswer:
        """The OCI 1.1 referrers of a manifest: upstream's API, else its referrers tag schema."""
        return await self.referrers.get(remote_of(target), digest, artifact_type, page)

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
            self.tasks.spawn(claim.hold_until(download), f"lease {claim.key}")
        return download

    async def _open_blob(self, target: Target, digest: Digest) -> aiohttp.ClientResponse:
        resp = await remote_of(target).open_blob(digest)
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
        described = await remote_of(target).head_blob(digest)
        await self._link(target, str(digest))
        return Described(digest, described.size)

    # links: content is stored once, but a repository only gets what its upstream has shown it holds

    async def _confirm(self, target: Target, digest: Digest, kind: Kind) -> None:
        """The blob path's way to `Links.confirm`: one HEAD upstream before cached content reaches a new repository."""
        await self.links.confirm(remote_of(target), digest, kind)

    async def _link(self, target: Target, digest: str) -> None:
        """The blob path's way to `Links.add`: the upstream repository named or served this digest."""
        await self.links.add(remote_of(target), digest)

    # tags

    async def tag_list(self, target: Target, n: str | None, last: str | None) -> TagList:
        """The upstream's tag list, passed through (tags change too often to be worth caching)."""
        return await remote_of(target).list_tags(n, last)
