"""One repository of one upstream, typed: what the pull-through rules ask a remote registry.

It owns the URLs, the mapping of upstream statuses to domain errors and the size limits of what is
read into memory; everything it returns about content is a `Descriptor`. Content by digest (manifests and
blobs) is asked at the upstream's content mirrors first (mirrors.py), tags always at the upstream itself. The rules themselves (what is
cached, when to ask) live in `cargohold.pull`, which talks to any `Remote` (a spy in unit tests).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Protocol

import aiohttp

from cargohold.errors import (
    BlobUnknown,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    UpstreamInvalid,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from cargohold.oci.digests import Digest, looks_like_digest
from cargohold.oci.mediatypes import OCI_INDEX, media_type_of
from cargohold.upstream.bodies import read_bounded
from cargohold.upstream.client import Pull, UpstreamClient

log = logging.getLogger("cargohold.upstream")

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


@dataclass(frozen=True, slots=True)
class Referrers:
    """An upstream's answer to the referrers API: the OCI index as sent, whether upstream applied the
    `artifactType` filter (`OCI-Filters-Applied`), and its next-page Link (naming the upstream's repository)."""

    body: bytes
    filtered: bool
    link: str | None


class Remote(Protocol):
    """What the pull-through rules need from an upstream repository (implemented by `Repository`)."""

    @property
    def upstream(self) -> str: ...
    @property
    def repository(self) -> str: ...
    @property
    def tag_ttl(self) -> float: ...
    @property
    def content_mirrored(self) -> bool: ...
    def deferrable(self) -> Remote: ...
    async def head_manifest(self, reference: str, accept: str) -> Descriptor | None: ...
    async def get_manifest(self, reference: str, accept: str) -> tuple[Descriptor, bytes]: ...
    async def head_blob(self, digest: Digest) -> Descriptor: ...
    async def open_blob(self, digest: Digest) -> aiohttp.ClientResponse: ...
    async def list_tags(self, n: str | None, last: str | None) -> TagList: ...
    async def referrers(
        self, digest: Digest, artifact_type: str | None, page: Mapping[str, str]
    ) -> Referrers | None: ...


def upstream_failure(resp: aiohttp.ClientResponse, unknown: type[RegistryError], what: str) -> RegistryError:
    """The error for a non-success upstream answer; only 404/401/403 mean "it does not exist"."""
    detail = {"status": resp.status}  # not resp.url's host: an internal name, or a CDN's after a redirect
    if resp.status in (401, 403, 404):
        return unknown(f"{what} not found upstream", detail)
    if resp.status == 429:
        retry = resp.headers.get("Retry-After")
        return UpstreamRateLimited(
            f"upstream is rate limiting us while fetching {what}", detail, {"Retry-After": retry} if retry else None
        )
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
        raise UpstreamInvalid(
            "upstream manifest does not match its Docker-Content-Digest", {"claimed": claimed, "actual": str(digest)}
        )
    return digest


def _outcome(exc: RegistryError) -> str:
    """How a content mirror failed, for the metrics: it lacks the content, sent wrong content, or failed."""
    if isinstance(exc, ManifestUnknown | BlobUnknown):
        return "missing"
    return "invalid" if isinstance(exc, UpstreamInvalid) else "failed"


def _is_json_object(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body), dict)
    except (ValueError, RecursionError):  # deep nesting too: the body is the upstream's
        return False


async def _fetch_manifest(
    client: UpstreamClient, repository: str, reference: str, accept: str, pull: Pull | None
) -> tuple[Descriptor, bytes]:
    """GET a manifest at `client`, read up to MAX_MANIFEST bytes and verified: its digest (the one asked for, and the
    one the registry claims) and its media type (the Content-Type if it names one, else the document's)."""
    path = f"/v2/{repository}/manifests/{reference}"
    resp = await client.open("GET", repository, path, {"Accept": accept}, pull=pull)
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


@dataclass(frozen=True, slots=True)
class Repository:
    """`repository` at upstream `client`; cheap to make, one per request. `waited`: a client waits for what it
    fetches (else its pulls are deferred when the quota is at its reserve: a prefetch)."""

    client: UpstreamClient
    repository: str
    waited: bool = True

    @property
    def upstream(self) -> str:
        return self.client.name

    @property
    def tag_ttl(self) -> float:
        return self.client.config.tag_ttl

    @property
    def content_mirrored(self) -> bool:
        """Whether content by digest is asked elsewhere first (then a new tag is worth a free HEAD before a GET)."""
        return bool(self.client.mirrors.clients)

    def deferrable(self) -> Repository:
        """This repository for fetches no client waits for."""
        return replace(self, waited=False)

    def _path(self, kind: str, reference: str) -> str:
        return f"/v2/{self.repository}/{kind}/{reference}"

    def _counted(self, source: UpstreamClient, kind: str, outcome: str, size: int = 0) -> None:
        if self.client.observer is not None:
            self.client.observer.content_fetched(self.client.name, source.name, kind, outcome, size)

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
        """The manifest, verified (see _fetch_manifest). By digest the content mirrors are asked first; what they
        lack or get wrong the upstream answers, with a pull its quota counts."""
        if looks_like_digest(reference):
            for mirror in self.client.mirrors.clients:
                try:
                    found = await _fetch_manifest(mirror, self.repository, reference, accept, None)
                except RegistryError as exc:
                    self._counted(mirror, "manifest", _outcome(exc))
                    log.info("content mirror %s: manifest %s: %s", mirror.name, reference, exc.message)
                    continue
                self._counted(mirror, "manifest", "served", found[0].size)
                return found
        pull: Pull = "waited" if self.waited else "deferrable"
        found = await _fetch_manifest(self.client, self.repository, reference, accept, pull)
        self._counted(self.client, "manifest", "served", found[0].size)
        return found

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
        """The blob's response with its body still to stream (the caller releases it); a download's opener. The
        content mirrors are asked first (the download verifies what they send); the upstream when they lack it."""
        for mirror in self.client.mirrors.for_blob(digest):
            try:
                resp = await self._open_blob_at(mirror, digest)
            except RegistryError as exc:
                self._counted(mirror, "blob", _outcome(exc))
                log.info("content mirror %s: blob %s: %s", mirror.name, digest, exc.message)
                continue
            self.client.mirrors.handed_out(mirror, digest)
            self._counted(mirror, "blob", "served", resp.content_length or 0)
            return resp
        resp = await self._open_blob_at(self.client, digest)
        self._counted(self.client, "blob", "served", resp.content_length or 0)
        return resp

    async def _open_blob_at(self, client: UpstreamClient, digest: Digest) -> aiohttp.ClientResponse:
        resp = await client.open("GET", self.repository, self._path("blobs", str(digest)), stream=True)
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

    async def referrers(self, digest: Digest, artifact_type: str | None, page: Mapping[str, str]) -> Referrers | None:
        """Upstream's referrers of `digest` (OCI 1.1), `page` being the query of a Link it gave; None when it
        answers 404, as registries that predate the API do: the caller falls back to the tag schema."""
        params = {**page, "artifactType": artifact_type} if artifact_type else dict(page)
        resp = await self.client.open(
            "GET", self.repository, self._path("referrers", str(digest)), {"Accept": OCI_INDEX}, params=params
        )
        async with resp:
            if resp.status == 404:
                return None
            if resp.status != 200:
                raise upstream_failure(resp, ManifestUnknown, "referrers")
            body = await read_bounded(resp, MAX_MANIFEST, "upstream referrers", {})
            applied = resp.headers.get("OCI-Filters-Applied", "")
            link = resp.headers.get("Link")
        try:
            media_type_of(OCI_INDEX, body)  # a JSON object with an OCI index's structure
        except ValueError:
            raise UpstreamInvalid(
                "upstream sent a referrers answer that is not an OCI index", {"digest": str(digest)}
            ) from None
        # Only a filter we asked for was applied (an upstream may send the header regardless).
        filtered = bool(artifact_type) and "artifacttype" in (f.strip().lower() for f in applied.split(","))
        return Referrers(body, filtered, link)
