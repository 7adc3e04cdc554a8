"""Referrers of a manifest (OCI 1.1): signatures, attestations and SBOMs that name it as their `subject`.

Upstream's referrers API is passed through; an upstream that answers it 404 (distribution 2.x and many more)
is read through the referrers tag schema instead: the `<alg>-<hex>` tag whose index lists the referrers, as
cosign and oras push it. New referrers appear over time, so an answer is remembered (per process, bounded)
with `tag_ttl` semantics: within it no upstream request, after it asked again, the last answer served stale
when upstream fails. An offline upstream's answers are not remembered: its tag schema changes only by an
import next to the running server, which the tag layer sees within a second.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from cargohold.errors import ManifestUnknown, UpstreamError, UpstreamInvalid
from cargohold.flight import SingleFlight
from cargohold.oci.digests import Digest
from cargohold.oci.mediatypes import OCI_INDEX
from cargohold.pull.recent import Recent
from cargohold.pull.tags import Tags
from cargohold.tasks import Tasks
from cargohold.upstream.offline import OfflineRepository
from cargohold.upstream.repository import Remote

log = logging.getLogger("cargohold.proxy")

# Answers remembered per process, and the largest one remembered (a larger one is passed on uncached):
# at most 32 MiB however many subjects clients ask about. A referrer's descriptor is ~400 bytes.
ANSWERS = 512
MAX_REMEMBERED = 64 << 10

# (upstream, repository, subject digest, artifactType or "", upstream's page query)
ReferrersKey = tuple[str, str, str, str, tuple[tuple[str, str], ...]]


@dataclass(frozen=True, slots=True)
class ReferrersAnswer:
    """An OCI index of referrers ready to send: whether the artifactType filter was applied, upstream's
    next-page Link (naming the upstream's repository), when upstream was last asked, and how it was obtained."""

    body: bytes
    filtered: bool
    link: str | None
    checked_at: float
    cache: str


def tag_schema_tag(digest: Digest) -> str:
    """The referrers tag schema's tag for a subject: `<alg>-<ref>`, the encoded part cut to 64 characters as the
    distribution spec says (`sha512:<128 hex>` -> `sha512-<first 64>`; a tag holds 128 characters at most). Its
    other rules (the algorithm cut to 32, characters a tag cannot hold made `-`) change nothing for the
    algorithms a `Digest` may have."""
    return f"{digest.algorithm}-{digest.hex[:64]}"


def referrers_index(descriptors: list[Any]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}).encode()


def _listed(body: bytes) -> list[Any]:
    """The descriptors of an index already validated as one (by the remote or the manifest rules)."""
    manifests = json.loads(body).get("manifests")
    return manifests if isinstance(manifests, list) else []


def _of_type(descriptors: list[Any], artifact_type: str | None) -> list[Any]:
    if not artifact_type:
        return descriptors
    return [d for d in descriptors if isinstance(d, dict) and d.get("artifactType") == artifact_type]


class Referrers:
    """Referrers answers per (upstream, repository, subject, artifactType, page), from the API or the tag schema."""

    def __init__(self, tags: Tags, tasks: Tasks) -> None:
        self._tags = tags
        self._answers: Recent[ReferrersKey, ReferrersAnswer] = Recent(ANSWERS)
        self._fetches: SingleFlight[ReferrersAnswer] = SingleFlight(tasks, "referrers fetch")

    @property
    def joins(self) -> int:
        return self._fetches.joins

    async def get(
        self, remote: Remote, digest: Digest, artifact_type: str | None, page: Mapping[str, str]
    ) -> ReferrersAnswer:
        key = (remote.upstream, remote.repository, str(digest), artifact_type or "", tuple(sorted(page.items())))
        if isinstance(remote, OfflineRepository):  # nobody to ask: the cached tag schema, as it is now
            answer = await self._fetches.run(key, lambda: self._from_tag_schema(remote, digest, artifact_type))
            return replace(answer, cache="hit")
        known = self._answers.get(key)
        if known is not None and time.time() - known.checked_at < remote.tag_ttl:
            return replace(known, cache="hit")
        try:
            answer = await self._fetches.run(key, lambda: self._fetch(remote, digest, artifact_type, page))
        except UpstreamError as exc:
            if known is None and not isinstance(exc, UpstreamInvalid):  # upstream unreachable, not wrong: the tag
                return await self._stale_from_tag_schema(remote, digest, artifact_type, exc)  # schema may be cached
            if known is None:
                raise
            log.warning(
                "serving stale referrers of %s/%s@%s: %s", remote.upstream, remote.repository, digest, exc.message
            )
            return replace(known, cache="stale")
        if len(answer.body) <= MAX_REMEMBERED:
            self._answers.put(key, answer)
        return answer

    async def _stale_from_tag_schema(
        self, remote: Remote, digest: Digest, artifact_type: str | None, failure: UpstreamError
    ) -> ReferrersAnswer:
        """Upstream failed and no answer is remembered: the cached tag schema's index, served stale; else the failure."""
        try:
            answer = await self._from_tag_schema(remote, digest, artifact_type)
        except UpstreamError:
            raise failure from None
        log.warning(
            "serving referrers of %s/%s@%s from the cached tag schema: %s",
            remote.upstream,
            remote.repository,
            digest,
            failure.message,
        )
        return replace(answer, cache="stale")

    async def _fetch(
        self, remote: Remote, digest: Digest, artifact_type: str | None, page: Mapping[str, str]
    ) -> ReferrersAnswer:
        found = await remote.referrers(digest, artifact_type, page)
        if found is None:
            return await self._from_tag_schema(remote, digest, artifact_type)
        if artifact_type and not found.filtered:  # upstream ignored the filter: apply it here
            body = referrers_index(_of_type(_listed(found.body), artifact_type))
            return ReferrersAnswer(body, True, found.link, time.time(), "miss")
        return ReferrersAnswer(found.body, found.filtered, found.link, time.time(), "miss")

    async def _from_tag_schema(self, remote: Remote, digest: Digest, artifact_type: str | None) -> ReferrersAnswer:
        """The `<alg>-<hex>` tag's index through the tag rules (cached, revalidated, stale), filtered here;
        no such tag is an empty index, as the spec asks of a registry that supports the API."""
        descriptors: list[Any] = []
        cache = "miss"
        try:
            manifest = await self._tags.get(remote, tag_schema_tag(digest), frozenset())
        except ManifestUnknown:
            pass
        else:
            cache = "stale" if manifest.cache == "stale" else "miss"  # upstream was asked (the API) either way
            if manifest.descriptor.media_type == OCI_INDEX:
                descriptors = _listed(manifest.body)
        body = referrers_index(_of_type(descriptors, artifact_type))
        return ReferrersAnswer(body, bool(artifact_type), None, time.time(), cache)
