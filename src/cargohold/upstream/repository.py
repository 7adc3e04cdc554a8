"""One repository of one upstream, typed: what the pull-through rules ask a remote registry.

It owns the URLs, the mapping of upstream statuses to domain errors and the size limits of what is
read into memory; everything it returns about content is a `Descriptor`. The rules themselves (what is
cached, when to ask) live in `cargohold.pull`, which talks to any `Remote` (a spy in unit tests).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from cargohold.digests import Digest, looks_like_digest
from cargohold.errors import (
    BlobUnknown,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    UpstreamInvalid,
    UpstreamUnavailable,
)
from cargohold.mediatypes import media_type_of
from cargohold.upstream.bodies import read_bounded
from cargohold.upstream.client import UpstreamClient

MAX_MANIFEST = 4 << 20
MAX_TAG_LIST = 16 << 20


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A manifest's or blob's digest, media type and size (the OCI descriptor's three essential fields).

    From an upstream HEAD of a manifest, `media_type` is as sent (possibly not a manifest type) and `size`
    is 0 when upstream gave none: the caller decides whether that is enough to answer with.
    """

    digest: Digest
    media_type: str
    size: int


@dataclass(frozen=True, slots=True)
class TagList:
    """An upstream's tag list as sent, and its pagination Link (naming the upstream's repository)."""

    body: bytes
    link: str | None


class Remote(Protocol):
    """What the pull-through rules need from an upstream repository (implemented by `Repository`)."""

    @property
    def upstream(self) -> str: ...
    @property
    def repository(self) -> str: ...
    @property
    def tag_ttl(self) -> float: ...
    async def head_manifest(self, reference: str, accept: str) -> Descriptor | None: ...
    async def get_manifest(self, reference: str, accept: str) -> tuple[Descriptor, bytes]: ...
    async def head_blob(self, digest: Digest) -> Descriptor: ...
    async def open_blob(self, digest: Digest) -> aiohttp.ClientResponse: ...
    async def list_tags(self, n: str | None, last: str | None) -> TagList: ...


def upstream_failure(resp: aiohttp.ClientResponse, unknown: type[RegistryError], what: str) -> RegistryError:
    """The error for a non-success upstream answer; only 404/401/403 mean "it does not exist"."""
    detail = {"status": resp.status}  # not resp.url's host: an internal name, or a CDN's after a redirect
    if resp.status in (401, 403, 404):
        return unknown(f"{what} not found upstream", detail)
    if resp.status == 429:
        retry = resp.headers.get("Retry-After")
        return UpstreamUnavailable(f"upstream is rate limiting us while fetching {what}", detail, {"Retry-After": retry} if retry else None)
    if resp.status >= 500:
        return UpstreamUnavailable(f"upstream failed while fetching {what}", detail)
    return UpstreamInvalid(f"unexpected upstream answer while fetching {what}", detail)


def _verified(reference: str, claimed: str | None, body: bytes) -> Digest:
    """The manifest's digest, computed: it must be the one asked for, and the one upstream claims."""
    if looks_like_digest(reference):
        wanted = Digest.parse(reference)
        if Digest.of(body, wanted.algorithm) != wanted:
            raise UpstreamInvalid("upstream manifest does not match the requested digest", {"digest": reference})
        return wanted
    parsed = Digest.parse_or_none(claimed)
    digest = Digest.of(body, parsed.algorithm if parsed else "sha256")
    if claimed and parsed != digest:
        raise UpstreamInvalid("upstream manifest does not match its Docker-Content-Digest", {"claimed": claimed, "actual": str(digest)})
    return digest


def _is_json_object(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body), dict)
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Repository:
    """`repository` at upstream `client`; cheap to make, one per request."""

    client: UpstreamClient
    repository: str

    @property
    def upstream(self) -> str:
        return self.client.name

    @property
    def tag_ttl(self) -> float:
        return self.client.config.tag_ttl

    def _path(self, kind: str, reference: str) -> str:
        return f"/v2/{self.repository}/{kind}/{reference}"

    async def head_manifest(self, reference: str, accept: str) -> Descriptor | None:
        """What upstream's HEAD names for the reference (free under Docker Hub's pull limit); None when it
        names no digest we can check: none for a tag, or another digest than the one asked for."""
        resp = await self.client.open("HEAD", self.repository, self._path("manifests", reference), {"Accept": accept})
        async with resp:
            if resp.status != 200:
                raise upstream_failure(resp, ManifestUnknown, "manifest")
            claimed = resp.headers.get("Docker-Content-Digest")
            media_type = resp.headers.get("Content-Type", "").split(";", 1)[0].strip()
            size = resp.content_length or 0
        digest = Digest.parse_or_none(claimed)
        if looks_like_digest(reference):
            wanted = Digest.parse(reference)
            return None if claimed and digest != wanted else Descriptor(wanted, media_type, size)
        return None if digest is None else Descriptor(digest, media_type, size)

    async def get_manifest(self, reference: str, accept: str) -> tuple[Descriptor, bytes]:
        """The manifest, read up to MAX_MANIFEST bytes and verified: its digest (the one asked for, and the
        one upstream claims) and its media type (the Content-Type if it names one, else the document's)."""
        resp = await self.client.open("GET", self.repository, self._path("manifests", reference), {"Accept": accept})
        async with resp:
            if resp.status != 200:
                raise upstream_failure(resp, ManifestUnknown, "manifest")
            body = await read_bounded(resp, MAX_MANIFEST, "upstream manifest", {})
            content_type, claimed = resp.headers.get("Content-Type"), resp.headers.get("Docker-Content-Digest")
        digest = _verified(reference, claimed, body)
        try:
            media_type = media_type_of(content_type, body)
        except ValueError:
            raise UpstreamInvalid("upstream sent something that is not a manifest", {"digest": str(digest)}) from None
        return Descriptor(digest, media_type, len(body)), body

    async def head_blob(self, digest: Digest) -> Descriptor:
        """The blob's size from upstream's HEAD, without downloading it."""
        resp = await self.client.open("HEAD", self.repository, self._path("blobs", str(digest)))
        async with resp:
            if resp.status != 200:
                raise upstream_failure(resp, BlobUnknown, "blob")
            if resp.content_length is None:
                raise UpstreamInvalid("upstream gave no blob size", {"digest": str(digest)})
            media_type = resp.headers.get("Content-Type", "application/octet-stream")
            return Descriptor(digest, media_type, resp.content_length)

    async def open_blob(self, digest: Digest) -> aiohttp.ClientResponse:
        """The blob's response with its body still to stream (the caller releases it); a download's opener."""
        resp = await self.client.open("GET", self.repository, self._path("blobs", str(digest)), stream=True)
        if resp.status != 200:
            resp.release()
            raise upstream_failure(resp, BlobUnknown, "blob")
        return resp

    async def list_tags(self, n: str | None, last: str | None) -> TagList:
        """The upstream's tag list, passed through (tags change too often to be worth caching)."""
        params = {k: v for k, v in (("n", n), ("last", last)) if v is not None}
        resp = await self.client.open("GET", self.repository, f"/v2/{self.repository}/tags/list", params=params)
        async with resp:
            if resp.status != 200:
                raise upstream_failure(resp, NameUnknown, "repository")
            body = await read_bounded(resp, MAX_TAG_LIST, "upstream tag list", {})
            link = resp.headers.get("Link")
        if not _is_json_object(body):
            raise UpstreamInvalid("upstream sent a tag list that is not a JSON object", {"upstream": self.client.name})
        return TagList(body, link)
