"""A HEAD by tag or digest on a cold cache is asked upstream with a HEAD: Docker Hub's pull limit counts
manifest GETs only, so checking a tag (as containerd does before every pull) spends none."""

from __future__ import annotations

from collections.abc import Callable

from rig import images as I
from rig.hub import Hub
from rig.server import Cargohold
from rig.util import http_request

Factory = Callable[..., Cargohold]


def test_head_of_a_cold_tag_makes_no_upstream_get(hub: Hub, cargohold: Factory) -> None:
    srv = cargohold(tag_ttl="10m")
    im = hub.images["index"]
    url = f"{srv.url}/v2/{im.repo}/manifests/{im.tag}"
    hub.pull_limit = 0  # any manifest GET would be refused with 429, as by an exhausted Docker Hub
    head = http_request("HEAD", url, headers={"Accept": I.ACCEPT_ALL})
    assert head.status == 200 and head.body == b""
    assert head.header("Docker-Content-Digest") == im.digest
    assert head.header("Content-Length") == str(im.size)
    assert head.header("Content-Type") == im.media_type
    assert hub.manifest_count("GET") == 0 and hub.count("HEAD", r"/manifests/", status=200) == 1
    hexpart = im.digest.split(":", 1)[1]
    assert not (srv.data_dir / "blobs" / "sha256" / hexpart[:2] / hexpart).exists()  # no manifest cached

    missing = http_request("HEAD", f"{srv.url}/v2/{im.repo}/manifests/no-such-tag", headers={"Accept": I.ACCEPT_ALL})
    assert missing.status == 404 and hub.manifest_count("GET") == 0

    hub.pull_limit = None
    hub.reset_counts()
    get = http_request("GET", url, headers={"Accept": I.ACCEPT_ALL})  # a later GET fetches it, by digest
    assert get.status == 200 and get.body == im.manifest
    assert [r.path for r in hub.requests_matching("GET", r"/manifests/")] == [f"/v2/{im.repo}/manifests/{im.digest}"]
    hub.reset_counts()
    again = http_request("HEAD", url, headers={"Accept": I.ACCEPT_ALL})  # now a cache hit within tag_ttl
    assert again.status == 200 and again.header("Docker-Content-Digest") == im.digest
    assert again.header("Content-Length") == str(im.size)
    assert hub.count(service=None) == 0


def test_head_with_a_narrow_accept_passes_upstreams_answer(hub: Hub, cargohold: Factory) -> None:
    """A client taking one type only is answered what upstream answers that Accept, and nothing is remembered."""
    srv = cargohold(tag_ttl="10m")
    im = hub.images["oci"]
    hub.pull_limit = 0
    head = http_request("HEAD", f"{srv.url}/v2/{im.repo}/manifests/{im.tag}", headers={"Accept": im.media_type})
    assert head.status == 200 and head.header("Docker-Content-Digest") == im.digest
    assert head.header("Content-Type") == im.media_type and head.header("Content-Length") == str(im.size)
    accepts = {r.headers.get("accept") for r in hub.requests_matching("HEAD", r"/manifests/")}
    assert accepts == {im.media_type} and hub.manifest_count("GET") == 0
    hub.pull_limit = None
    get = http_request("GET", f"{srv.url}/v2/{im.repo}/manifests/{im.tag}", headers={"Accept": I.ACCEPT_ALL})
    assert get.status == 200 and get.body == im.manifest
    # The tag was not remembered from the narrow answer: the GET asks upstream by tag.
    assert [r.path for r in hub.requests_matching("GET", r"/manifests/")] == [f"/v2/{im.repo}/manifests/{im.tag}"]


def test_head_of_a_cold_digest_makes_no_upstream_get(hub: Hub, cargohold: Factory) -> None:
    """The same for a manifest by digest: upstream's HEAD answers it, a later GET fetches it once."""
    srv = cargohold(tag_ttl="10m")
    im = hub.images["oci"]
    url = f"{srv.url}/v2/{im.repo}/manifests/{im.digest}"
    hub.pull_limit = 0
    head = http_request("HEAD", url, headers={"Accept": I.ACCEPT_ALL})
    assert head.status == 200 and head.header("Docker-Content-Digest") == im.digest
    assert head.header("Content-Length") == str(im.size) and head.header("Content-Type") == im.media_type
    assert hub.manifest_count("GET") == 0 and hub.count("HEAD", r"/manifests/", status=200) == 1
    unknown = "sha256:" + "0" * 64
    missing = http_request("HEAD", f"{srv.url}/v2/{im.repo}/manifests/{unknown}", headers={"Accept": I.ACCEPT_ALL})
    assert missing.status == 404 and hub.manifest_count("GET") == 0
    hub.pull_limit = None
    get = http_request("GET", url, headers={"Accept": I.ACCEPT_ALL})
    assert get.status == 200 and get.body == im.manifest
    hub.reset_counts()
    again = http_request("HEAD", url, headers={"Accept": I.ACCEPT_ALL})  # cached now: nothing asked upstream
    assert again.status == 200 and again.header("Content-Length") == str(im.size)
    assert hub.count(service=None) == 0
