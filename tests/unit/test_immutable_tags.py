"""`immutable_tags` held whatever the upstream answers and whatever Accept a client sends: cargohold (shipped defaults
but the settings each test is about) in front of the rig's small registry (tests/rig/referrers.py, on loopback),
which can refuse a tag (404, 401, 403) and move it. An immutable tag names the digest it was first seen at until an
operator accepts a recorded move (`cargohold cache accept`); the e2e test (tests/e2e/test_sync.py) does the move
and the accept against the real registry."""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from cargohold.cli.cache import accept
from cargohold.keys import METRICS, PROXY, SETTINGS
from cargohold.oci.digests import Digest
from cargohold.oci.mediatypes import DOCKER_MANIFEST, FULL_ACCEPT, OCI_INDEX, OCI_MANIFEST
from cargohold.pull import recent
from cargohold.upstream.repository import Repository
from rig.referrers import Artifact, ReferrersRegistry, digest_of
from unit.upstreamkit import error_of, mirror

REPO = "acme/app"
# A client that takes single-platform manifests only (an old docker), not the index or list a tag may point at.
SINGLE = f"{DOCKER_MANIFEST}, {OCI_MANIFEST}"


@dataclass
class Upstream(ReferrersRegistry):
    """The rig's registry, answering `refuse` (a status) to every request for a manifest by one of `refused`
    tags, and recording the Accept header of every manifest request by tag."""

    refuse: int = 0
    refused: set[str] = field(default_factory=set)
    by_tag: list[tuple[str, str, str]] = field(default_factory=list)  # (method, tag, Accept)

    def app(self) -> web.Application:
        app = super().app()
        app.middlewares.append(self._refusing)
        return app

    @web.middleware
    async def _refusing(self, request: web.Request, handler: Any) -> web.StreamResponse:
        path = request.path.split("/manifests/", 1)
        if len(path) == 2 and not path[1].startswith("sha256:"):
            self.by_tag.append((request.method, path[1], request.headers.get("Accept", "")))
            if path[1] in self.refused:
                body = {"errors": [{"code": "DENIED", "message": "refused by the test"}]}
                return web.json_response(body, status=self.refuse)
        response: web.StreamResponse = await handler(request)
        return response


def _image(seed: str) -> Artifact:
    config = json.dumps({"architecture": "amd64", "os": "linux", "seed": seed}).encode()
    layer = seed.encode() * 3
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest_of(config), "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest_of(layer), "size": 3}],
    }
    return Artifact(json.dumps(document).encode(), {digest_of(config): config, digest_of(layer): layer})


def _index(child: Artifact) -> Artifact:
    platform = {"os": "linux", "architecture": "amd64"}
    manifests = [{"mediaType": OCI_MANIFEST, "digest": child.digest, "size": len(child.manifest), "platform": platform}]
    document = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    return Artifact(json.dumps(document).encode(), {}, OCI_INDEX)


@asynccontextmanager
async def _setup(tmp_path: Path, registry: Upstream) -> AsyncIterator[TestClient[Any, Any]]:
    server = TestServer(registry.app(), host="127.0.0.1")
    await server.start_server()
    # Changed from the defaults: tags revalidated at every pull (so each upstream answer is seen at once), and
    # `v*` immutable.
    upstream = {"name": "reg.test", "url": str(server.make_url("")).rstrip("/"), "tag_ttl": "0s"}
    try:
        async with mirror(tmp_path, {**upstream, "immutable_tags": ["v*"]}) as client:
            yield client
    finally:
        await server.close()


async def _pull(client: TestClient[Any, Any], tag: str, accept: str | None = None, method: str = "GET") -> Any:
    headers = {"Accept": accept} if accept else {}
    return await client.request(method, f"/v2/{REPO}/manifests/{tag}", headers=headers)


async def _stale_answers(client: TestClient[Any, Any]) -> float:
    metrics = client.server.app[METRICS]
    await metrics.refresh()
    labels = {"kind": "manifest", "result": "stale"}
    return metrics.registry.get_sample_value("cargohold_cache_requests_total", labels) or 0.0


def _moved_and_refused(status: int) -> tuple[Upstream, Artifact, Artifact]:
    """An upstream with image A at the immutable v1 and the mutable latest, and image B."""
    registry, a, b = Upstream(refuse=status), _image("A"), _image("B")
    registry.add(REPO, a, "v1")
    registry.add(REPO, a, "latest")
    registry.add(REPO, b)
    return registry, a, b


@pytest.mark.parametrize("status", [404, 401, 403])
async def test_an_immutable_tag_the_upstream_says_is_gone_or_refuses_is_served_stale_until_a_move_is_accepted(
    tmp_path: Path, status: int, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 5, item 1: the upstream's 404 (401, 403 alike) dropped the immutable tag's row, so the client got 404
    although its digest was cached, and the next pull followed the tag wherever upstream pointed it then, with no
    move recorded and no `cache accept`. A mutable tag is still dropped (and answered 404) as before."""
    registry, a, b = _moved_and_refused(status)
    async with _setup(tmp_path, registry) as client:
        proxy = client.server.app[PROXY]
        for tag in ("v1", "latest"):
            assert (await _pull(client, tag)).headers["Docker-Content-Digest"] == a.digest
        registry.refused = {"v1", "latest"}
        stale_before = await _stale_answers(client)
        with caplog.at_level(logging.WARNING, "cargohold.proxy"):
            got = await _pull(client, "v1")
            assert (got.status, await got.read()) == (200, a.manifest)
            head = await _pull(client, "v1", method="HEAD")
            assert (head.status, head.headers["Docker-Content-Digest"]) == (200, a.digest)
        assert await _stale_answers(client) == stale_before + 1  # the GET (HEADs are not counted)
        assert f"serving stale reg.test/{REPO}:v1 ({a.digest}): immutable tag kept" in caplog.text
        assert f"'status': {status}" in caplog.text
        missing = await _pull(client, "latest")  # a mutable tag: dropped, as the upstream says
        assert missing.status == 404 and (await error_of(missing))["code"] == "MANIFEST_UNKNOWN"
        assert await proxy.index.get_tag("reg.test", REPO, "latest") is None

        registry.refused = set()
        registry.tags[REPO, "v1"] = b.digest  # the tag moved upstream meanwhile: recorded, not followed
        for _ in range(2):
            assert (await _pull(client, "v1")).headers["Docker-Content-Digest"] == a.digest
        moves = await proxy.index.tag_moves("reg.test", REPO, "v1")
        assert [(m.old_digest, m.new_digest) for m in moves] == [(a.digest, b.digest)]

        args = argparse.Namespace(image=f"reg.test/{REPO}:v1")
        assert await accept(client.server.app[SETTINGS], args) == 0
        later = time.monotonic() + 1.0  # past the second this process reads the tag's row from memory
        monkeypatch.setattr(recent, "monotonic", lambda: later)
        assert (await _pull(client, "v1")).headers["Docker-Content-Digest"] == b.digest


@pytest.mark.parametrize("status", [404, 401, 403])
async def test_a_sync_refresh_and_a_head_after_eviction_keep_an_immutable_tag_the_upstream_refuses(
    tmp_path: Path, status: int
) -> None:
    """Review 5, item 1, the other ways in: a sync run's refresh (it raised and dropped the row), and a HEAD of the
    tag whose manifest was evicted (404): both keep the digest, the HEAD fetching its manifest by digest."""
    registry, a, _ = _moved_and_refused(status)
    async with _setup(tmp_path, registry) as client:
        proxy = client.server.app[PROXY]
        assert (await _pull(client, "v1")).status == 200
        registry.refused = {"v1"}
        refreshed = await proxy.tags.refresh(Repository(proxy.router.upstreams[0], REPO, False), "v1")
        assert (str(refreshed.descriptor.digest), refreshed.cache) == (a.digest, "stale")
        assert (await proxy.index.get_tag("reg.test", REPO, "v1")).digest == a.digest
        await proxy.index.forget("manifests", a.digest)
        proxy.manifests.forget(Digest.parse(a.digest))
        head = await _pull(client, "v1", method="HEAD")
        assert (head.status, head.headers["Docker-Content-Digest"]) == (200, a.digest)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_another_accept_of_an_immutable_tag_is_answered_from_the_kept_digest(tmp_path: Path, method: str) -> None:
    """Review 5, item 2: a client whose Accept did not take the kept index got upstream's answer for its own Accept,
    by tag: the digest the tag had moved to (GET and HEAD), though the move was refused for everyone else. Now the
    tag is never asked upstream with another Accept: the kept manifest if the client takes it, else 404."""
    registry = Upstream()
    a1, b1 = registry.add(REPO, _image("A1")), registry.add(REPO, _image("B1"))
    a, b = registry.add(REPO, _index(a1), "v1"), registry.add(REPO, _index(b1))
    single = registry.add(REPO, _image("S"), "v2")
    registry.tags[REPO, "v3"] = b.digest
    async with _setup(tmp_path, registry) as client:
        for tag in ("v1", "v2"):
            assert (await _pull(client, tag)).status == 200
        registry.tags[REPO, "v1"] = b.digest
        registry.tags[REPO, "v2"] = b.digest
        assert (await _pull(client, "v1")).headers["Docker-Content-Digest"] == a.digest  # the move refused
        registry.by_tag.clear()
        got = await _pull(client, "v1", SINGLE, method)
        assert got.status == 404 and "Docker-Content-Digest" not in got.headers
        if method == "GET":
            error = await error_of(got)
            assert (
                error["code"] == "MANIFEST_UNKNOWN"
                and f"immutable tag v1 is kept at a manifest of type {OCI_INDEX}" in error["message"]
            )
            assert error["detail"] == {"tag": "v1", "mediaType": OCI_INDEX}
        # A kept single manifest the client takes is served, whatever the tag points at upstream now.
        got = await _pull(client, "v2", SINGLE, method)
        assert (got.status, got.headers["Docker-Content-Digest"]) == (200, single.digest)
        # A tag first asked for with such an Accept is kept at upstream's answer to the full Accept, answered from it.
        assert (await _pull(client, "v3", SINGLE, method)).status == 404
        assert (await client.server.app[PROXY].index.get_tag("reg.test", REPO, "v3")).digest == b.digest
        assert {accept for _, _, accept in registry.by_tag} == {FULL_ACCEPT}  # never the client's
