"""Real clients pull through cargohold from the Docker Hub-like hub; every cache rule is
checked by counting what reached the hub."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from cacheops import settled
from rig import images as I
from rig.clients import Containerd, Dockerd, skopeo_copy, write_hosts_toml
from rig.hub import Hub
from rig.server import Cargohold
from rig.util import http_request, wait_until

Factory = Callable[..., Cargohold]
MiB = 1 << 20


def _blob_file(srv: Cargohold, digest: str) -> Path:
    settled(srv)  # clients are served before the fsync and rename: wait for those
    hexpart = digest.split(":", 1)[1]
    return srv.data_dir / "blobs" / "sha256" / hexpart[:2] / hexpart


def _manifest_url(srv: Cargohold, im: I.Image, ref: str | None = None) -> str:
    return f"{srv.url}/v2/{im.repo}/manifests/{ref or im.tag}"


def _start_pull(srv: Cargohold, im: I.Image) -> None:
    """Fetch the manifest first, as clients do (it also settles the token dance), then count afresh."""
    res = http_request("GET", _manifest_url(srv, im), headers={"Accept": I.ACCEPT_ALL})
    assert res.status == 200, res.body


def _access_lines(srv: Cargohold, needle: str, count: int = 1) -> list[str]:
    """Access-log lines containing needle, once at least `count` are written (they follow the response)."""

    def found() -> list[str]:
        return [ln for ln in srv.log_text().splitlines() if "cargohold.access" in ln and needle in ln]

    wait_until(lambda: len(found()) >= count, timeout=10, what=f"{count} access-log line(s) with {needle!r}")
    return found()


def _error_code(body: bytes) -> str:
    return json.loads(body)["errors"][0]["code"]


# -- real clients get what upstream has -----------------------------------------------------------


@pytest.mark.parametrize("key", ["multi", "oci", "index", "manifestlist", "big"])
def test_skopeo_pull_gives_upstream_digests(hub: Hub, cargohold: Factory, tmp_path: Path, key: str) -> None:
    srv = cargohold()
    im = hub.images[key]
    got = skopeo_copy(f"{srv.netloc}/{im.ref}", tmp_path / "copy", all_platforms=im.is_index)
    assert got.digest == im.digest and got.manifest == im.manifest
    assert set(im.blob_digests) <= set(got.blobs)
    # Every blob was fetched once and is now in the cache, verified.
    for blob in im.blobs:
        assert hub.blob_count("GET", blob.digest) == 1
        assert I.file_digest(_blob_file(srv, blob.digest)) == blob.digest
    assert _access_lines(srv, "cache=miss")


def test_second_pull_within_ttl_makes_no_upstream_request(hub: Hub, cargohold: Factory, tmp_path: Path) -> None:
    srv = cargohold()
    im = hub.images["index"]
    skopeo_copy(f"{srv.netloc}/{im.ref}", tmp_path / "one", all_platforms=True)
    hub.reset_counts()
    again = skopeo_copy(f"{srv.netloc}/{im.ref}", tmp_path / "two", all_platforms=True)
    assert again.digest == im.digest
    assert hub.count(service=None) == 0
    assert _access_lines(srv, "cache=hit")


def test_a_pull_on_uvloop_over_plain_http_cold_and_warm(hub: Hub, cargohold: Factory, tmp_path: Path) -> None:
    """`loop: uvloop` (the setting this test is about) on plain HTTP: uvloop has no `loop.sendfile`, so
    files go out read and written, followed and cached alike."""
    srv = cargohold(overrides={"loop": "uvloop"})
    im = hub.images["big"]
    for where in ("cold", "warm"):
        got = skopeo_copy(f"{srv.netloc}/{im.ref}", tmp_path / where)
        assert got.digest == im.digest and set(im.blob_digests) <= set(got.blobs)
    assert ", event loop uvloop," in srv.log_text()
    assert _access_lines(srv, "cache=hit")


def test_one_component_names_get_library(hub: Hub, cargohold: Factory, tmp_path: Path) -> None:
    srv = cargohold()
    im = hub.images["multi"]  # library/alpine-test
    short = skopeo_copy(f"{srv.netloc}/alpine-test:latest", tmp_path / "short")
    hub.reset_counts()
    full = skopeo_copy(f"{srv.netloc}/library/alpine-test:latest", tmp_path / "full")
    assert short.digest == full.digest == im.digest
    assert hub.count(service=None) == 0  # the same cache entry


def test_dockerd_registry_mirror_pulls_through_cargohold(hub: Hub, cargohold: Factory, dockerd: Dockerd) -> None:
    srv = cargohold()
    dockerd.reconfigure(mirrors=[srv.url])
    mlist = hub.images["manifestlist"]  # library/multiarch-test, a Docker manifest list
    assert dockerd.pull("multiarch-test") == mlist.digest
    assert hub.blob_count("GET") == len(mlist.child(I.local_arch()).blobs)
    # Direct references through the mirror's address work too, the 128 MiB layer included.
    for key in ("oci", "big"):
        im = hub.images[key]
        assert dockerd.pull(f"{srv.netloc}/{im.ref}") == im.digest
    hub.reset_counts()
    dockerd.remove_all_images()
    assert dockerd.pull("multiarch-test") == mlist.digest
    assert hub.count(service=None) == 0


def test_containerd_pulls_through_hosts_toml_mirror(
    hub: Hub, cargohold: Factory, containerd: Containerd, hosts_dir: Path
) -> None:
    srv = cargohold()
    write_hosts_toml(hosts_dir, srv.url)
    for key in ("multi", "index", "layers21"):
        im = hub.images[key]
        pulled = containerd.pull(f"docker.io/{im.ref}", hosts_dir=hosts_dir)
        assert pulled.digest == im.digest and pulled.media_type == im.media_type
        want = im.child(I.local_arch()) if im.is_index else im
        assert all(pulled.content[b.digest] == b.size for b in want.blobs)
    assert "ns=docker.io" in srv.log_text()
    hub.reset_counts()
    im = hub.images["layers21"]
    assert containerd.pull(f"docker.io/{im.ref}", hosts_dir=hosts_dir).digest == im.digest
    assert hub.count(service=None) == 0


# -- single-flight ----------------------------------------------------------------------------------


async def _read_blob(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url) as resp:
        assert resp.status == 200, await resp.text()
        digest = hashlib.sha256()
        async for chunk in resp.content.iter_chunked(1 << 16):
            digest.update(chunk)
        return "sha256:" + digest.hexdigest()


async def test_twenty_clients_one_upstream_get(hub: Hub, cargohold: Factory) -> None:
    srv = cargohold()
    im = hub.images["big"]
    layer = im.layers[-1]  # the 128 MiB one
    _start_pull(srv, im)
    # Hold the one upstream download after 1 MiB so that every client joins it mid-flight.
    fault = hub.inject(method="GET", path_regex=r"/blobs/", hold_after=MiB)
    url = f"{srv.url}/v2/{im.repo}/blobs/{layer.digest}"
    async with aiohttp.ClientSession() as session:
        readers = [asyncio.create_task(_read_blob(session, url)) for _ in range(20)]
        await asyncio.to_thread(fault.wait_waiting, 1)
        await asyncio.sleep(0.5)  # let every client's request arrive (order, not timing, is asserted)
        fault.release()
        digests = await asyncio.wait_for(asyncio.gather(*readers), 300)
    assert digests == [layer.digest] * 20
    assert hub.blob_count("GET", layer.digest) == 1
    assert I.file_digest(_blob_file(srv, layer.digest)) == layer.digest


async def test_slow_or_gone_client_neither_slows_others_nor_cancels(hub: Hub, cargohold: Factory) -> None:
    srv = cargohold()
    layer = hub.images["big"].layers[-1]
    _start_pull(srv, hub.images["big"])
    url = f"{srv.url}/v2/acme/big/blobs/{layer.digest}"
    async with aiohttp.ClientSession() as session:
        slow = await session.get(url)
        first = await slow.content.readexactly(MiB)  # then stops reading
        gone = await session.get(url)
        await gone.content.readexactly(MiB)
        gone.close()  # disconnects mid-download
        assert await _read_blob(session, url) == layer.digest  # a fast client finishes meanwhile
        rest = hashlib.sha256(first)
        async for chunk in slow.content.iter_chunked(1 << 16):
            rest.update(chunk)
        slow.close()
    assert "sha256:" + rest.hexdigest() == layer.digest
    assert hub.blob_count("GET", layer.digest) == 1
    assert I.file_digest(_blob_file(srv, layer.digest)) == layer.digest


def test_download_survives_its_only_client_leaving(hub: Hub, cargohold: Factory) -> None:
    srv = cargohold()
    layer = hub.images["big"].layers[-1]
    _start_pull(srv, hub.images["big"])
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    conn.request("GET", f"/v2/acme/big/blobs/{layer.digest}")
    resp = conn.getresponse()
    assert resp.status == 200 and len(resp.read(MiB)) == MiB
    conn.close()
    wait_until(lambda: _blob_file(srv, layer.digest).exists(), timeout=120, what="the download to complete")
    assert I.file_digest(_blob_file(srv, layer.digest)) == layer.digest
    assert hub.blob_count("GET", layer.digest) == 1


# -- verification ------------------------------------------------------------------------------------


def _body_or_cut(url: str) -> bytes | None:
    """The body of a GET, or None when the server cut the connection before the end."""
    try:
        res = http_request("GET", url)
    except (OSError, http.client.HTTPException):
        return None
    return res.body if res.status == 200 else None


def test_corrupt_blob_is_never_cached_or_served(hub: Hub, cargohold: Factory, tmp_path: Path) -> None:
    srv = cargohold()
    im = hub.images["multi"]
    layer = im.layers[0]
    hub.inject(method="GET", path_regex=rf"/blobs/{layer.digest}$", corrupt=True)
    url = f"{srv.url}/v2/{im.repo}/blobs/{layer.digest}"
    for _ in range(2):  # neither the first client nor a later one gets the bad bytes whole
        assert _body_or_cut(url) is None
    assert not _blob_file(srv, layer.digest).exists()
    assert not any((srv.data_dir / "tmp").iterdir())
    assert "digest" in srv.log_text()
    hub.clear_faults()
    got = skopeo_copy(f"{srv.netloc}/{im.ref}", tmp_path / "ok")
    assert got.digest == im.digest
    assert I.file_digest(_blob_file(srv, layer.digest)) == layer.digest


def test_temp_files_left_by_a_crash_are_cleaned_at_start(cargohold: Factory) -> None:
    srv = cargohold()
    srv.stop()
    leftover = srv.data_dir / "tmp" / "partial-download"
    leftover.write_bytes(b"half a layer")
    srv.start()
    assert not leftover.exists()


# -- tags: TTL, HEAD revalidation, stale ------------------------------------------------------------


def _pull_manifest(srv: Cargohold, im: I.Image, accept: str = I.ACCEPT_ALL) -> tuple[int, bytes, dict[str, str]]:
    res = http_request("GET", _manifest_url(srv, im), headers={"Accept": accept})
    return res.status, res.body, res.headers


def test_tag_is_revalidated_with_head_after_ttl(hub: Hub, cargohold: Factory) -> None:
    srv = cargohold(tag_ttl="0s")
    oci, multi = hub.images["oci"], hub.images["multi"]
    hub.push_image(oci, "acme/moving", "current")
    moving = oci.pushed("acme/moving", "current")
    assert _pull_manifest(srv, moving)[0] == 200
    hub.reset_counts()
    status, body, headers = _pull_manifest(srv, moving)
    assert status == 200 and body == oci.manifest
    assert hub.manifest_count("HEAD") == 1 and hub.manifest_count("GET") == 0
    # A new digest behind the tag: one GET for the new manifest, then served.
    hub.push_image(multi, "acme/moving", "current")
    hub.reset_counts()
    status, body, headers = _pull_manifest(srv, moving)
    assert status == 200 and body == multi.manifest and headers["docker-content-digest"] == multi.digest
    assert hub.manifest_count("HEAD") == 1 and hub.manifest_count("GET") == 1


def test_moved_tag_keeps_old_digest_until_new_manifest_is_fetched(hub: Hub, cargohold: Factory) -> None:
    srv = cargohold(tag_ttl="0s", upstream={"failure_pause": "0s"})  # recovery is checked right after the fault
    oci, multi = hub.images["oci"], hub.images["multi"]
    hub.push_image(oci, "acme/flaky", "current")
    flaky = oci.pushed("acme/flaky", "current")
    assert _pull_manifest(srv, flaky)[1] == oci.manifest
    hub.push_image(multi, "acme/flaky", "current")
    hub.inject(method="GET", path_regex=r"/manifests/", status=500)  # HEAD sees the move, GET fails
    status, body, _ = _pull_manifest(srv, flaky)
    assert status == 200 and body == oci.manifest
    assert _access_lines(srv, "cache=stale")
    hub.clear_faults()
    assert _pull_manifest(srv, flaky)[1] == multi.manifest


def test_head_revalidation_does_not_spend_pull_limit(hub: Hub, cargohold: Factory) -> None:
    srv = cargohold(tag_ttl="0s")
    im = hub.images["oci"]
    _start_pull(srv, im)
    hub.pull_limit = 1  # one more manifest GET and Docker Hub would answer 429
    hub.reset_counts()
    for _ in range(5):
        assert _pull_manifest(srv, im)[0] == 200
    assert hub.manifest_count("HEAD") == 5 and hub.manifest_count("GET") == 0
    assert "cache=stale" not in srv.log_text()


def test_within_ttl_tags_need_no_upstream(hub: Hub, cargohold: Factory) -> None:
    srv = cargohold(tag_ttl="10m")
    im = hub.images["multi"]
    _pull_manifest(srv, im)
    hub.reset_counts()
    for _ in range(10):
        assert _pull_manifest(srv, im)[1] == im.manifest
    assert hub.count(service=None) == 0


@pytest.mark.parametrize("failure", ["down", "500", "429", "token"])
def test_stale_tag_is_served_when_upstream_fails(hub: Hub, cargohold: Factory, failure: str) -> None:
    srv = cargohold(tag_ttl="0s")
    im = hub.images["oci"]
    assert _pull_manifest(srv, im)[0] == 200
    if failure == "down":
        hub.set_down(True)
    elif failure == "token":
        hub.inject(service="token", status=503)
        # Fresh tokens are needed: a new process has none cached.
        srv.restart()
    else:
        hub.inject(path_regex=r"/manifests/", status=int(failure), headers={"Retry-After": "1"})
    status, body, headers = _pull_manifest(srv, im)
    assert status == 200 and body == im.manifest and headers["docker-content-digest"] == im.digest
    assert _access_lines(srv, "cache=stale")
    # A tag never seen before cannot be invented: a clear OCI error, not a hang or a traceback.
    res = http_request("GET", f"{srv.url}/v2/acme/tool/manifests/never-seen", headers={"Accept": I.ACCEPT_ALL})
    if failure == "429":  # issue 17: the upstream limiting us is passed on as such
        assert res.status == 429 and _error_code(res.body) == "TOOMANYREQUESTS"
    else:
        assert res.status in (502, 503, 504) and _error_code(res.body) in ("UNAVAILABLE", "UNKNOWN")
    hub.set_down(False)
    hub.clear_faults()


# -- negotiation and the registry API --------------------------------------------------------------


def test_content_type_is_the_manifests_own(hub: Hub, cargohold: Factory) -> None:
    srv = cargohold()
    for key in ("multi", "oci", "index", "manifestlist"):
        im = hub.images[key]
        status, body, headers = _pull_manifest(srv, im)
        assert status == 200 and body == im.manifest
        assert headers["content-type"] == im.media_type
        assert headers["docker-content-digest"] == im.digest
        head = http_request("HEAD", _manifest_url(srv, im), headers={"Accept": I.ACCEPT_ALL})
        assert head.status == 200 and head.headers["content-length"] == str(im.size)


def test_restrictive_accept_gets_what_upstream_answers(hub: Hub, cargohold: Factory) -> None:
    """A schema2-only client asking for a manifest list gets upstream's answer for that Accept."""
    srv = cargohold()
    mlist = hub.images["manifestlist"]
    _pull_manifest(srv, mlist)  # the list is cached now
    only_schema2 = "application/vnd.docker.distribution.manifest.v2+json"
    token = hub.get_token(f"repository:{mlist.repo}:pull")["token"]
    direct = http_request(
        "GET",
        f"{hub.url}/v2/{mlist.repo}/manifests/{mlist.tag}",
        headers={"Accept": only_schema2, "Authorization": f"Bearer {token}"},
    )
    status, body, headers = _pull_manifest(srv, mlist, accept=only_schema2)
    assert status == direct.status
    assert body == direct.body
    assert headers["content-type"] == direct.headers["content-type"]


async def _get_manifest_as(session: aiohttp.ClientSession, url: str, accept: str) -> tuple[int, bytes]:
    async with session.get(url, headers={"Accept": accept}) as resp:
        return resp.status, await resp.read()


async def test_clients_with_another_accept_cost_one_upstream_get(hub: Hub, cargohold: Factory) -> None:
    """Issue 21 item 8: twenty concurrent schema2-only GETs of a manifest-list tag are one upstream GET (a counted
    Docker Hub pull); a second round within tag_ttl is none."""
    srv = cargohold()
    mlist = hub.images["manifestlist"]
    _pull_manifest(srv, mlist)  # the list is cached under its tag
    only_schema2 = "application/vnd.docker.distribution.manifest.v2+json"
    hub.reset_counts()
    async with aiohttp.ClientSession() as session:
        for upstream_gets in (1, 1):  # the second round adds none
            answers = await asyncio.gather(
                *(_get_manifest_as(session, _manifest_url(srv, mlist), only_schema2) for _ in range(20))
            )
            assert len(set(answers)) == 1 and answers[0][0] == 200, answers[0]
            assert hub.count("GET", r"/manifests/", status=200) == upstream_gets
    assert json.loads(answers[0][1])["mediaType"] == only_schema2
    assert "Traceback" not in srv.log_text()


def test_client_listing_only_its_own_type_is_served_from_cache(hub: Hub, cargohold: Factory) -> None:
    srv = cargohold()
    im = hub.images["oci"]
    for _ in range(3):
        status, body, headers = _pull_manifest(srv, im, accept=im.media_type)
        assert status == 200 and body == im.manifest and headers["content-type"] == im.media_type
    assert hub.count("GET", r"/manifests/", status=200) == 1  # (the first 401 is the token dance)


def test_blob_head_range_and_headers(hub: Hub, cargohold: Factory) -> None:
    srv = cargohold()
    im = hub.images["multi"]
    layer = im.layers[0]
    url = f"{srv.url}/v2/{im.repo}/blobs/{layer.digest}"
    head = http_request("HEAD", url)  # uncached: size from upstream, nothing cached
    assert head.status == 200 and head.headers["content-length"] == str(layer.size)
    assert not _blob_file(srv, layer.digest).exists()
    full = http_request("GET", url)
    assert full.body == layer.read_bytes()
    hit = http_request("GET", url, headers={"Range": "bytes=10-19"})
    assert hit.status == 206 and hit.body == layer.read_bytes()[10:20]
    assert hit.headers["docker-content-digest"] == layer.digest
    assert layer.digest in hit.headers["etag"]
    bad = http_request("GET", url, headers={"Range": f"bytes={layer.size + 10}-"})
    assert bad.status == 416 and _error_code(bad.body) == "RANGE_INVALID"


def test_errors_are_oci_json(hub: Hub, cargohold: Factory) -> None:
    srv = cargohold()
    cases = [
        ("GET", "/v2/acme/tool/manifests/nope", 404, "MANIFEST_UNKNOWN"),
        ("GET", "/v2/acme/nothing-here/manifests/latest", 404, "MANIFEST_UNKNOWN"),
        ("GET", f"/v2/acme/tool/blobs/sha256:{'0' * 64}", 404, "BLOB_UNKNOWN"),
        ("GET", "/v2/acme/tool/blobs/sha256:xyz", 400, "DIGEST_INVALID"),
        ("GET", "/v2/Acme/Tool/manifests/latest", 400, "NAME_INVALID"),
        ("PUT", "/v2/acme/tool/manifests/1.0", 405, "UNSUPPORTED"),
        ("POST", "/v2/acme/tool/blobs/uploads/", 405, "UNSUPPORTED"),
        ("DELETE", f"/v2/acme/tool/blobs/sha256:{'0' * 64}", 405, "UNSUPPORTED"),
    ]
    for method, path, status, code in cases:
        res = http_request(method, srv.url + path, body=b"" if method in ("PUT", "POST") else None)
        assert (res.status, _error_code(res.body)) == (status, code), (method, path, res.body)
        assert res.headers["content-type"].startswith("application/json")
    assert "Traceback" not in srv.log_text()


def test_tags_list_passes_through(hub: Hub, cargohold: Factory) -> None:
    srv = cargohold()
    for tag in ("a1", "b2", "c3"):
        hub.push_tag("acme/tool", tag, hub.images["oci"])
    token = hub.get_token("repository:acme/tool:pull")["token"]
    direct = http_request("GET", f"{hub.url}/v2/acme/tool/tags/list", headers={"Authorization": f"Bearer {token}"})
    assert json.loads(http_request("GET", f"{srv.url}/v2/acme/tool/tags/list").body) == json.loads(direct.body)
    every = sorted(json.loads(direct.body)["tags"])
    assert set(every) <= {"1.0", "a1", "b2", "c3"}
    # The hub (distribution 2.x) ignores n and last: cargohold cuts the page the spec asks for.
    for query, want in (("?n=2", every[:2]), ("?n=2&last=a1", [t for t in every if t > "a1"][:2])):
        res = http_request("GET", f"{srv.url}/v2/acme/tool/tags/list{query}")
        assert res.status == 200 and json.loads(res.body)["tags"] == want
        if want[-1] != every[-1]:
            assert res.headers["link"].startswith("</v2/acme/tool/tags/list?")
    short = http_request("GET", f"{srv.url}/v2/alpine-test/tags/list")
    assert json.loads(short.body)["name"] == "library/alpine-test"


def test_ping_health_and_access_log(hub: Hub, cargohold: Factory) -> None:
    srv = cargohold()
    ping = http_request("GET", f"{srv.url}/v2/")
    assert ping.status == 200 and ping.headers["docker-distribution-api-version"] == "registry/2.0"
    assert http_request("GET", f"{srv.url}/health").status == 200
    im = hub.images["oci"]
    _pull_manifest(srv, im)
    _pull_manifest(srv, im)
    lines = _access_lines(srv, "/manifests/1.0", 2)
    assert len(lines) == 2 and "cache=miss" in lines[0] and "cache=hit" in lines[1]
    assert all(" 200 " in ln and "ms " in ln for ln in lines)


# -- upstream behaviour ------------------------------------------------------------------------------


def test_cdn_redirects_followed_without_authorization(hub: Hub, cargohold: Factory, tmp_path: Path) -> None:
    hub.redirect_blobs = True
    # redirect_hosts: the rig's CDN (standing for Docker Hub's, built in for docker.io) is on another
    # loopback address and port, which an upstream may redirect to only when listed
    srv = cargohold(upstream={"redirect_hosts": [f"{hub.cdn_host}:{hub.cdn_port}"]})
    im = hub.images["oci"]
    got = skopeo_copy(f"{srv.netloc}/{im.ref}", tmp_path / "copy")
    assert got.digest == im.digest
    assert len(hub.cdn_requests) == len(im.blobs)
    assert not any(r.has_auth for r in hub.cdn_requests)


def test_tokens_are_cached_per_scope(hub: Hub, cargohold: Factory, tmp_path: Path) -> None:
    srv = cargohold()
    im = hub.images["layers21"]
    skopeo_copy(f"{srv.netloc}/{im.ref}", tmp_path / "copy")
    # 23 requests upstream (manifest, config, 21 layers), one token for the one repository.
    assert hub.count(service="registry") >= 23
    assert len(hub.token_requests) == 1


def test_upstream_credentials_are_used(hub: Hub, cargohold: Factory, tmp_path: Path) -> None:
    im = hub.images["private"]
    anonymous = cargohold()
    res = http_request("GET", _manifest_url(anonymous, im), headers={"Accept": I.ACCEPT_ALL})
    assert res.status == 404 and _error_code(res.body) == "MANIFEST_UNKNOWN"
    srv = cargohold(upstream={"username": "pusher", "password": "pushpass"})
    got = skopeo_copy(f"{srv.netloc}/{im.ref}", tmp_path / "copy")
    assert got.digest == im.digest
    assert {r.user for r in hub.token_requests} >= {"pusher"}
    assert "pushpass" not in srv.log_text()
