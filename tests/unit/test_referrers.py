"""The OCI 1.1 referrers API through cargohold (shipped defaults) in front of the rig's referrers registry
(tests/rig/referrers.py, an upstream that implements the API, on loopback): passed through, filtered,
paginated with our paths, cached with tag_ttl semantics, stale when upstream fails; and the referrers tag
schema when upstream answers the API 404. The e2e tests (tests/e2e/test_artifacts.py) do the tag schema
against Debian's docker-registry."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from cargohold.middleware.ratelimit import kind_of
from cargohold.ratelimit.limiter import Kind
from rig.referrers import EMPTY, OCI_INDEX, Artifact, ReferrersRegistry, artifact, index_of
from unit.upstreamkit import error_of, mirror, served

SIGNATURE = "application/vnd.dev.cosign.artifact.sig.v1+json"
SBOM = "application/spdx+json"
HELM_CONFIG = "application/vnd.cncf.helm.config.v1+json"
HELM_CHART = "application/vnd.cncf.helm.chart.content.v1.tar+gzip"


def _content(seed: str) -> tuple[Artifact, list[Artifact]]:
    """A Helm-chart-shaped subject and three referrers: two signatures and an SBOM."""
    chart = artifact(HELM_CONFIG, [(HELM_CHART, seed.encode() * 10)], config=(HELM_CONFIG, b'{"name":"chart"}'))
    referrers = [
        artifact(SIGNATURE, [(SIGNATURE, f"sig-{seed}-{i}".encode())], subject=chart, annotations={"i": str(i)})
        for i in range(2)
    ]
    referrers.append(artifact(SBOM, [(SBOM, b'{"spdxVersion":"SPDX-2.3"}')], subject=chart))
    return chart, referrers


@asynccontextmanager
async def _upstream(registry: ReferrersRegistry) -> AsyncIterator[str]:
    server = TestServer(registry.app(), host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@asynccontextmanager
async def _setup(tmp_path: Path, registry: ReferrersRegistry, **upstream: Any) -> AsyncIterator[TestClient[Any, Any]]:
    async with _upstream(registry) as url, mirror(tmp_path, {"name": "reg.test", "url": url, **upstream}) as client:
        yield client


def _digests(body: dict[str, Any]) -> list[str]:
    return [d["digest"] for d in body["manifests"]]


async def test_api_passed_through_paginated_with_our_links(tmp_path: Path) -> None:
    registry = ReferrersRegistry(page_size=2)
    chart, referrers = _content("paged")
    registry.add("charts/app", chart, "1.0")
    for r in referrers:
        registry.add("charts/app", r)
    async with _setup(tmp_path, registry) as client:
        resp = await client.get(f"/v2/charts/app/referrers/{chart.digest}")
        assert resp.status == 200 and resp.headers["Content-Type"] == OCI_INDEX
        assert "OCI-Filters-Applied" not in resp.headers
        first = await resp.json()
        link = resp.headers["Link"]
        # Upstream's absolute link, pointed back at us: our path, upstream's page query.
        assert link.startswith(f"</v2/charts/app/referrers/{chart.digest}?last=") and link.endswith('>; rel="next"')
        resp = await client.get(link[1 : link.index(">")])
        assert resp.status == 200 and "Link" not in resp.headers
        listed = _digests(first) + _digests(await resp.json())
        assert sorted(listed) == sorted(r.digest for r in referrers)
        signature = next(d for d in first["manifests"] if d["artifactType"] == SIGNATURE)
        assert signature["annotations"] in ({"i": "0"}, {"i": "1"})


async def test_filter_applied_by_upstream_or_by_us(tmp_path: Path) -> None:
    for filters in (True, False):
        registry = ReferrersRegistry(page_size=10, filters=filters)
        chart, referrers = _content(f"filter-{filters}")
        for item in (chart, *referrers):
            registry.add("charts/app", item)
        async with _setup(tmp_path / str(filters), registry) as client:
            resp = await client.get(f"/v2/charts/app/referrers/{chart.digest}", params={"artifactType": SBOM})
            assert resp.status == 200 and resp.headers["OCI-Filters-Applied"] == "artifactType"
            assert _digests(await resp.json()) == [referrers[2].digest]


class _SaysFilteredAlways(ReferrersRegistry):
    """Sends `OCI-Filters-Applied: artifactType` with every referrers answer, asked to filter or not."""

    def app(self) -> web.Application:
        app = super().app()
        app.on_response_prepare.append(self._says_filtered)
        return app

    async def _says_filtered(self, request: web.Request, response: web.StreamResponse) -> None:
        if "/referrers/" in request.path:
            response.headers["OCI-Filters-Applied"] = "artifactType"


async def test_filters_applied_said_only_when_a_filter_was_asked_for(tmp_path: Path) -> None:
    registry = _SaysFilteredAlways(page_size=10)
    chart, referrers = _content("says-filtered")
    for item in (chart, *referrers):
        registry.add("charts/app", item)
    async with _setup(tmp_path, registry) as client:
        resp = await client.get(f"/v2/charts/app/referrers/{chart.digest}")
        assert resp.status == 200 and "OCI-Filters-Applied" not in resp.headers
        assert len(_digests(await resp.json())) == 3
        resp = await client.get(f"/v2/charts/app/referrers/{chart.digest}", params={"artifactType": SBOM})
        assert resp.headers["OCI-Filters-Applied"] == "artifactType"


async def test_cached_within_tag_ttl_then_stale_when_upstream_fails(tmp_path: Path) -> None:
    registry = ReferrersRegistry(page_size=10)
    chart, referrers = _content("ttl")
    for item in (chart, referrers[0]):
        registry.add("charts/app", item)
    path = f"/v2/charts/app/referrers/{chart.digest}"
    async with _setup(tmp_path / "long", registry, tag_ttl="1h") as client:
        for _ in range(3):
            resp = await client.get(path)
            assert _digests(await resp.json()) == [referrers[0].digest]
        assert registry.referrers_asked() == 1
    registry.requests.clear()
    # tag_ttl 0: every request revalidates, so a new referrer shows at once, and a failing upstream is stale.
    async with _setup(tmp_path / "zero", registry, tag_ttl="0s") as client:
        assert _digests(await (await client.get(path)).json()) == [referrers[0].digest]
        registry.add("charts/app", referrers[1])
        assert len(_digests(await (await client.get(path)).json())) == 2
        assert registry.referrers_asked() == 2
        registry.down = True
        resp = await client.get(path)
        assert resp.status == 200 and len(_digests(await resp.json())) == 2


async def test_referrers_and_their_content_by_digest_with_upstream_content_types(tmp_path: Path) -> None:
    registry = ReferrersRegistry()
    chart, referrers = _content("content")
    for item in (chart, *referrers):
        registry.add("charts/app", item)
    async with _setup(tmp_path, registry) as client:
        resp = await client.get("/v2/charts/app/manifests/1.0")
        assert resp.status == 404  # no such tag: the chart was added by digest only
        for item in (chart, referrers[0]):
            resp = await client.get(f"/v2/charts/app/manifests/{item.digest}")
            assert resp.status == 200 and await resp.read() == item.manifest
            assert resp.headers["Content-Type"] == item.media_type
            assert resp.headers["Docker-Content-Digest"] == item.digest
            for digest, data in item.blobs.items():
                resp = await client.get(f"/v2/charts/app/blobs/{digest}")
                assert resp.status == 200 and await resp.read() == data
        empty = json.loads(referrers[0].manifest)["config"]
        assert empty["mediaType"] == EMPTY and empty["size"] == 2


async def test_tag_schema_when_upstream_has_no_api(tmp_path: Path) -> None:
    registry = ReferrersRegistry(api=False)
    chart, referrers = _content("schema")
    for item in (chart, *referrers):
        registry.add("charts/app", item)
    lonely = artifact(HELM_CONFIG, [(HELM_CHART, b"no referrers")])
    registry.add("charts/app", lonely)
    registry.add("charts/app", index_of(referrers), "sha256-" + chart.digest.removeprefix("sha256:"))
    async with _setup(tmp_path, registry) as client:
        resp = await client.get(f"/v2/charts/app/referrers/{chart.digest}")
        assert resp.status == 200 and "OCI-Filters-Applied" not in resp.headers
        assert sorted(_digests(await resp.json())) == sorted(r.digest for r in referrers)
        resp = await client.get(f"/v2/charts/app/referrers/{chart.digest}", params={"artifactType": SIGNATURE})
        assert resp.headers["OCI-Filters-Applied"] == "artifactType"
        assert sorted(_digests(await resp.json())) == sorted(r.digest for r in referrers[:2])
        resp = await client.get(f"/v2/charts/app/referrers/{lonely.digest}")
        assert resp.status == 200 and await resp.json() == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}


async def test_tag_schema_cached_answers_when_upstream_fails_and_nothing_is_remembered(tmp_path: Path) -> None:
    """The referrers tag was pulled (or imported) earlier; upstream then fails before any referrers answer was
    remembered by this process: the cached tag's index is served stale instead of a 503."""
    registry = ReferrersRegistry(api=False)
    chart, referrers = _content("stale-schema")
    for item in (chart, *referrers):
        registry.add("charts/app", item)
    tag = "sha256-" + chart.digest.removeprefix("sha256:")
    registry.add("charts/app", index_of(referrers), tag)
    async with _setup(tmp_path, registry, tag_ttl="0s") as client:
        assert (await client.get(f"/v2/charts/app/manifests/{tag}")).status == 200  # the tag is cached
        registry.down = True
        resp = await client.get(f"/v2/charts/app/referrers/{chart.digest}")
        assert resp.status == 200
        assert sorted(_digests(await resp.json())) == sorted(r.digest for r in referrers)
        resp = await client.get(f"/v2/charts/app/referrers/{referrers[0].digest}")  # no cached tag: the failure
        assert resp.status in (502, 503, 504)


async def test_routed_by_ns_and_path_prefix_links_included(tmp_path: Path) -> None:
    registry = ReferrersRegistry(page_size=1)
    chart, referrers = _content("routes")
    for item in (chart, *referrers):
        registry.add("charts/app", item)
    async with (
        _upstream(registry) as url,
        mirror(
            tmp_path, {"name": "docker.io", "url": "http://127.0.0.1:9"}, {"name": "reg.test", "url": url}
        ) as client,
    ):
        resp = await client.get(f"/v2/reg.test/charts/app/referrers/{chart.digest}")
        assert resp.status == 200 and resp.headers["Link"].startswith(
            f"</v2/reg.test/charts/app/referrers/{chart.digest}?"
        )
        resp = await client.get(f"/v2/charts/app/referrers/{chart.digest}", params={"ns": "reg.test"})
        assert resp.status == 200 and resp.headers["OCI-Namespace"] == "reg.test"
        link = resp.headers["Link"]
        assert link.startswith(f"</v2/charts/app/referrers/{chart.digest}?") and "ns=reg.test" in link
        resp = await client.get(link[1 : link.index(">")])
        assert resp.status == 200 and len(_digests(await resp.json())) == 1


async def test_concurrent_clients_share_one_upstream_request(tmp_path: Path) -> None:
    registry = ReferrersRegistry(delay=0.5)  # long enough for all clients to arrive while the first is asked
    chart, referrers = _content("flight")
    for item in (chart, *referrers):
        registry.add("charts/app", item)
    async with _setup(tmp_path, registry) as client:
        answers = await asyncio.gather(*(client.get(f"/v2/charts/app/referrers/{chart.digest}") for _ in range(10)))
        assert [r.status for r in answers] == [200] * 10
        assert registry.referrers_asked() == 1


async def test_an_answer_that_is_no_index_is_refused_and_not_remembered(tmp_path: Path) -> None:
    calls = 0

    async def garbage(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.json_response({"requests_total": 7}, content_type=OCI_INDEX)

    subject = "sha256:" + "b" * 64
    async with (
        served({"/v2/{name:.+}/referrers/{digest}": garbage}) as upstream,
        mirror(tmp_path, {"name": "reg.test", "url": str(upstream.make_url("")), "tag_ttl": "1h"}) as client,
    ):
        for _ in range(2):
            resp = await client.get(f"/v2/charts/app/referrers/{subject}")
            assert resp.status == 502 and "not an OCI index" in (await error_of(resp))["message"]
    assert calls == 2


def test_counted_by_the_rate_limit_like_a_manifest_by_digest() -> None:
    """Not against the blob budget (its digest is no blob's), and not as a pull (no tag is resolved)."""
    subject = "sha256:" + "b" * 64
    referrers = make_mocked_request("GET", "/", match_info={"name": "charts/app", "subject": subject})
    manifest = make_mocked_request("GET", "/", match_info={"name": "charts/app", "reference": subject})
    assert kind_of(referrers) is kind_of(manifest) is Kind.REQUEST


async def test_bad_subject_is_digest_invalid(tmp_path: Path) -> None:
    async with _setup(tmp_path, ReferrersRegistry()) as client:
        resp = await client.get("/v2/charts/app/referrers/sha256:nothex")
        assert resp.status == 400 and (await error_of(resp))["code"] == "DIGEST_INVALID"
