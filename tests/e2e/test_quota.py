"""Issue 17: Docker Hub's pull quota, measured in the rig's hub (which counts manifest GETs per address or account
as Docker Hub does, sends the ratelimit headers and answers 429 when they are spent), and content mirrors (`hub2`,
holding some of the hub's images under the same names) that serve content by digest for zero pulls."""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable
from pathlib import Path

from cacheops import cli, metrics, pull, sample
from rig import images as I
from rig.clients import skopeo_copy
from rig.hub import Hub
from rig.server import Cargohold
from rig.util import http_request

Factory = Callable[..., Cargohold]


def _get_manifest(srv: Cargohold, repo: str, reference: str) -> tuple[int, dict[str, str], dict[str, object]]:
    res = http_request("GET", f"{srv.url}/v2/{repo}/manifests/{reference}", headers={"Accept": I.ACCEPT_ALL})
    error = json.loads(res.body)["errors"][0] if res.status != 200 else {}
    return res.status, {"Retry-After": res.header("Retry-After") or ""}, error


def _mirrored_manifests(srv: Cargohold, mirror: Hub, outcome: str) -> float:
    """cargohold's count of manifests asked of the content mirror, by outcome."""
    return sample(
        metrics(srv.url),
        "cargohold_content_requests_total",
        upstream="docker.io",
        source=mirror.netloc,
        kind="manifest",
        outcome=outcome,
    )


def test_a_multi_platform_pull_spends_what_a_direct_pull_does_and_a_second_client_none(
    hub: Hub, cargohold: Factory, tmp_path: Path
) -> None:
    image = hub.images["index"]
    hub.pull_limit = 100  # the rig's quota on: counted and announced like Docker Hub's
    skopeo_copy(f"{hub.netloc}/{image.ref}", tmp_path / "direct")
    direct = hub.pulls()
    hub.reset_counts()
    srv = cargohold()
    pull(srv, image.ref, tmp_path)
    first = hub.pulls()
    hub.reset_counts()
    pull(srv, image.ref, tmp_path)  # a second client within tag_ttl
    assert (direct, first, hub.pulls()) == (2, 2, 0)  # index + this platform's manifest, then nothing
    assert hub.count(service=None) == 0
    assert sample(metrics(srv.url), "cargohold_upstream_pulls_total", upstream="docker.io", account="anonymous") == 2


def test_head_revalidation_spends_no_pull(hub: Hub, cargohold: Factory, tmp_path: Path) -> None:
    hub.pull_limit = 100
    srv = cargohold(tag_ttl="0s")  # every pull revalidates the tag: what is measured here
    image = hub.images["index"]
    pull(srv, image.ref, tmp_path)
    hub.reset_counts()
    for _ in range(3):
        pull(srv, image.ref, tmp_path)
    assert hub.pulls() == 0 and hub.count("HEAD", r"/manifests/") == 3


def test_at_the_reserve_warm_defers_and_says_so_while_clients_still_pull(
    hub: Hub, cargohold: Factory, tmp_path: Path
) -> None:
    hub.pull_limit = 3  # the default reserve, 10%, is one pull of three
    srv = cargohold()
    pull(srv, hub.images["oci"].ref, tmp_path)
    pull(srv, hub.images["multi"].ref, tmp_path)  # one pull left: the reserve
    assert hub.pulls() == 2
    warm = cli(srv, "warm", hub.images["layers21"].ref, check=False)
    assert warm.returncode == 75, warm.stderr
    assert "deferred" in warm.stderr and "reserve" in warm.stderr
    assert hub.pulls() == 2  # warm spent nothing
    assert srv.log_text().count("at the reserve") == 1
    pull(srv, hub.images["layers21"].ref, tmp_path)  # a waiting client gets the last pull
    assert hub.pulls() == 3
    page = http_request("GET", f"{srv.url}/").body.decode()
    assert "<td>0 of 3</td>" in page and '<td class="spent">3 in 6h</td>' in page


def test_at_zero_cached_content_still_pulls_and_cold_gets_429_with_retry_after(
    hub: Hub, cargohold: Factory, tmp_path: Path
) -> None:
    hub.pull_limit = 1
    srv = cargohold()
    oci = hub.images["oci"]
    pull(srv, oci.ref, tmp_path)
    pull(srv, oci.ref, tmp_path)  # cached: no pull needed
    status, headers, error = _get_manifest(srv, "acme/big", "latest")
    assert (status, error["code"], headers["Retry-After"]) == (429, "TOOMANYREQUESTS", "3600")  # upstream's
    assert hub.count("GET", r"/manifests/", status=429) == 1
    status, headers, error = _get_manifest(srv, "acme/layers21", "latest")
    assert status == 429 and error["code"] == "TOOMANYREQUESTS" and 3590 <= int(headers["Retry-After"]) <= 3600
    assert hub.count("GET", r"/manifests/", status=429) == 1  # not asked again until then
    head = http_request("HEAD", f"{srv.url}/v2/acme/big/manifests/latest", headers={"Accept": I.ACCEPT_ALL})
    assert head.status == 200  # a HEAD is free: still asked
    pull(srv, oci.ref, tmp_path)
    assert "Traceback" not in srv.log_text()


def test_a_content_mirror_serves_a_cold_pull_for_zero_pulls_and_never_sees_credentials(
    hub: Hub, hub2: Hub, cargohold: Factory, tmp_path: Path
) -> None:
    image = hub.images["index"]
    hub2.push_image(image, image.repo, image.tag)  # the mirror holds it under the same name
    hub.pull_limit = 100
    hub2.reset_counts()
    # Upstream credentials set: what is tested is that they never reach the content mirror.
    srv = cargohold(upstream={"content_mirrors": [hub2.url], "username": "pusher", "password": "pushpass"})
    pull(srv, image.ref, tmp_path)
    assert hub.pulls() == 0 and hub.count("HEAD", r"/manifests/", status=200) == 1  # the tag, by HEAD
    assert hub2.count("GET", r"/manifests/sha256:", status=200) == 2  # the index and this platform's manifest
    assert hub2.token_requests and all(r.user is None for r in hub2.token_requests)
    assert not any(r.headers.get("authorization", "").lower().startswith("basic") for r in hub2.requests)
    assert _mirrored_manifests(srv, hub2, "served") == 2
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub2.requests_matching("GET", r"/blobs/", status=200)}
    platform = next(
        child for child in image.children if child.digest in {r.path.rsplit("/", 1)[-1] for r in hub2.requests}
    )
    assert hub.blob_count("GET") == 0 and fetched == set(platform.blob_digests)  # the blobs came from the mirror too
    hub.reset_counts()
    hub2.reset_counts()
    pull(srv, image.ref, tmp_path)  # cached now
    assert hub.count(service=None) == 0 and hub2.count(service=None) == 0


def test_a_content_mirror_serving_a_wrong_manifest_is_caught_and_the_upstream_serves_it(
    hub: Hub, hub2: Hub, cargohold: Factory, tmp_path: Path
) -> None:
    image = hub.images["oci"]
    hub2.push_image(image, image.repo, image.tag)
    hub.pull_limit = 100
    hub2.reset_counts()
    bad = hub2.inject(method="GET", path_regex=r"/manifests/sha256:", corrupt=True)
    srv = cargohold(upstream={"content_mirrors": [hub2.url]})  # the setting under test
    out = skopeo_copy(f"{srv.netloc}/{image.ref}", tmp_path / "first")
    assert out.digest == image.digest and out.manifest == image.manifest
    assert bad.hits >= 1 and hub.pulls() == 1  # the mirror's wrong bytes (after its 401), then the upstream's
    assert "content mirror" in srv.log_text()
    assert _mirrored_manifests(srv, hub2, "invalid") == 1
    hub.reset_counts()
    again = skopeo_copy(f"{srv.netloc}/{image.ref}", tmp_path / "again")  # what was cached is the right manifest
    assert again.manifest == image.manifest and hub.pulls() == 0


def test_a_content_mirror_serving_wrong_blob_bytes_is_caught_and_the_upstream_serves_the_retry(
    hub: Hub, hub2: Hub, cargohold: Factory
) -> None:
    image = hub.images["oci"]
    hub2.push_image(image, image.repo, image.tag)
    hub2.reset_counts()
    hub2.inject(method="GET", path_regex=r"/blobs/", corrupt=True)
    srv = cargohold(upstream={"content_mirrors": [hub2.url]})  # the setting under test
    blob = max(image.blobs, key=lambda b: b.size)
    url = f"{srv.url}/v2/{image.repo}/blobs/{blob.digest}"

    def upstream_gets() -> int:  # answered 200 (a token challenge comes first)
        return hub.count("GET", rf"/blobs/{blob.digest}$", status=200)

    try:
        first = http_request("GET", url)
        assert first.status != 200 or first.body != blob.read_bytes()
    except (OSError, http.client.HTTPException):
        pass  # cut before the last byte: no client gets a complete body of wrong content
    assert hub.blob_count("GET", blob.digest) == 0  # the mirror's answer was the one tried
    retry = http_request("GET", url)
    assert retry.status == 200 and retry.body == blob.read_bytes()
    assert upstream_gets() == 1  # the upstream's bytes, the mirror not asked again
    assert hub2.count("GET", rf"/blobs/{blob.digest}$", status=200) == 1
    cached = http_request("GET", url)  # from the cache: what was verified
    assert cached.body == blob.read_bytes() and upstream_gets() == 1
    assert "Traceback" not in srv.log_text()
