"""The rig proves itself without cargohold: real clients pull straight from the hub, the
token service behaves like auth.docker.io, counting, redirects and faults work."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import jwt
import pytest

from rig import images as I
from rig.clients import Containerd, Dockerd, skopeo_copy, skopeo_inspect, write_hosts_toml
from rig.hub import Hub
from rig.server import Cargohold
from rig.util import CommandError, RigError, http_request

PUSHER = ("pusher", "pushpass")


def _bearer(hub: Hub, repo: str, actions: str = "pull", creds: tuple[str, str] | None = None) -> dict[str, str]:
    tok = hub.get_token(f"repository:{repo}:{actions}", creds=creds)["token"]
    return {"Authorization": f"Bearer {tok}"}


def _claims(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


# -- token service ------------------------------------------------------------------------------


def test_anonymous_token_grants_pull_only(hub: Hub) -> None:
    body = hub.get_token("repository:acme/tool:pull,push", "repository:library/alpine-test:pull")
    assert set(body) >= {"token", "access_token", "expires_in", "issued_at"}
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == 300
    claims = _claims(body["token"])
    assert claims["aud"] == "registry.docker.io"
    assert claims["exp"] - claims["iat"] == 300
    assert claims["access"] == [
        {"type": "repository", "name": "acme/tool", "actions": ["pull"]},
        {"type": "repository", "name": "library/alpine-test", "actions": ["pull"]},
    ]
    rec = hub.token_requests[-1]
    assert rec.param("scope") == ["repository:acme/tool:pull,push", "repository:library/alpine-test:pull"]
    assert not rec.has_auth


def test_user_gets_push_and_bad_password_is_refused(hub: Hub) -> None:
    claims = _claims(hub.get_token("repository:acme/tool:pull,push", creds=PUSHER)["token"])
    assert claims["sub"] == "pusher"
    assert claims["access"][0]["actions"] == ["pull", "push"]
    with pytest.raises(RigError, match="401"):
        hub.get_token("repository:acme/tool:pull", creds=("pusher", "wrong"))
    with pytest.raises(RigError, match="401"):
        hub.get_token("repository:acme/tool:pull", creds=("nobody", "x"))
    assert hub.count(service="token", status=401) == 2
    assert [r.user for r in hub.token_requests] == ["pusher", "pusher", "nobody"]


def test_token_post_oauth_flow(hub: Hub) -> None:
    form = (
        "grant_type=password&username=pusher&password=pushpass&service=registry.docker.io"
        "&scope=repository:acme/tool:pull&access_type=offline&client_id=rig"
    )
    res = http_request(
        "POST", hub.token_url, body=form.encode(), headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert res.status == 200, res.body
    body = res.json()
    assert _claims(body["access_token"])["access"][0]["actions"] == ["pull"]
    form2 = (
        f"grant_type=refresh_token&refresh_token={body['refresh_token']}"
        "&service=registry.docker.io&scope=repository:acme/tool:push"
    )
    res2 = http_request(
        "POST", hub.token_url, body=form2.encode(), headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert res2.status == 200 and _claims(res2.json()["access_token"])["sub"] == "pusher"


def test_token_ttl_is_configurable(hub: Hub) -> None:
    hub.token_ttl = 7
    body = hub.get_token("repository:acme/tool:pull")
    assert body["expires_in"] == 7
    c = _claims(body["token"])
    assert c["exp"] - c["iat"] == 7


def test_registry_validates_tokens(hub: Hub) -> None:
    im = hub.images["oci"]
    url = f"{hub.url}/v2/{im.repo}/manifests/{im.tag}"
    # no token: the challenge names our token service
    res = http_request("GET", url)
    assert res.status == 401
    chal = I.parse_challenge(res.header("WWW-Authenticate") or "")
    assert chal["realm"] == hub.token_url and chal["service"] == "registry.docker.io"
    assert chal["scope"] == f"repository:{im.repo}:pull"
    # a token for another repo, or signed by another key, is refused
    assert http_request("GET", url, headers=_bearer(hub, "acme/other")).status == 401
    other = Hub(hub.workdir / "unused")  # fresh key, never started
    forged = other.mint_token([("repository", im.repo, ["pull"])])
    assert http_request("GET", url, headers={"Authorization": f"Bearer {forged}"}).status == 401
    # the right token works
    res = http_request("GET", url, headers={**_bearer(hub, im.repo), "Accept": im.media_type})
    assert res.status == 200 and res.body == im.manifest


def test_private_repo_needs_credentials(hub: Hub) -> None:
    im = hub.images["private"]
    url = f"{hub.url}/v2/{im.repo}/manifests/{im.tag}"
    anon = _claims(hub.get_token(f"repository:{im.repo}:pull")["token"])
    assert anon["access"][0]["actions"] == []
    assert http_request("GET", url, headers=_bearer(hub, im.repo)).status == 401
    res = http_request("GET", url, headers={**_bearer(hub, im.repo, creds=PUSHER), "Accept": im.media_type})
    assert res.status == 200 and res.body == im.manifest


# -- the counting front -------------------------------------------------------------------------


def test_front_passes_headers_and_counts(hub: Hub) -> None:
    im = hub.images["multi"]
    auth = _bearer(hub, im.repo)
    murl = f"{hub.url}/v2/{im.repo}/manifests/{im.tag}"
    head = http_request("HEAD", murl, headers={**auth, "Accept": I.ACCEPT_ALL})
    assert head.status == 200 and head.body == b""
    assert head.header("Docker-Content-Digest") == im.digest
    assert head.header("Content-Type") == im.media_type
    assert head.header("Content-Length") == str(im.size)
    get = http_request("GET", murl, headers={**auth, "Accept": I.ACCEPT_ALL})
    assert get.body == im.manifest and get.header("Content-Length") == str(im.size)
    layer = im.layers[0]
    blob = http_request("GET", f"{hub.url}/v2/{im.repo}/blobs/{layer.digest}", headers=auth)
    assert blob.status == 200 and blob.body == layer.data
    assert blob.header("Docker-Content-Digest") == layer.digest
    ranged = http_request(
        "GET", f"{hub.url}/v2/{im.repo}/blobs/{layer.digest}", headers={**auth, "Range": "bytes=10-19"}
    )
    assert ranged.status == 206 and ranged.body == layer.read_bytes()[10:20]
    missing = http_request("GET", f"{hub.url}/v2/{im.repo}/manifests/nope", headers=auth)
    assert missing.status == 404 and json.loads(missing.body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"

    assert hub.count("HEAD", r"/manifests/") == 1
    assert hub.manifest_count("GET", repo=im.repo) == 2
    assert hub.blob_count("GET", layer.digest) == 2
    assert hub.count(has_auth=True) == 5 and hub.count(service="token") == 1
    assert hub.bytes_sent(r"/manifests/latest$") == im.size
    hub.reset_counts()
    assert hub.count() == 0 and hub.requests == []


def test_front_streams_a_big_blob(hub: Hub) -> None:
    im = hub.images["big"]
    big = max(im.layers, key=lambda b: b.size)
    assert big.size > 100 << 20 and big.media_type == I.OCI_LAYER_TAR
    req = urllib.request.Request(f"{hub.url}/v2/{im.repo}/blobs/{big.digest}", headers=_bearer(hub, im.repo))
    h, n = hashlib.sha256(), 0
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["Content-Length"] == str(big.size)
        while chunk := resp.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    assert n == big.size and "sha256:" + h.hexdigest() == big.digest
    assert hub.bytes_sent(r"/blobs/") == big.size


def test_push_through_front_with_token_dance(hub: Hub) -> None:
    """Uploads stream through the front too (Location points back at it); anonymous push is refused."""
    layers = [I.make_layer({f"rig/random-{i}.bin": os.urandom(250_000)}) for i in range(2)]
    img = I.make_image(layers)

    async def push(creds: tuple[str, str] | None) -> I.Image:
        async with aiohttp.ClientSession() as s:
            tok = await I.fetch_token(s, hub.url, "rig/frontpush", creds=creds)
            return await I.push_image(
                s, hub.url, "rig/frontpush", "v1", img, headers={"Authorization": f"Bearer {tok}"}, chunk_size=100_000
            )

    with pytest.raises(I.PushError, match="401"):
        asyncio.run(push(None))
    pushed = asyncio.run(push(PUSHER))
    assert hub.count("PATCH", r"/blobs/uploads/") == 3 + 3 + 1  # 2 big layers in 3 chunks each, config
    assert skopeo_inspect(f"{hub.netloc}/{pushed.ref}") == img.manifest


def test_retag_and_delete(hub: Hub) -> None:
    repo = "rig/retag"
    a = hub.push_image(I.simple_image(f"retag-a-{time.time_ns()}"), repo, "latest")
    b = hub.push_image(I.simple_image(f"retag-b-{time.time_ns()}"), repo, "other", chunk_size=1000)
    auth = {**_bearer(hub, repo), "Accept": I.ACCEPT_ALL}
    url = f"{hub.url}/v2/{repo}/manifests/latest"
    assert http_request("HEAD", url, headers=auth).header("Docker-Content-Digest") == a.digest
    assert hub.push_tag(repo, "latest", b) == b.digest
    assert http_request("HEAD", url, headers=auth).header("Docker-Content-Digest") == b.digest
    hub.delete_manifest(repo, b.digest)
    assert http_request("HEAD", url, headers=auth).status == 404


# -- redirects and faults -----------------------------------------------------------------------


def test_redirect_blobs_to_cdn(hub: Hub, tmp_path: Path) -> None:
    im = hub.images["oci"]
    layer = im.layers[0]
    hub.redirect_blobs = True
    res = http_request("GET", f"{hub.url}/v2/{im.repo}/blobs/{layer.digest}", headers=_bearer(hub, im.repo))
    assert res.status == 307
    loc = res.header("Location") or ""
    assert loc.startswith(f"http://127.0.0.2:{hub.cdn_port}/")
    # unauthenticated blob requests are still refused before any redirect
    assert http_request("GET", f"{hub.url}/v2/{im.repo}/blobs/{layer.digest}").status == 401
    cdn = http_request("GET", loc)
    assert cdn.status == 200 and cdn.body == layer.data
    assert http_request("GET", loc, headers={"Authorization": "Bearer leaked"}).status == 400
    assert http_request("GET", loc.replace("signature=", "signature=0")).status == 403
    assert [r.has_auth for r in hub.cdn_requests] == [False, True, False]
    head = http_request("HEAD", f"{hub.url}/v2/{im.repo}/blobs/{layer.digest}", headers=_bearer(hub, im.repo))
    assert head.status == 200 and head.header("Content-Length") == str(layer.size)
    hub.redirect_blob_heads = True
    head = http_request("HEAD", f"{hub.url}/v2/{im.repo}/blobs/{layer.digest}", headers=_bearer(hub, im.repo))
    assert head.status == 307
    # a real client follows the redirect and does not carry the registry token to the CDN
    hub.reset_counts()
    out = skopeo_copy(f"{hub.netloc}/{im.ref}", tmp_path / "copy")
    assert out.digest == im.digest
    assert hub.count("GET", r"/blobs/", status=307) == len(im.blobs)
    assert len(hub.cdn_requests) == len(im.blobs)
    assert not any(r.has_auth for r in hub.cdn_requests)


def test_faults(hub: Hub) -> None:
    im = hub.images["multi"]
    auth = {**_bearer(hub, im.repo), "Accept": I.ACCEPT_ALL}
    murl = f"{hub.url}/v2/{im.repo}/manifests/{im.tag}"
    layer = im.layers[0]
    burl = f"{hub.url}/v2/{im.repo}/blobs/{layer.digest}"

    f = hub.inject(path_regex=r"/manifests/", status=503, times=1)
    res = http_request("GET", murl, headers=auth)
    assert res.status == 503 and json.loads(res.body)["errors"][0]["code"] == "UNAVAILABLE"
    assert http_request("GET", murl, headers=auth).status == 200 and f.hits == 1

    hub.inject(path_regex=r"/manifests/", status=429, headers={"Retry-After": "3"}, times=1)
    res = http_request("HEAD", murl, headers=auth)
    assert res.status == 429 and res.header("Retry-After") == "3"

    hub.inject(method="GET", path_regex=r"/blobs/", corrupt=True, times=1)
    bad = http_request("GET", burl, headers=auth)
    assert len(bad.body) == layer.size and bad.body != layer.data

    hub.inject(method="GET", path_regex=r"/blobs/", truncate=100, times=1)
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        http_request("GET", burl, headers=auth)

    hub.inject(path_regex=r"/manifests/", reset=True, times=1)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError, urllib.error.URLError)):
        http_request("GET", murl, headers=auth)

    hub.inject(path_regex=r"/manifests/", delay=0.3, times=1)
    t0 = time.monotonic()
    assert http_request("GET", murl, headers=auth).status == 200
    assert time.monotonic() - t0 >= 0.3

    hub.inject(method="GET", path_regex=r"/blobs/", rate=4000, times=1)  # 385+ bytes at 4 kB/s
    t0 = time.monotonic()
    assert http_request("GET", burl, headers=auth).body == layer.data
    assert time.monotonic() - t0 >= layer.size / 4000 * 0.8

    hub.inject(service="token", status=500, times=1)
    with pytest.raises(RigError, match="500"):
        hub.get_token("repository:acme/tool:pull")
    assert hub.count(status=200) >= 3
    assert http_request("GET", murl, headers=auth).status == 200  # front still healthy


def test_hold_gates_requests_and_in_flight_bodies(hub: Hub) -> None:
    """Deterministic concurrency: park requests (or a half-sent body) until released."""
    from concurrent.futures import ThreadPoolExecutor

    im = hub.images["big"]
    big = max(im.layers, key=lambda b: b.size)
    auth = _bearer(hub, im.repo)
    url = f"{hub.url}/v2/{im.repo}/blobs/{big.digest}"

    def fetch_len() -> int:
        req = urllib.request.Request(url, headers=auth)
        n = 0
        with urllib.request.urlopen(req, timeout=60) as resp:
            while chunk := resp.read(1 << 20):
                n += len(chunk)
        return n

    gate = hub.inject(method="GET", path_regex=r"/blobs/", hold=True)
    with ThreadPoolExecutor(2) as pool:
        futs = [pool.submit(fetch_len) for _ in range(2)]
        gate.wait_waiting(2)
        assert hub.bytes_sent(r"/blobs/") == 0 and not any(f.done() for f in futs)
        gate.release()
        assert [f.result(timeout=60) for f in futs] == [big.size, big.size]
    hub.clear_faults()
    hub.reset_counts()
    mid = hub.inject(method="GET", path_regex=r"/blobs/", hold_after=1 << 20, times=1)
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(fetch_len)
        mid.wait_waiting(1)
        assert hub.bytes_sent(r"/blobs/") == 1 << 20 and not fut.done()
        mid.release()
        assert fut.result(timeout=60) == big.size


def test_down_refuses_connections_and_comes_back(hub: Hub) -> None:
    with hub.down():
        with pytest.raises(urllib.error.URLError, match="refused"):
            http_request("GET", f"{hub.url}/v2/", timeout=5)
        assert hub.get_token("repository:acme/tool:pull")["token"]  # the token service is still up
    assert http_request("GET", f"{hub.url}/v2/").status == 401
    hub.set_down(True, services=("token",))
    with pytest.raises(urllib.error.URLError, match="refused"):
        hub.get_token("repository:acme/tool:pull")
    hub.reset()  # brings everything back
    assert hub.get_token("repository:acme/tool:pull")["token"]


def test_pull_limit_like_docker_hub(hub: Hub) -> None:
    im = hub.images["oci"]
    auth = {**_bearer(hub, im.repo), "Accept": I.ACCEPT_ALL}
    url = f"{hub.url}/v2/{im.repo}/manifests/{im.tag}"
    hub.pull_limit = 2
    first = http_request("GET", url, headers=auth)
    assert first.header("RateLimit-Remaining") == "1;w=21600"
    for _ in range(3):
        assert http_request("HEAD", url, headers=auth).status == 200  # HEAD is free
    assert http_request("GET", url, headers=auth).status == 200
    res = http_request("GET", url, headers=auth)
    assert res.status == 429 and json.loads(res.body)["errors"][0]["code"] == "TOOMANYREQUESTS"


# -- skopeo -------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["multi", "oci", "big", "index", "manifestlist", "layers21"])
def test_skopeo_copies_each_kind(hub: Hub, tmp_path: Path, key: str) -> None:
    im = hub.images[key]
    out = skopeo_copy(f"{hub.netloc}/{im.ref}", tmp_path / key, all_platforms=im.is_index)
    assert out.digest == im.digest and out.manifest == im.manifest
    assert out.media_type == im.media_type
    assert set(im.blob_digests) <= set(out.blobs)
    for child in im.children:
        assert (tmp_path / key / f"{child.digest[7:]}.manifest.json").read_bytes() == child.manifest
    if key == "big":
        big = max(im.layers, key=lambda b: b.size)
        assert I.file_digest(tmp_path / key / big.digest[7:]) == big.digest
    assert hub.count("GET", r"/blobs/") == len(im.blobs)


def test_skopeo_oci_layout_and_creds(hub: Hub, tmp_path: Path) -> None:
    oci = hub.images["oci"]  # an oci: layout keeps OCI manifests as they are (Docker ones get converted)
    out = skopeo_copy(f"{hub.netloc}/{oci.ref}", tmp_path / "layout", fmt="oci")
    assert out.digest == oci.digest and set(oci.blob_digests) <= set(out.blobs)
    im = hub.images["private"]
    with pytest.raises(CommandError):
        skopeo_copy(f"{hub.netloc}/{im.ref}", tmp_path / "anon")
    out = skopeo_copy(f"{hub.netloc}/{im.ref}", tmp_path / "auth", creds=PUSHER)
    assert out.digest == im.digest and set(im.blob_digests) <= set(out.blobs)
    assert any(r.user == "pusher" for r in hub.token_requests)


# -- dockerd and containerd ---------------------------------------------------------------------


def test_dockerd_pulls_straight_from_hub(hub: Hub, dockerd: Dockerd) -> None:
    for key in ("multi", "index", "big"):
        im = hub.images[key]
        assert dockerd.pull(f"{hub.netloc}/{im.ref}") == im.digest
    out = dockerd.docker(
        "image",
        "inspect",
        f"{hub.netloc}/{hub.images['multi'].ref}",
        "--format",
        "{{.Architecture}} {{len .RootFS.Layers}}",
    )
    assert out.stdout.split() == [I.local_arch(), "3"]
    assert hub.blob_count("GET", hub.images["index"].child(I.other_arch()).layers[0].digest) == 0


def test_dockerd_uses_hub_as_registry_mirror(hub: Hub, dockerd: Dockerd) -> None:
    """With registry-mirrors, `docker pull alpine-test` goes to the mirror (not docker.io)."""
    dockerd.reconfigure(mirrors=[hub.url])
    im = hub.images["manifestlist"]
    assert dockerd.pull("multiarch-test") == im.digest
    assert hub.manifest_count(repo="library/multiarch-test") >= 1
    assert hub.blob_count("GET") == len(im.child(I.local_arch()).blobs)


def test_containerd_pulls_through_hosts_toml(hub: Hub, containerd: Containerd, hosts_dir: Path) -> None:
    path = write_hosts_toml(hosts_dir, hub.url)
    assert 'server = "http://127.0.0.1:9"' in path.read_text()
    for key in ("multi", "index", "layers21"):
        im = hub.images[key]
        hub.reset_counts()
        pulled = containerd.pull(f"docker.io/{im.ref}", hosts_dir=hosts_dir)
        assert pulled.digest == im.digest and pulled.media_type == im.media_type
        want = im.child(I.local_arch()) if im.is_index else im
        assert set(want.blob_digests) <= set(pulled.content)
        assert all(pulled.content[b.digest] == b.size for b in want.blobs)
        blob_reqs = hub.requests_matching("GET", r"/blobs/")
        assert len(blob_reqs) == len(want.blobs)
        assert all(r.param("ns") == ["docker.io"] for r in blob_reqs)


def test_containerd_fetch_without_unpack_all_platforms(hub: Hub, containerd: Containerd, hosts_dir: Path) -> None:
    write_hosts_toml(hosts_dir, hub.url)
    im = hub.images["index"]
    pulled = containerd.pull(f"docker.io/{im.ref}", hosts_dir=hosts_dir, unpack=False, all_platforms=True)
    assert pulled.digest == im.digest
    assert set(im.blob_digests) | {c.digest for c in im.children} <= set(pulled.content)


def test_containerd_follows_cdn_redirect_without_token(hub: Hub, containerd: Containerd, hosts_dir: Path) -> None:
    write_hosts_toml(hosts_dir, hub.url)
    hub.redirect_blobs = True
    im = hub.images["oci"]
    pulled = containerd.pull(f"docker.io/{im.ref}", hosts_dir=hosts_dir)
    assert pulled.digest == im.digest
    assert len(hub.cdn_requests) == len(im.blobs)
    assert not any(r.has_auth for r in hub.cdn_requests)


# -- the cargohold process wrapper (with a stand-in server) -------------------------------------

FAKE_SERVER = textwrap.dedent(
    """
    import sys, yaml
    from aiohttp import web
    cfg = yaml.safe_load(open(sys.argv[sys.argv.index("--config") + 1]))
    host, port = cfg["listen"].rsplit(":", 1)
    async def health(request):
        up = cfg["upstreams"][0]
        return web.json_response({"ok": True, "upstream": up["url"], "ttl": up["tag_ttl"]})
    app = web.Application()
    app.router.add_get("/health", health)
    print("fake cargohold serving", flush=True)
    web.run_app(app, host=host, port=int(port), print=None)
    """
)


def test_server_wrapper_lifecycle(hub: Hub, tmp_path: Path) -> None:
    """start / health wait / restart / kill of the process wrapper, on a stand-in `cargohold`."""
    pkg = tmp_path / "fake" / "cargohold"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(FAKE_SERVER)
    srv = Cargohold(
        tmp_path / "srv",
        hub.url,
        upstream={"tag_ttl": "1s"},
        overrides={"extra": {"a": 1}},
        env={"PYTHONPATH": str(tmp_path / "fake")},
    )
    assert srv.config["upstreams"][0] == {"name": "docker.io", "url": hub.url, "tag_ttl": "1s"}
    try:
        srv.start(timeout=20)
        assert http_request("GET", f"{srv.url}/health").json() == {"ok": True, "upstream": hub.url, "ttl": "1s"}
        pid = srv.pid
        srv.restart()
        assert srv.pid != pid and http_request("GET", f"{srv.url}/health").status == 200
        assert srv.kill() == -9
        with pytest.raises(urllib.error.URLError, match="refused"):
            http_request("GET", f"{srv.url}/health", timeout=2)
        assert srv.log_text().count("fake cargohold serving") == 2
    finally:
        srv.stop()
    broken = Cargohold(
        tmp_path / "broken", hub.url, env={"PYTHONPATH": str(tmp_path / "nothing")}, python=sys.executable
    )
    broken.command = lambda: [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]  # type: ignore[method-assign]
    with pytest.raises(RigError, match="exited with 3"):
        broken.start(timeout=10)
    broken.stop()


def test_cdn_blob_path_matches_registry_storage(hub: Hub) -> None:
    """The CDN reads the registry's files; make sure the layout assumption holds."""
    for b in hub.images["multi"].blobs:
        p = hub.blob_path(b.digest)
        assert p.read_bytes() == b.data
