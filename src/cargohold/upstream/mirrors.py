"""Content mirrors of an upstream (`content_mirrors`, e.g. mirror.gcr.io for Docker Hub): registries that serve the
same repositories' content by digest. Content by digest proves itself, so a mirror needs no trust: manifests are
verified in memory, blobs by the download that caches them. Each is reached anonymously (never with the upstream's
credentials), with the upstream's timeouts and proxy and a pause of its own when it fails.

A blob is verified only once its download ends, after the mirror's answer was handed over. So a mirror that handed
out a digest which is asked for again soon after (the download did not land: wrong bytes, cut short) is skipped for
that digest for a while, and the upstream serves the next attempt.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from cargohold.config import UpstreamConfig
from cargohold.oci.digests import Digest
from cargohold.pull.recent import Recent

if TYPE_CHECKING:
    from cargohold.upstream.client import UpstreamClient

# How long a mirror is not asked again for a blob it handed out that did not land.
SKIP_AFTER_HANDOUT = 3600.0


def mirror_config(upstream: UpstreamConfig, url: str) -> UpstreamConfig:
    """The configuration of an anonymous client of a content mirror: the upstream's timeouts and proxy only."""
    return UpstreamConfig(
        name=urlsplit(url).netloc.lower(),
        url=url,
        timeout=upstream.timeout,
        failure_pause=upstream.failure_pause,
        proxy=upstream.proxy,
    )


class ContentMirrors:
    """The mirrors of one upstream, in the configured order, and the blobs each handed out lately."""

    def __init__(self, clients: Sequence[UpstreamClient] = ()) -> None:
        self.clients = tuple(clients)
        self._handed_out: Recent[tuple[str, str], float] = Recent()

    def for_blob(self, digest: Digest) -> list[UpstreamClient]:
        """The mirrors to try for a blob: not those that handed it out within SKIP_AFTER_HANDOUT."""
        now = time.monotonic()
        return [m for m in self.clients if not self._handed_out_since(m, digest, now - SKIP_AFTER_HANDOUT)]

    def _handed_out_since(self, mirror: UpstreamClient, digest: Digest, since: float) -> bool:
        at = self._handed_out.get((mirror.name, str(digest)))
        return at is not None and at > since

    def handed_out(self, mirror: UpstreamClient, digest: Digest) -> None:
        self._handed_out.put((mirror.name, str(digest)), time.monotonic())

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
