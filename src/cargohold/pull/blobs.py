"""Blobs: the cached copy, else one download per digest (per cluster with peers), each wrapping the local store
and the typed remote; what leaves is a `BlobSource` that sends itself (`cargohold.blobsource`)."""

from __future__ import annotations

from collections.abc import Awaitable
from pathlib import Path

import aiohttp

from cargohold.blobsource import BlobSource, BucketObject, Described, Follower, LocalFile, PeerFollower, failure_of
from cargohold.cache.download import Download, Downloads
from cargohold.cache.index import Index
from cargohold.cache.peerfile import Publication
from cargohold.cache.peers import Lease, Peers
from cargohold.cache.store import BlobStore, RemoteBlob
from cargohold.errors import StorageUnavailable
from cargohold.flight import SingleFlight
from cargohold.oci.digests import Digest
from cargohold.pull.links import Links
from cargohold.tasks import Tasks
from cargohold.upstream.repository import Remote


class Blobs:
    """The blob rules: local first (pinned, confirmed for the asking repository), else join the download."""

    def __init__(
        self,
        store: BlobStore,
        index: Index,
        downloads: Downloads,
        links: Links,
        tasks: Tasks,
        peers: Peers | None = None,
    ) -> None:
        self._store = store
        self._index = index
        self._downloads = downloads
        self._links = links
        self._tasks = tasks
        self._peers = peers
        self._peer_fetches: SingleFlight[Download | Path | RemoteBlob | Publication] = SingleFlight(tasks, "peer fetch")

    async def get(self, remote: Remote, digest: Digest, *, body: bool = True) -> BlobSource:
        """The blob ready to send: the cached copy (pinned, and open when it is a file), or the (joined)
        download fetching it now. Without `body` (HEAD) an uncached blob is sized by the upstream's
        HEAD instead of fetched. A copy evicted between finding and opening it is fetched again."""
        found = await self._store.locate(digest)
        if found is not None:
            await self._links.confirm(remote, digest, "blobs")
            self._index.touch("blobs", str(digest))
            source = await self._cached(remote, digest, found, refetch=True)
            if source is not None:
                return source
        if not body:
            return await self._described(remote, digest)
        return await self._fetch_blob(remote, digest, refetch=True)

    async def _cached(
        self, remote: Remote, digest: Digest, found: Path | RemoteBlob, *, refetch: bool
    ) -> BlobSource | None:
        """A stored blob as a source, pinned; None if its file is gone already. `refetch`: an object
        found gone later is fetched again, once (never from the source that refetch returned)."""
        pin = self._store.pin(digest)
        if not isinstance(found, Path):
            again = (lambda: self._fetch_blob(remote, digest, refetch=False)) if refetch else None
            return BucketObject(digest, found, pin, again)
        try:
            return await LocalFile.open(digest, found, pin)
        except FileNotFoundError:
            return None

    async def _fetch_blob(self, remote: Remote, digest: Digest, *, refetch: bool, follow: bool = True) -> BlobSource:
        """Join (or start) the download of a blob; also for a cached copy that vanished (evicted) just now.
        With peers (replicas sharing a bucket), the blob may come from another replica's download instead,
        and (`follow`, workers of one machine) be sent as that download writes it.
        What came through another repository is confirmed for this one before it is served."""
        if self._peers is None or self._downloads.active(digest) is not None:
            found: Path | RemoteBlob | Download | Publication = await self._join(remote, digest)
        else:
            found = await self._peer_fetches.run(
                (str(digest), follow), lambda: self._fetch_among_peers(remote, digest, follow=follow)
            )
        if isinstance(found, Publication):
            return await self._follow_peer(remote, digest, found, refetch=refetch)
        if isinstance(found, Download):
            follower = Follower.of(found)  # at once, before any await: see `Follower.of`
            if follower is not None:
                return await self._confirmed(remote, follower, found.source)
            if found.error is not None and not found.verified:  # it failed before it could be followed
                raise failure_of(found)
            landed = await self._store.locate(digest)  # it landed before it could be followed
            if landed is None:
                if refetch:
                    return await self._fetch_blob(remote, digest, refetch=False)
                raise StorageUnavailable("blob download ended while joining it; try again", {"digest": str(digest)})
            found = landed
        await self._links.confirm(remote, digest, "blobs")
        source = await self._cached(remote, digest, found, refetch=refetch)
        if source is None:  # landed by another replica and gone again at once: the client's retry finds it
            raise StorageUnavailable("blob moved in the cache while being served; try again", {"digest": str(digest)})
        return source

    async def _follow_peer(
        self, remote: Remote, digest: Digest, published: Publication, *, refetch: bool
    ) -> BlobSource:
        """Another worker's download, followed through its temp file, opened at once; when that file is
        gone already (landed, or failed), or the download fails before a byte went out, the blob is
        waited for (or downloaded) as without following."""
        assert self._peers is not None
        file = published.open()

        def again() -> Awaitable[BlobSource]:
            return self._fetch_blob(remote, digest, refetch=refetch, follow=False)

        if file is None:
            return await again()
        follower = PeerFollower(digest, file, self._store.pin(digest), self._peers.wait, again)
        return await self._confirmed(remote, follower, published.source)

    async def _confirmed(self, remote: Remote, follower: BlobSource, source: object) -> BlobSource:
        """The follower, once the blob is confirmed for the asking repository when it is fetched through
        another one; closed (its hold on the download let go) if that fails."""
        if source != (remote.upstream, remote.repository):
            try:
                await self._links.confirm(remote, follower.digest, "blobs")
            except BaseException:
                await follower.close()
                raise
        return follower

    async def _join(self, remote: Remote, digest: Digest) -> Download:
        return await self._downloads.join(
            digest, lambda: self._open_blob(remote, digest), (remote.upstream, remote.repository)
        )

    async def _fetch_among_peers(
        self, remote: Remote, digest: Digest, *, follow: bool
    ) -> Download | Path | RemoteBlob | Publication:
        """Download under the cluster's lock for this digest, or take what another replica landed (or,
        with `follow`, the download another worker of this machine is writing)."""
        assert self._peers is not None
        claim = await self._peers.claim(digest, self._store, follow=follow)
        if isinstance(claim, Publication):
            return claim
        if claim is not None and not isinstance(claim, Lease):
            self._index.touch("blobs", str(digest))
            return claim
        try:
            download = await self._join(remote, digest)
        except BaseException:
            if claim is not None:
                await claim.release()
            raise
        if claim is not None:
            self._tasks.spawn(claim.hold_until(download), f"lease {claim.key}")
        return download

    async def _open_blob(self, remote: Remote, digest: Digest) -> aiohttp.ClientResponse:
        resp = await remote.open_blob(digest)
        await self._links.add(remote, str(digest))
        return resp

    async def _described(self, remote: Remote, digest: Digest) -> BlobSource:
        """For HEAD, an uncached blob without fetching it: the size of its download in progress (here or
        in another worker), else what a HEAD upstream says."""
        active: Download | Publication | None = self._downloads.active(digest)
        if active is None and self._peers is not None:
            active = await self._peers.published(digest, self._store)
        if active is not None and active.size is not None:
            if active.source != (remote.upstream, remote.repository):
                await self._links.confirm(remote, digest, "blobs")
            return Described(digest, active.size)
        described = await remote.head_blob(digest)
        await self._links.add(remote, str(digest))
        return Described(digest, described.size)
