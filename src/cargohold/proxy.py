"""The pull-through facade the handlers use: routes a request's target to the services of `cargohold.pull`
(manifests, tags, referrers, blobs, links), each given the typed remote of the target's upstream repository."""

from __future__ import annotations

from collections.abc import Mapping

from cargohold.blobsource import BlobSource
from cargohold.cache.download import Downloads
from cargohold.cache.index import Index
from cargohold.cache.peers import Peers
from cargohold.cache.store import BlobStore
from cargohold.oci.digests import Digest, looks_like_digest
from cargohold.oci.names import check_tag
from cargohold.pull.blobs import Blobs
from cargohold.pull.links import Links
from cargohold.pull.manifests import Head, Manifest, Manifests
from cargohold.pull.referrers import Referrers, ReferrersAnswer
from cargohold.pull.tags import Tags
from cargohold.tasks import Tasks
from cargohold.upstream.offline import OfflineRepository
from cargohold.upstream.repository import Repository, TagList
from cargohold.upstream.routing import Router, Target


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
        self.links = Links(index, tasks)
        self.blobs = Blobs(store, index, downloads, self.links, tasks, peers)
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
        """The blob ready to send (see `Blobs.get`)."""
        return await self.blobs.get(remote_of(target), digest, body=body)

    # tags

    async def tag_list(self, target: Target, n: str | None, last: str | None) -> TagList:
        """The upstream's tag list, passed through (tags change too often to be worth caching)."""
        return await remote_of(target).list_tags(n, last)
