"""Wrong bytes from upstream (flipped, cut, too short, too long): never cached, never served
whole, and the next request after the fault fetches and caches the right bytes."""

from __future__ import annotations

import http.client
import urllib.error
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from reliability.helpers import cached_blob, files_under, get, oci_code, settled, temp_files
from rig import images as I
from rig.hub import Hub
from rig.server import Cargohold
from rig.util import wait_until

BROKEN = (http.client.IncompleteRead, ConnectionError, urllib.error.URLError, http.client.RemoteDisconnected)
FAULTS = {
    "wrong bytes": {"corrupt": True},
    "cut mid-blob": {"truncate": 70_000},
    "declared too short": {"length_delta": -10},
    "declared too long": {"length_delta": 10},
}
READERS = 4


def _fetch(srv: Cargohold, path: str) -> bytes | None:
    """The body, or None when the connection was cut (the only honest signal after headers)."""
    try:
        res = get(srv, path)
    except BROKEN:
        return None
    if res.status == 200:
        return res.body
    assert res.status >= 500 and oci_code(res), res.body  # refused before any byte: an OCI error
    return None


@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
def test_bad_blob_is_never_cached_or_served(
    fault: dict[str, object], hub: Hub, cargohold: Callable[..., Cargohold], fresh_image: Callable[..., I.Image]
) -> None:
    srv = cargohold()
    im = fresh_image(random_bytes=200_000)
    blob = max(im.layers, key=lambda b: b.size)
    path = f"/v2/{im.repo}/blobs/{blob.digest}"
    assert get(srv, path, method="HEAD").status == 200  # the token is cached: the fault meets the GET
    injected = hub.inject(method="GET", path_regex=blob.digest, times=1, **fault)
    with ThreadPoolExecutor(READERS) as pool:  # clients following the bad download, or a later one
        bodies = list(pool.map(lambda _: _fetch(srv, path), range(READERS)))
    # Nobody got the bad bytes whole: each client was cut off, or joined a later, good download.
    assert None in bodies and all(b is None or b == blob.read_bytes() for b in bodies)
    assert injected.hits == 1 and hub.blob_count("GET", blob.digest) <= READERS  # no retry loop
    settled(srv)  # a later, good download's clients are served before its temp file is renamed
    assert temp_files(srv) == []
    if all(b is None for b in bodies):
        assert not cached_blob(srv, blob.digest).exists()
    # The upstream is fine again: the right bytes, and only those, cached.
    res = get(srv, path)
    assert res.status == 200 and res.body == blob.read_bytes()
    assert cached_blob(srv, blob.digest).read_bytes() == blob.read_bytes()


def test_bad_manifest_is_refused(
    hub: Hub, cargohold: Callable[..., Cargohold], fresh_image: Callable[..., I.Image]
) -> None:
    srv = cargohold()
    im = fresh_image()
    assert get(srv, f"/v2/{im.repo}/blobs/{im.blobs[0].digest}", method="HEAD").status == 200  # token cached
    for ref in (im.tag, im.digest):
        hub.inject(method="GET", path_regex=r"/manifests/", corrupt=True, times=1)
        res = get(srv, f"/v2/{im.repo}/manifests/{ref}")
        assert res.status == 502 and oci_code(res) == "UNAVAILABLE", res.body
        assert "does not match" in res.body.decode()
    assert not any(im.digest[7:] in p.name for p in files_under(srv.data_dir))
    res = get(srv, f"/v2/{im.repo}/manifests/{im.tag}")
    assert res.status == 200 and res.body == im.manifest


def test_garbage_tag_list_is_refused(
    hub: Hub, cargohold: Callable[..., Cargohold], fresh_image: Callable[..., I.Image]
) -> None:
    srv = cargohold()
    im = fresh_image()
    assert get(srv, f"/v2/{im.repo}/blobs/{im.blobs[0].digest}", method="HEAD").status == 200  # token cached
    hub.inject(path_regex=r"/tags/list$", status=200, body=b"]]garbage", times=1)
    res = get(srv, f"/v2/{im.repo}/tags/list")
    assert res.status == 502 and oci_code(res) == "UNAVAILABLE"
    res = get(srv, f"/v2/{im.repo}/tags/list")
    assert res.status == 200 and "latest" in res.json()["tags"]  # type: ignore[index]


def test_oversized_manifest_redirect_loop_and_odd_realm_are_refused(
    hub: Hub, cargohold: Callable[..., Cargohold], fresh_image: Callable[..., I.Image]
) -> None:
    srv = cargohold(upstream={"failure_pause": "0s"})
    im = fresh_image()
    manifest = f"/v2/{im.repo}/manifests/{im.tag}"
    hub.inject(path_regex=r"/manifests/", status=200, body=b"{" + b" " * (5 << 20) + b"}", times=1)
    res = get(srv, manifest)
    assert res.status == 502 and "too large" in res.body.decode()
    loop = hub.inject(path_regex=r"/manifests/", status=307, headers={"Location": f"{hub.url}{manifest}"})
    res = get(srv, manifest)
    assert res.status == 503 and "redirected too often" in res.body.decode()
    assert loop.hits <= 3 * 6  # bounded: 6 hops per attempt, 3 attempts
    hub.clear_faults()
    for realm in ("file:///etc/passwd", "gopher://127.0.0.1:70/", "/token"):
        hub.inject(status=401, headers={"WWW-Authenticate": f'Bearer realm="{realm}",service="x"'}, times=1)
        res = get(srv, f"/v2/{fresh_image().repo}/manifests/latest")
        assert res.status == 502 and oci_code(res) == "UNAVAILABLE" and "token realm" in res.body.decode()
    assert not any(im.digest[7:] in p.name for p in files_under(srv.data_dir))
    assert get(srv, manifest).body == im.manifest


def test_client_going_away_does_not_cancel_the_download(
    hub: Hub, cargohold: Callable[..., Cargohold], fresh_image: Callable[..., I.Image]
) -> None:
    import socket

    srv = cargohold()
    im = fresh_image(random_bytes=2 << 20)
    blob = max(im.layers, key=lambda b: b.size)
    hub.inject(method="GET", path_regex=blob.digest, rate=1 << 20)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as sock:
        sock.sendall(f"GET /v2/{im.repo}/blobs/{blob.digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    # The client is gone; the download goes on, is verified and cached.
    wait_until(lambda: cached_blob(srv, blob.digest).is_file(), timeout=60, what="the blob to be cached")
    assert cached_blob(srv, blob.digest).read_bytes() == blob.read_bytes()
    assert len(hub.requests_matching("GET", blob.digest, status=200)) == 1
    for _ in range(3):  # and walking away from cache hits (sendfile) is just as quiet
        with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(f"GET /v2/{im.repo}/blobs/{blob.digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    assert get(srv, "/health").status == 200
    assert "Traceback" not in srv.log_text()
