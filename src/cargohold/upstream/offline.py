"""The remote of an offline upstream (`offline: true`): it never sends a request.

The pull-through rules stay as they are: what is cached is served (tags whatever their age, as the tag
TTL is infinite), and anything that would need the upstream is "not found", saying the mirror is offline.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NoReturn

import aiohttp

from cargohold.errors import BlobUnknown, ManifestUnknown, NameUnknown, RegistryError
from cargohold.oci.digests import Digest
from cargohold.upstream.repository import Descriptor, Referrers, TagList

OFFLINE = "the mirror is offline: only cached content is served"


class Offline:
    """Marks the errors of an offline remote: nothing upstream said, so nothing cached is dropped for them."""


class OfflineManifest(ManifestUnknown, Offline):
    pass


class OfflineBlob(BlobUnknown, Offline):
    pass


class OfflineName(NameUnknown, Offline):
    pass


@dataclass(frozen=True, slots=True)
class OfflineRepository:
    """A `Remote` for `repository` at an offline upstream named `upstream`."""

    upstream: str
    repository: str

    @property
    def tag_ttl(self) -> float:
        return math.inf

    @property
    def content_mirrored(self) -> bool:
        return False

    def deferrable(self) -> OfflineRepository:
        return self

    def _refuse(self, error: type[RegistryError], what: str) -> NoReturn:
        raise error(f"{what} not in the cache", {"reason": OFFLINE, "upstream": self.upstream})

    async def head_manifest(self, reference: str, accept: str) -> Descriptor | None:
        self._refuse(OfflineManifest, "manifest")

    async def get_manifest(self, reference: str, accept: str) -> tuple[Descriptor, bytes]:
        self._refuse(OfflineManifest, "manifest")

    async def head_blob(self, digest: Digest) -> Descriptor:
        self._refuse(OfflineBlob, "blob")

    async def open_blob(self, digest: Digest) -> aiohttp.ClientResponse:
        self._refuse(OfflineBlob, "blob")

    async def list_tags(self, n: str | None, last: str | None) -> TagList:
        self._refuse(OfflineName, "tag list")

    async def referrers(self, digest: Digest, artifact_type: str | None, page: Mapping[str, str]) -> Referrers | None:
        self._refuse(OfflineManifest, "referrers")
