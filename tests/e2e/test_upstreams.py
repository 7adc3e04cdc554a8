"""Two Docker Hub-like upstreams behind one cargohold: routed by path prefix, containerd's `ns` and
the Host header; each upstream's credentials and tokens stay with it; one cache for both."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from conftest import HUB2_USER
from rig.clients import Containerd, Dockerd, ensure_hosts_entries, skopeo_copy, write_hosts_toml
from rig.hub import Hub
from rig.server import Cargohold
from rig.util import CommandError, http_request, wait_until

HUB2 = "hub2.test"  # the registry name clients use for the second hub
HUB2_HOST = "hub2.mirror.test"  # a host name of cargohold that means the second hub


def _start(cargohold: Callable[..., Cargohold], hub: Hub, hub2: Hub, **hub2_extra: Any) -> Cargohold:
    """cargohold with Docker Hub (the first hub, anonymous) and hub2.test (with credentials)."""
    return cargohold(
        upstreams=[
            {"name": "docker.io", "url": hub.url, "tag_ttl": "10m"},
            {
                "name": HUB2,
                "url": hub2.url,
                "username": HUB2_USER[0],
                "password": HUB2_USER[1],
                "hosts": [HUB2_HOST],
                "repositories": ["team/*", "mirror/*"],
                **hub2_extra,
            },
        ]
    )


def _error(ch: Cargohold, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    res = http_request("GET", ch.url + path, headers=headers)
    body = res.json()
    assert isinstance(body, dict)
    return res.status, body["errors"][0]["code"]


def _audiences(hub: Hub) -> set[str]:
    """The `aud` of every Bearer token that reached a hub's registry (which token service minted it)."""
    found = set()
    for r in hub.requests_matching(has_auth=True):
        scheme, _, token = r.headers["authorization"].partition(" ")
        assert scheme == "Bearer", r.headers["authorization"][:20]
        found.add(jwt.decode(token, options={"verify_signature": False})["aud"])
    return found


@pytest.fixture(scope="module")
def hub2_host_name() -> str:
    """HUB2_HOST resolves to 127.0.0.1 (as a DNS name pointing at cargohold would)."""
    if os.geteuid() != 0:
        pytest.skip("editing /etc/hosts needs root")
    ensure_hosts_entries([HUB2_HOST])
    return HUB2_HOST


def test_path_prefix_with_skopeo_keeps_each_upstreams_credentials(
    hub: Hub, hub2: Hub, cargohold: Callable[..., Cargohold], tmp_path: Path
) -> None:
    ch = _start(cargohold, hub, hub2)
    app, secret, tool = hub2.images["app"], hub2.images["secret"], hub.images["oci"]
    assert skopeo_copy(f"{ch.netloc}/{HUB2}/{app.ref}", tmp_path / "app").digest == app.digest
    assert skopeo_copy(f"{ch.netloc}/{HUB2}/{secret.ref}", tmp_path / "secret").digest == secret.digest
    assert skopeo_copy(f"{ch.netloc}/{tool.ref}", tmp_path / "tool").digest == tool.digest
    # hub's private repo: cargohold has no credentials for hub, so hub2's are not tried there
    assert _error(ch, f"/v2/{hub.images['private'].repo}/manifests/latest") == (404, "MANIFEST_UNKNOWN")

    # each hub saw only its own repositories
    assert {r.path.split("/")[2] for r in hub.requests_matching(path_regex=r"^/v2/.+/")} == {"acme"}
    assert {r.path.split("/")[2] for r in hub2.requests_matching(path_regex=r"^/v2/.+/")} == {"team"}
    # hub2's password went to hub2's token service only; hub never got any credentials
    assert {r.user for r in hub2.token_requests} == {HUB2_USER[0]}
    assert hub.token_requests and not any(r.has_auth or r.user for r in hub.token_requests)
    basic = base64.b64encode(f"{HUB2_USER[0]}:{HUB2_USER[1]}".encode()).decode()
    assert not any(basic in value for r in hub.requests for value in r.headers.values())
    # and every token a registry saw was minted by its own token service
    assert _audiences(hub) == {"registry.docker.io"}
    assert _audiences(hub2) == {HUB2}


def test_docker_by_path_prefix_and_as_docker_hub_mirror(
    hub: Hub, hub2: Hub, cargohold: Callable[..., Cargohold], dockerd: Dockerd
) -> None:
    ch = _start(cargohold, hub, hub2)
    app = hub2.images["app"]
    assert dockerd.pull(f"{ch.netloc}/{HUB2}/{app.ref}") == app.digest
    dockerd.reconfigure(mirrors=[ch.url])
    assert dockerd.pull("multiarch-test") == hub.images["manifestlist"].digest
    assert hub2.manifest_count(repo="library/multiarch-test") == 0
    assert hub.manifest_count(repo=app.repo) == 0 and hub2.manifest_count(repo=app.repo) >= 1
    assert "/v2/library/multiarch-test/manifests/latest" in {r.path for r in hub.requests}


def test_containerd_ns_with_default_and_per_registry_hosts_toml(
    hub: Hub, hub2: Hub, cargohold: Callable[..., Cargohold], containerd: Containerd, tmp_path: Path
) -> None:
    ch = _start(cargohold, hub, hub2)
    everything = tmp_path / "default"
    write_hosts_toml(everything, ch.url, registry="_default")
    app, tool = hub2.images["app"], hub.images["oci"]
    assert containerd.pull(f"{HUB2}/{app.ref}", hosts_dir=everything).digest == app.digest
    assert containerd.pull(f"docker.io/{tool.ref}", hosts_dir=everything).digest == tool.digest
    one = tmp_path / "one"
    write_hosts_toml(one, ch.url, registry=HUB2)
    mirrored = hub2.images["tool"]
    assert containerd.pull(f"{HUB2}/{mirrored.ref}", hosts_dir=one).digest == mirrored.digest
    assert f"ns={HUB2}" in ch.log_text() and "ns=docker.io" in ch.log_text()
    assert hub.manifest_count(repo=app.repo) == 0 and hub2.manifest_count(repo=tool.repo) == 0
    # an ns-scoped answer names its namespace (errors too); a path-prefixed one does not
    ok = http_request(
        "HEAD", f"{ch.url}/v2/{app.repo}/manifests/{app.tag}?ns={HUB2}", headers={"Accept": app.media_type}
    )
    assert ok.status == 200 and ok.header("OCI-Namespace") == HUB2
    missing = http_request("GET", f"{ch.url}/v2/{app.repo}/manifests/nope?ns={HUB2}")
    assert missing.status == 404 and missing.header("OCI-Namespace") == HUB2
    assert http_request("HEAD", f"{ch.url}/v2/{HUB2}/{app.repo}/manifests/{app.tag}").header("OCI-Namespace") is None


def test_host_name_routes_to_its_upstream(
    hub: Hub, hub2: Hub, cargohold: Callable[..., Cargohold], hub2_host_name: str, tmp_path: Path
) -> None:
    ch = _start(cargohold, hub, hub2)
    app = hub2.images["app"]
    assert skopeo_copy(f"{hub2_host_name}:{ch.port}/{app.ref}", tmp_path / "app").digest == app.digest
    # the same path under cargohold's other names is Docker Hub's (where team/app does not exist)
    assert _error(ch, f"/v2/{app.repo}/manifests/{app.tag}") == (404, "MANIFEST_UNKNOWN")
    res = http_request(
        "HEAD", f"{ch.url}/v2/{app.repo}/manifests/{app.tag}", headers={"Host": f"{HUB2_HOST}:{ch.port}"}
    )
    assert res.status == 200 and res.header("Docker-Content-Digest") == app.digest
    manifests = rf"^/v2/{app.repo}/manifests/"
    assert hub.count("GET", manifests, status=404) == 1 and hub.count("GET", manifests, status=200) == 0
    assert hub2.count("GET", manifests, status=200) == 1  # the HEAD by host name was a cache hit


def test_unconfigured_registries_and_repositories_are_refused_without_asking_upstream(
    hub: Hub, hub2: Hub, cargohold: Callable[..., Cargohold], containerd: Containerd, tmp_path: Path
) -> None:
    ch = _start(cargohold, hub, hub2)
    for path in [
        "/v2/quay.io/org/app/manifests/1.0",
        "/v2/org/app/manifests/1.0?ns=quay.io",
        "/v2/localhost:5000/app/manifests/1.0",
        f"/v2/{HUB2}/other/app/manifests/1.0",  # outside hub2's repositories globs
        f"/v2/{HUB2}/team/deep/app/blobs/sha256:{'0' * 64}",
    ]:
        assert _error(ch, path) == (404, "NAME_UNKNOWN"), path
    with pytest.raises(CommandError):
        skopeo_copy(f"{ch.netloc}/quay.io/org/app:1.0", tmp_path / "quay")
    write_hosts_toml(tmp_path / "hosts", ch.url, registry="_default")
    with pytest.raises(CommandError):
        containerd.pull("quay.io/org/app:1.0", hosts_dir=tmp_path / "hosts")
    assert hub.requests == [] and hub2.requests == []
    assert "quay.io" in ch.log_text() and " 404 " in ch.log_text()


def test_a_blob_both_upstreams_hold_is_stored_once_and_linked_per_repository(
    hub: Hub, hub2: Hub, cargohold: Callable[..., Cargohold], tmp_path: Path
) -> None:
    ch = _start(cargohold, hub, hub2)
    tool, mirrored = hub.images["oci"], hub2.images["tool"]
    assert tool.digest == mirrored.digest  # the same bytes in both upstreams
    skopeo_copy(f"{ch.netloc}/{tool.ref}", tmp_path / "one")
    skopeo_copy(f"{ch.netloc}/{HUB2}/{mirrored.ref}", tmp_path / "two")
    stored = {f"sha256:{p.name}" for p in (ch.data_dir / "blobs" / "sha256").glob("*/*")}
    assert stored == {tool.digest, *tool.blob_digests}  # one file per digest
    # hub2 was asked whether its repository holds each cached blob (HEAD), never for the bytes
    assert hub2.blob_count("GET") == 0 and hub2.count("HEAD", r"/blobs/", status=200) == len(tool.blobs)
    assert hub.count("GET", r"/blobs/", status=200) == len(tool.blobs)
    skopeo_copy(f"{ch.netloc}/{HUB2}/{mirrored.ref}", tmp_path / "three")
    assert hub2.count("HEAD", r"/blobs/", status=200) == len(tool.blobs)  # linked now: no more questions


def test_cached_content_is_not_served_to_a_repository_that_does_not_hold_it(
    hub: Hub, hub2: Hub, cargohold: Callable[..., Cargohold], tmp_path: Path
) -> None:
    ch = _start(cargohold, hub, hub2)
    secret, app, tool = hub2.images["secret"], hub2.images["app"], hub.images["oci"]
    skopeo_copy(f"{ch.netloc}/{HUB2}/{secret.ref}", tmp_path / "secret")  # cached with hub2's credentials
    skopeo_copy(f"{ch.netloc}/{tool.ref}", tmp_path / "tool")
    hub.reset_counts()
    hub2.reset_counts()
    layer = secret.layers[0].digest
    # through the other upstream, and through another repository of the same upstream
    assert _error(ch, f"/v2/{tool.repo}/blobs/{layer}") == (404, "BLOB_UNKNOWN")
    assert _error(ch, f"/v2/{HUB2}/{app.repo}/blobs/{layer}") == (404, "BLOB_UNKNOWN")
    assert _error(ch, f"/v2/{tool.repo}/manifests/{secret.digest}") == (404, "MANIFEST_UNKNOWN")
    assert _error(ch, f"/v2/{HUB2}/{app.repo}/blobs/{tool.layers[0].digest}") == (404, "BLOB_UNKNOWN")
    assert http_request("HEAD", f"{ch.url}/v2/{tool.repo}/blobs/{layer}").status == 404
    assert hub.count("HEAD", rf"^/v2/{tool.repo}/") == 3 and hub.count("GET") == 0
    assert hub2.count("HEAD", rf"^/v2/{app.repo}/blobs/") == 2 and hub2.count("GET") == 0
    # the repository that holds it still gets it from the cache
    res = http_request("GET", f"{ch.url}/v2/{HUB2}/{secret.repo}/blobs/{layer}")
    assert res.status == 200 and res.body == secret.layers[0].data
    assert hub2.count("GET") == 0


async def _body(session: aiohttp.ClientSession, url: str) -> bytes:
    async with session.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.read()


async def test_a_download_in_flight_is_joined_through_another_repository_only_once_confirmed(
    hub: Hub, hub2: Hub, cargohold: Callable[..., Cargohold]
) -> None:
    ch = _start(cargohold, hub, hub2)
    tool, mirrored, app = hub.images["oci"], hub2.images["tool"], hub2.images["app"]
    layer = tool.layers[0]
    # the manifest first, so cargohold holds a token and the held blob GET is the authorized one
    assert http_request("GET", f"{ch.url}/v2/{tool.repo}/manifests/{tool.tag}").status == 200
    fault = hub.inject(method="GET", path_regex=rf"/blobs/{layer.digest}$", hold_after=64)
    async with aiohttp.ClientSession() as session:
        first = asyncio.create_task(_body(session, f"{ch.url}/v2/{tool.repo}/blobs/{layer.digest}"))
        await asyncio.to_thread(fault.wait_waiting, 1)
        async with session.get(f"{ch.url}/v2/{HUB2}/{app.repo}/blobs/{layer.digest}") as denied:
            assert denied.status == 404 and (await denied.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
        second = asyncio.create_task(_body(session, f"{ch.url}/v2/{HUB2}/{mirrored.repo}/blobs/{layer.digest}"))
        head = rf"^/v2/{mirrored.repo}/blobs/{layer.digest}$"
        await asyncio.to_thread(wait_until, lambda: hub2.count("HEAD", head, status=200) == 1, timeout=20)
        fault.release()
        assert await first == await second == layer.data
    assert hub.blob_count("GET", layer.digest) == 1
    assert hub2.blob_count("GET") == 0


def test_unconfirmed_cached_content_is_not_served_while_its_upstream_is_down(
    hub: Hub, hub2: Hub, cargohold: Callable[..., Cargohold]
) -> None:
    ch = _start(cargohold, hub, hub2, failure_pause="0s")  # recovery is checked right after the outage
    tool, mirrored = hub.images["oci"], hub2.images["tool"]
    layer = tool.layers[0]
    assert http_request("GET", f"{ch.url}/v2/{tool.repo}/blobs/{layer.digest}").body == layer.data
    with hub2.down():
        assert _error(ch, f"/v2/{HUB2}/{mirrored.repo}/blobs/{layer.digest}") == (503, "UNAVAILABLE")
    res = http_request("GET", f"{ch.url}/v2/{HUB2}/{mirrored.repo}/blobs/{layer.digest}")
    assert res.status == 200 and res.body == layer.data
    assert hub2.blob_count("GET") == 0 and hub2.count("HEAD", r"/blobs/", status=200) == 1
