"""Issue 21.1: an upstream's redirects go only where policy allows and never to an internal address
(unless the upstream is on one); what is served or cached as a manifest is a manifest."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from cargohold.config import UpstreamConfig
from cargohold.errors import UpstreamInvalid
from cargohold.oci.mediatypes import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    DOCKER_SCHEMA1_SIGNED,
    OCI_INDEX,
    OCI_MANIFEST,
    media_type_of,
)
from cargohold.upstream.addresses import AddressGuard, ForbiddenAddress, address_kind
from cargohold.upstream.client import UpstreamClient
from cargohold.upstream.realms import RedirectPolicy
from unit.upstreamkit import CONFIG, MANIFEST, ScriptedResolver, error_of, manifest_response, mirror, served

STATS = {"requests_total": 7, "uptime_seconds": 1234}  # an internal JSON endpoint an attacker wants read


async def test_a_redirect_to_a_host_outside_the_policy_is_not_followed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The attack of issue 21.1: `302 http://<internal>/stats` for a manifest was fetched, served as
    an OCI manifest and cached under the tag. Now the internal service never hears a request. The
    client is not told where the redirect went either (it named the host, or the whole URL with a
    signed query); the log is."""
    hits: Counter[str] = Counter()

    async def stats(request: web.Request) -> web.Response:
        hits[request.host] += 1
        return web.json_response(STATS)

    async with served({"/stats": stats}, host="127.0.0.2") as other_host, served({"/stats": stats}) as own_host:
        targets = [
            str(other_host.make_url("/stats")),
            str(own_host.make_url("/stats")),
            "s3://internal-bucket.corp/blob?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=s3cret",
        ]  # another host; ours, other port; a scheme nobody follows

        async def manifest(request: web.Request) -> web.Response:
            raise web.HTTPFound(targets[int(request.match_info["tag"])])

        async with (
            served({"/v2/team/app/manifests/{tag}": manifest}) as upstream,
            mirror(tmp_path, {"name": "docker.io", "url": str(upstream.make_url(""))}) as client,
        ):
            for tag in ("0", "1", "2"):
                resp = await client.get(f"/v2/team/app/manifests/{tag}")
                error = await error_of(resp)
                assert resp.status == 502 and "redirect" in error["message"], error
                assert error["detail"] == {"upstream": "docker.io", "setting": "redirect_hosts"}
                text = await resp.text()
                assert not any(word in text for word in ("requests_total", "127.0.0", "bucket", "AKIA")), text
            assert hits == Counter()
            assert "127.0.0.2" in caplog.text and "s3://internal-bucket.corp/blob" in caplog.text
            assert "AKIA" not in caplog.text and "s3cret" not in caplog.text


async def test_a_listed_cdn_is_followed_without_authorization(tmp_path: Path) -> None:
    seen: list[str | None] = []

    async def cdn(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return manifest_response()

    async with served({"/cdn/{tail:.*}": cdn}, host="127.0.0.2") as cdn_server:

        async def manifest(request: web.Request) -> web.Response:
            raise web.HTTPTemporaryRedirect(str(cdn_server.make_url("/cdn/m")))

        async with served({"/v2/team/app/manifests/{tag}": manifest}) as upstream:
            listed = f"127.0.0.2:{cdn_server.port}"  # the rig's CDN is on another loopback address and port
            up = {"name": "docker.io", "url": str(upstream.make_url("")), "redirect_hosts": [listed]}
            async with mirror(tmp_path, up) as client:
                resp = await client.get("/v2/team/app/manifests/1", headers={"Authorization": "Basic eDp5"})
                assert resp.status == 200 and await resp.read() == MANIFEST
        assert seen == [None]


async def test_internal_addresses_are_refused_even_when_listed(tmp_path: Path) -> None:
    """A loopback upstream (the rig) may send us to loopback, never to link-local (cloud metadata)
    or private addresses; no connection is even tried."""

    async def manifest(request: web.Request) -> web.Response:
        raise web.HTTPFound(
            {"0": "http://169.254.169.254/latest/meta-data/", "1": "http://10.1.2.3/x"}[request.match_info["tag"]]
        )

    async with served({"/v2/team/app/manifests/{tag}": manifest}) as upstream:
        up = {"name": "docker.io", "url": str(upstream.make_url("")), "redirect_hosts": ["169.254.169.254", "10.1.2.3"]}
        async with mirror(tmp_path, up) as client:
            for tag in ("0", "1"):
                resp = await client.get(f"/v2/team/app/manifests/{tag}")
                error = await error_of(resp)
                assert resp.status == 502 and "address" in error["message"], error
                assert "169.254" not in json.dumps(error) and "10.1.2.3" not in json.dumps(error)


async def test_names_are_checked_on_the_address_connected_to() -> None:
    """The guard is the session's resolver: a listed name that resolves to a link-local address is
    refused when connecting; one that resolves to loopback (like the upstream) is followed."""

    async def blob(request: web.Request) -> web.Response:
        return manifest_response()

    async with served({"/cdn/{tail:.*}": blob}) as cdn:

        async def manifest(request: web.Request) -> web.Response:
            raise web.HTTPFound(f"http://cdn.test:{cdn.port}/cdn/m")

        async with served({"/v2/team/app/manifests/{tag}": manifest}) as upstream:
            config = UpstreamConfig(
                name="r.test", url=str(upstream.make_url("")), redirect_hosts=[f"cdn.test:{cdn.port}"]
            )
            for address, allowed in (("169.254.169.254", False), ("127.0.0.1", True)):
                guard = AddressGuard("127.0.0.1", inner=ScriptedResolver({"cdn.test": [[address]]}))
                connector = aiohttp.TCPConnector(resolver=guard, use_dns_cache=False)
                async with aiohttp.ClientSession(connector=connector) as session:
                    client = UpstreamClient(config, session, guard=guard)
                    if allowed:
                        resp = await client.open("GET", "team/app", "/v2/team/app/manifests/1")
                        async with resp:
                            assert resp.status == 200 and await resp.read() == MANIFEST
                    else:
                        with pytest.raises(UpstreamInvalid, match="address"):
                            await client.open("GET", "team/app", "/v2/team/app/manifests/1")


async def test_the_guard_keeps_public_addresses_and_the_upstreams_own_kind() -> None:
    answers = {
        "registry.test": [["93.184.216.34"]],
        "cdn.test": [["93.184.216.35"], ["127.0.0.1"]],  # DNS rebinding: public when first asked, then loopback
        "mixed.test": [["10.0.0.1", "93.184.216.36"]],
        "proxy.corp": [["10.9.9.9"]],
    }
    guard = AddressGuard("registry.test", frozenset({"proxy.corp"}), ScriptedResolver(answers))
    assert [r["host"] for r in await guard.resolve("registry.test")] == ["93.184.216.34"]
    assert [r["host"] for r in await guard.resolve("cdn.test")] == ["93.184.216.35"]
    with pytest.raises(ForbiddenAddress, match="loopback"):
        await guard.resolve("cdn.test")
    assert [r["host"] for r in await guard.resolve("mixed.test")] == ["93.184.216.36"]
    assert [r["host"] for r in await guard.resolve("proxy.corp")] == ["10.9.9.9"]  # the operator's egress proxy
    for literal in ("127.0.0.1", "[::1]", "::ffff:127.0.0.1", "169.254.169.254", "0.0.0.0", "10.0.0.1", "fd00::1"):
        with pytest.raises(ForbiddenAddress):
            guard.check_literal(literal)
    guard.check_literal("93.184.216.34")
    guard.check_literal("cdn.test")  # names are checked when resolved

    private = AddressGuard(
        "registry.internal",
        inner=ScriptedResolver({"registry.internal": [["10.0.0.5"]], "s3.internal": [["10.0.0.6"]]}),
    )
    await private.resolve("registry.internal")
    assert [r["host"] for r in await private.resolve("s3.internal")] == ["10.0.0.6"]  # a private registry's own storage
    with pytest.raises(ForbiddenAddress):
        private.check_literal("169.254.169.254")
    assert address_kind("fe80::1%eth0") == "link-local"


def test_docker_hub_redirects_to_its_cdns_out_of_the_box() -> None:
    policy = RedirectPolicy(UpstreamConfig(name="docker.io", url="https://registry-1.docker.io"))
    for url in (
        "https://production.cloudflare.docker.com/registry-v2/docker/registry/v2/blobs/sha256/aa/aa/data?verify=1",
        "https://production.cloudfront.docker.com/x",
        "https://d2iks1dkcwqcbx.cloudfront.net/x",
        "https://docker-images-prod.6aa30f8b08e16409b46e0173d6de2f56.r2.cloudflarestorage.com/registry-v2/x",
        "https://registry-1.docker.io/v2/library/alpine/blobs/sha256:aa",
    ):
        policy.check(url)
    for url in (
        "http://production.cloudflare.docker.com/x",  # no downgrade from https
        "https://registry-1.docker.io:8443/x",  # its own host, another port
        "https://metadata.google.internal/computeMetadata/v1/",
        "https://127.0.0.1/x",
        "file:///etc/passwd",
    ):
        with pytest.raises(UpstreamInvalid):
            policy.check(url)
    other = RedirectPolicy(
        UpstreamConfig(name="r.test", url="https://registry.example.com", redirect_hosts=["cdn.example.net:8443"])
    )
    other.check("https://auth.example.com/x")  # its token realm hosts
    other.check("https://cdn.example.net:8443/x")
    with pytest.raises(UpstreamInvalid, match="redirect_hosts"):
        other.check("https://production.cloudflare.docker.com/x")  # Docker Hub's CDNs are Docker Hub's only


@pytest.mark.parametrize(
    "body",
    [
        STATS,
        {"schemaVersion": 2},
        {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []},  # no config
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [{"digest": 5}]},
        {"schemaVersion": 1, "name": "x"},
        {"mediaType": "application/vnd.example+json", "whatever": 1},
        [CONFIG],
    ],
)
def test_json_that_is_not_a_manifest_is_refused(body: object) -> None:
    for content_type in (None, OCI_MANIFEST, "application/json"):
        with pytest.raises(ValueError):
            media_type_of(content_type, json.dumps(body).encode())
    with pytest.raises(ValueError):
        media_type_of(None, b"[" * 100_000 + b"]" * 100_000)


@pytest.mark.parametrize(
    "media_type", ["text/html", "application/x; charset=utf-8", "application/x\r\nSet-Cookie: a=b"]
)
def test_a_manifest_names_an_application_type_or_is_refused(media_type: str) -> None:
    """A manifest is served with its own media type as Content-Type: `text/html` (from a bundle or an
    upstream, with a config to pass as an artifact) was a page with script on the mirror's origin."""
    document = {"schemaVersion": 2, "mediaType": media_type, "config": CONFIG, "x": "<script>alert(1)</script>"}
    for content_type in (None, "application/json", "text/html"):
        with pytest.raises(ValueError, match="application/"):
            media_type_of(content_type, json.dumps(document).encode())
    # Declared by the upstream as a known type, it is served as that type.
    assert media_type_of(OCI_MANIFEST, json.dumps(document).encode()) == OCI_MANIFEST


def test_manifests_of_every_known_kind_are_accepted() -> None:
    layer = {**CONFIG, "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"}
    child = {"mediaType": DOCKER_MANIFEST, "digest": "sha256:" + "b" * 64, "size": 9, "platform": {"os": "linux"}}
    cases = [
        (DOCKER_MANIFEST, {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "config": CONFIG, "layers": [layer]}),
        (DOCKER_LIST, {"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": [child]}),
        (OCI_MANIFEST, {"schemaVersion": 2, "config": CONFIG, "layers": [layer]}),
        (OCI_INDEX, {"schemaVersion": 2, "manifests": []}),
        (
            OCI_MANIFEST,
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": "application/vnd.example.sbom",
                "config": {**CONFIG, "mediaType": "application/vnd.oci.empty.v1+json"},
                "layers": [layer],
            },
        ),
        (
            "application/vnd.oci.artifact.manifest.v1+json",
            {"schemaVersion": 2, "mediaType": "application/vnd.oci.artifact.manifest.v1+json", "blobs": [layer]},
        ),
        (DOCKER_SCHEMA1_SIGNED, {"schemaVersion": 1, "name": "x", "tag": "1", "fsLayers": [], "signatures": []}),
    ]
    for expected, document in cases:
        assert media_type_of(None, json.dumps(document).encode()) == expected


async def test_a_non_manifest_is_neither_served_nor_cached(tmp_path: Path) -> None:
    answers = [web.json_response(STATS, content_type=OCI_MANIFEST), manifest_response()]

    async def manifest(request: web.Request) -> web.Response:
        return answers.pop(0)

    async with (
        served({"/v2/team/app/manifests/{tag}": manifest}) as upstream,
        mirror(tmp_path, {"name": "docker.io", "url": str(upstream.make_url(""))}) as client,
    ):
        resp = await client.get("/v2/team/app/manifests/1")
        assert resp.status == 502 and "requests_total" not in json.dumps(await error_of(resp))
        resp = await client.get("/v2/team/app/manifests/1")
        assert resp.status == 200 and await resp.read() == MANIFEST  # asked again: nothing was cached
        assert resp.headers["X-Content-Type-Options"] == "nosniff"  # no browser takes content for a page
