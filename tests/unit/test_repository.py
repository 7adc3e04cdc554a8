"""The typed remote (`upstream/repository.py`) against an in-process upstream: what it says about manifests
and blobs as Descriptors, which upstream answers become which domain errors, and what it refuses to read."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from cargohold.config import UpstreamConfig
from cargohold.errors import (
    BlobUnknown,
    ManifestUnknown,
    NameUnknown,
    UpstreamInvalid,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from cargohold.oci.digests import Digest
from cargohold.oci.mediatypes import FULL_ACCEPT, OCI_MANIFEST
from cargohold.upstream.client import UpstreamClient
from cargohold.upstream.repository import MAX_MANIFEST, Descriptor, Repository

BODY = json.dumps(
    {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {"digest": "sha256:" + "a" * 64, "size": 2}, "layers": []}
).encode()
DIGEST = Digest.of(BODY)
OTHER = Digest.of(b"other")


class Upstream:
    """Answers every manifest request with `status`, `body` and `headers` as set by the test."""

    def __init__(self) -> None:
        self.status = 200
        self.body = BODY
        self.headers: dict[str, str] = {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": str(DIGEST)}
        self.seen: list[tuple[str, str, str | None]] = []

    async def answer(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.path_qs, request.headers.get("Accept")))
        body = b"" if request.method == "HEAD" else self.body
        headers = {**self.headers}
        if request.method == "HEAD":
            headers.setdefault("Content-Length", str(len(self.body)))
        return web.Response(status=self.status, body=body, headers=headers)


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, Repository]]:
    fake = Upstream()
    app = web.Application()
    app.router.add_route("*", "/v2/{name:.+}/{kind:manifests|blobs}/{ref}", fake.answer)
    app.router.add_get("/v2/{name:.+}/tags/list", fake.answer)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    config = UpstreamConfig(name="registry.test", url=str(server.make_url("")).rstrip("/"), failure_pause=0)
    async with aiohttp.ClientSession() as session:
        yield fake, Repository(UpstreamClient(config, session), "team/app")
    await server.close()


async def test_get_manifest_is_verified_and_described(upstream: Any) -> None:
    fake, remote = upstream
    found, body = await remote.get_manifest("1.0", FULL_ACCEPT)
    assert (found, body) == (Descriptor(DIGEST, OCI_MANIFEST, len(BODY)), BODY)
    assert fake.seen == [("GET", "/v2/team/app/manifests/1.0", FULL_ACCEPT)]
    assert (await remote.get_manifest(str(DIGEST), FULL_ACCEPT))[0].digest == DIGEST


@pytest.mark.parametrize(
    ("reference", "change"),
    [
        ("1.0", {"headers": {"Docker-Content-Digest": str(OTHER)}}),  # claims another digest
        (str(OTHER), {}),  # is not the digest asked for
        ("1.0", {"body": b"[1, 2]"}),  # not a JSON object
        ("1.0", {"body": b"x" * (MAX_MANIFEST + 1), "headers": {}}),  # too large
    ],
)
async def test_get_manifest_refuses_what_it_cannot_verify(
    upstream: Any, reference: str, change: dict[str, Any]
) -> None:
    fake, remote = upstream
    for name, value in change.items():
        setattr(fake, name, value)
    with pytest.raises(UpstreamInvalid):
        await remote.get_manifest(reference, FULL_ACCEPT)


async def test_head_manifest_says_what_upstream_named(upstream: Any) -> None:
    fake, remote = upstream
    assert await remote.head_manifest("1.0", FULL_ACCEPT) == Descriptor(DIGEST, OCI_MANIFEST, len(BODY))
    assert await remote.head_manifest(str(DIGEST), FULL_ACCEPT) == Descriptor(DIGEST, OCI_MANIFEST, len(BODY))
    assert await remote.head_manifest(str(OTHER), FULL_ACCEPT) is None  # upstream names another digest
    fake.headers = {"Content-Type": "application/json; charset=utf-8"}
    assert await remote.head_manifest("1.0", FULL_ACCEPT) is None  # no digest to check against
    assert await remote.head_manifest(str(DIGEST), FULL_ACCEPT) == Descriptor(DIGEST, "application/json", len(BODY))


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (404, ManifestUnknown),
        (401, ManifestUnknown),
        (403, ManifestUnknown),
        (429, UpstreamRateLimited),
        (503, UpstreamUnavailable),
        (418, UpstreamInvalid),
    ],
)
async def test_upstream_statuses_become_domain_errors(upstream: Any, status: int, error: type[Exception]) -> None:
    fake, remote = upstream
    fake.status = status
    with pytest.raises(error):
        await remote.get_manifest("1.0", FULL_ACCEPT)


async def test_blobs_and_tag_lists(upstream: Any) -> None:
    fake, remote = upstream
    fake.headers = {"Content-Type": "application/octet-stream"}
    assert await remote.head_blob(DIGEST) == Descriptor(DIGEST, "application/octet-stream", len(BODY))
    resp = await remote.open_blob(DIGEST)
    async with resp:
        assert await resp.read() == BODY
    fake.body, fake.headers = (
        b'{"name": "team/app", "tags": ["1.0"]}',
        {"Link": '</v2/team/app/tags/list?n=1>; rel="next"'},
    )
    listed = await remote.list_tags("1", None)
    assert json.loads(listed.body)["tags"] == ["1.0"] and listed.link is not None
    assert fake.seen[-1][:2] == ("GET", "/v2/team/app/tags/list?n=1")
    fake.body = b"[]"
    with pytest.raises(UpstreamInvalid):
        await remote.list_tags(None, None)
    fake.status = 404
    with pytest.raises(BlobUnknown):
        await remote.head_blob(DIGEST)
    with pytest.raises(BlobUnknown):
        await remote.open_blob(DIGEST)
    with pytest.raises(NameUnknown):
        await remote.list_tags(None, None)
