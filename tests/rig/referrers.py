"""A small OCI 1.1 registry that implements the referrers API (Debian's docker-registry 2.8 predates it).

Read-only and anonymous: manifests and blobs are put in by the test (`add_manifest`, `add_blob`); the
referrers of a digest are the stored manifests whose `subject` names it, listed `page_size` per page with a
`Link` to the next one (an absolute URL, as some registries send). `filters`: whether it applies
`?artifactType=` (and says so in `OCI-Filters-Applied`) or ignores it, as the spec lets a registry do.
`api`: off, the referrers path answers 404 as registries that predate the API do (clients then use the
referrers tag schema: `index_of()` builds the `sha256-<hex>` tag's index). `down`: every answer is 503. `delay`: seconds each referrers answer waits (for concurrent clients to meet). `requests` records (method, path_qs) of everything asked.

Artefacts are built by `artifact()`: an OCI image manifest with an `artifactType`, the empty config
(`application/vnd.oci.empty.v1+json`) or one given, layers of any media type and an optional subject.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Artifact:
    """A manifest and the blobs it names."""

    manifest: bytes
    blobs: dict[str, bytes]
    media_type: str = OCI_MANIFEST

    @property
    def digest(self) -> str:
        return digest_of(self.manifest)

    def descriptor(self) -> dict[str, Any]:
        document = json.loads(self.manifest)
        found: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": len(self.manifest)}
        if "artifactType" in document:
            found["artifactType"] = document["artifactType"]
        if "annotations" in document:
            found["annotations"] = document["annotations"]
        return found


def artifact(
    artifact_type: str,
    layers: list[tuple[str, bytes]],
    *,
    subject: Artifact | None = None,
    config: tuple[str, bytes] = (EMPTY, EMPTY_JSON),
    annotations: dict[str, str] | None = None,
) -> Artifact:
    """An OCI 1.1 artifact manifest: `layers` are (media type, content)."""
    blobs = {digest_of(config[1]): config[1], **{digest_of(data): data for _, data in layers}}
    document: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": config[0], "digest": digest_of(config[1]), "size": len(config[1])},
        "layers": [{"mediaType": mt, "digest": digest_of(data), "size": len(data)} for mt, data in layers],
    }
    if subject is not None:
        document["subject"] = {"mediaType": subject.media_type, "digest": subject.digest, "size": len(subject.manifest)}
    if annotations:
        document["annotations"] = annotations
    return Artifact(json.dumps(document).encode(), blobs)


@dataclass
class ReferrersRegistry:
    """The registry's state; `app()` serves it."""

    page_size: int = 2
    filters: bool = True
    api: bool = True
    down: bool = False
    delay: float = 0.0
    manifests: dict[tuple[str, str], Artifact] = field(default_factory=dict)
    tags: dict[tuple[str, str], str] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)

    def add(self, repo: str, item: Artifact, tag: str | None = None) -> Artifact:
        self.manifests[repo, item.digest] = item
        if tag is not None:
            self.tags[repo, tag] = item.digest
        return item

    def referrers_asked(self) -> int:
        return sum(1 for _, path in self.requests if "/referrers/" in path)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._observe])
        app.router.add_get("/v2/", self._ping)
        app.router.add_get("/v2/{name:.+?}/manifests/{reference}", self._manifest)
        app.router.add_get("/v2/{name:.+?}/blobs/{digest}", self._blob)
        app.router.add_get("/v2/{name:.+?}/referrers/{digest}", self._referrers)
        return app

    @web.middleware
    async def _observe(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs))
        if self.down:
            return web.json_response({"errors": [{"code": "UNAVAILABLE", "message": "down"}]}, status=503)
        response: web.StreamResponse = await handler(request)
        return response

    async def _ping(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def _manifest(self, request: web.Request) -> web.Response:
        name, reference = request.match_info["name"], request.match_info["reference"]
        digest = self.tags.get((name, reference), reference)
        found = self.manifests.get((name, digest))
        if found is None:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "no"}]}, status=404)
        headers = {"Content-Type": found.media_type, "Docker-Content-Digest": found.digest}
        return web.Response(body=found.manifest, headers=headers)

    async def _blob(self, request: web.Request) -> web.Response:
        name, digest = request.match_info["name"], request.match_info["digest"]
        for (repo, _), item in self.manifests.items():
            if repo == name and digest in item.blobs:
                return web.Response(body=item.blobs[digest], content_type="application/octet-stream")
        return web.json_response({"errors": [{"code": "BLOB_UNKNOWN", "message": "no"}]}, status=404)

    async def _referrers(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.delay)
        if not self.api:
            return web.json_response({"errors": [{"code": "NOT_FOUND", "message": "no such route"}]}, status=404)
        name, subject = request.match_info["name"], request.match_info["digest"]
        wanted = request.query.get("artifactType")
        listed = sorted(
            (
                item.descriptor()
                for (repo, _), item in self.manifests.items()
                if repo == name and _subject(item) == subject
            ),
            key=lambda d: str(d["digest"]),
        )
        if wanted and self.filters:
            listed = [d for d in listed if d.get("artifactType") == wanted]
        last = request.query.get("last")
        if last:
            listed = [d for d in listed if str(d["digest"]) > last]
        page, more = listed[: self.page_size], len(listed) > self.page_size
        headers = {"Content-Type": OCI_INDEX}
        if wanted and self.filters:
            headers["OCI-Filters-Applied"] = "artifactType"
        if more:
            query = request.url.query.copy()
            query["last"] = str(page[-1]["digest"])
            headers["Link"] = f'<{request.url.with_query(query)}>; rel="next"'
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": page}).encode()
        return web.Response(body=body, headers=headers)


def index_of(referrers: list[Artifact]) -> Artifact:
    """The referrers tag schema's index listing `referrers` (to push as tag `sha256-<hex of the subject>`)."""
    document = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [r.descriptor() for r in referrers]}
    return Artifact(json.dumps(document).encode(), {}, OCI_INDEX)


def _subject(item: Artifact) -> str | None:
    subject = json.loads(item.manifest).get("subject")
    return subject.get("digest") if isinstance(subject, dict) else None
