"""Links: content is stored once by digest, but a repository only gets what its upstream has shown it holds."""

from __future__ import annotations

import logging
from typing import Literal

from cargohold.cache.index import Index
from cargohold.flight import SingleFlight
from cargohold.oci.digests import Digest
from cargohold.oci.mediatypes import FULL_ACCEPT
from cargohold.pull.recent import Fresh
from cargohold.tasks import Tasks
from cargohold.upstream.repository import Remote

log = logging.getLogger("cargohold.proxy")

Kind = Literal["manifests", "blobs"]


class Links:
    """Which (upstream, repository) has shown it holds a digest, and the one HEAD that confirms a new one."""

    def __init__(self, index: Index, tasks: Tasks) -> None:
        self._index = index
        self._heads: SingleFlight[None] = SingleFlight(tasks, "link check")
        self._known: Fresh[tuple[str, str, str], bool] = Fresh()  # links of hot content, read within a second

    async def add(self, remote: Remote, digest: str) -> None:
        """Record that the remote named or served this digest: it may be served to that repository."""
        await self._index.put_link(remote.upstream, remote.repository, digest)

    async def confirm(self, remote: Remote, digest: Digest, kind: Kind) -> None:
        """Before cached content goes to a repository it never came through, one HEAD upstream must find it there."""
        key = (remote.upstream, remote.repository, str(digest))
        if await self._known.read(key, lambda: self._index.has_link(*key)):
            return
        await self._heads.run(key, lambda: self._head(remote, digest, kind))

    async def _head(self, remote: Remote, digest: Digest, kind: Kind) -> None:
        if kind == "manifests":
            await remote.head_manifest(str(digest), FULL_ACCEPT)
        else:
            await remote.head_blob(digest)
        log.info("linked cached %s %s to %s/%s", kind[:-1], digest, remote.upstream, remote.repository)
        await self.add(remote, str(digest))
