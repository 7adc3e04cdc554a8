"""Serving blobs while they download: a Range answer and an empty body wait for the digest like a
whole body does, and a client that stops reading is cut off after `send_timeout` without holding
the blob (pin, descriptor) or the download of everyone else."""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import urllib.error
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from reliability.helpers import cached_blob, get, oci_code, settled, temp_files
from rig import images as I
from rig.hub import Hub
from rig.server import Cargohold
from rig.util import http_request, wait_until

BROKEN = (http.client.IncompleteRead, ConnectionError, urllib.error.URLError, http.client.RemoteDisconnected)
STALLED = "took no piece of the blob within send_timeout"


def _blob_path(srv: Cargohold, im: I.Image, blob: I.Blob) -> str:
    """The blob's path, after a HEAD that caches the upstream token: a fault then meets the GET."""
    path = f"/v2/{im.repo}/blobs/{blob.digest}"
    assert get(srv, path, method="HEAD").status == 200
    return path


def _ranged(srv: Cargohold, path: str, first: int, last: int) -> bytes | None:
    """The body of a 206 for bytes first..last, or None when the connection was cut."""
    try:
        res = get(srv, path, headers={"Range": f"bytes={first}-{last}"})
    except BROKEN:
        return None
    assert res.status == 206 and res.header("Content-Range").startswith(f"bytes {first}-{last}/"), res.status
    return res.body


@pytest.mark.parametrize("corrupt", [False, True], ids=["good", "wrong bytes"])
def test_range_of_a_download_in_flight_waits_for_the_digest(
    corrupt: bool, hub: Hub, cargohold: Callable[..., Cargohold], fresh_image: Callable[..., I.Image]
) -> None:
    srv = cargohold()
    im = fresh_image(random_bytes=200_000)
    blob = max(im.layers, key=lambda b: b.size)
    path = _blob_path(srv, im, blob)
    # The upstream sends the first 100 kB, which hold the whole range, then waits for the test.
    held = hub.inject(method="GET", path_regex=blob.digest, hold_after=100_000, corrupt=corrupt, times=1)
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(_ranged, srv, path, 1000, 1999)
        held.wait_waiting(1)
        held.release()
        body = answer.result()
    if corrupt:  # the range was on disk before the digest failed: still, nobody got all of it
        assert body is None
        assert not cached_blob(srv, blob.digest).exists() and temp_files(srv) == []
        assert _ranged(srv, path, 1000, 1999) == blob.read_bytes()[1000:2000]  # a new, good download
    else:
        assert body == blob.read_bytes()[1000:2000]
    assert cached_blob(srv, blob.digest).read_bytes() == blob.read_bytes()


def test_empty_upstream_body_is_refused_and_the_empty_blob_served(
    hub: Hub, cargohold: Callable[..., Cargohold], fresh_image: Callable[..., I.Image]
) -> None:
    srv = cargohold()
    im = fresh_image()
    blob = im.layers[0]
    path = _blob_path(srv, im, blob)
    hub.inject(method="GET", path_regex=blob.digest, status=200, body=b"", times=1)  # Content-Length: 0
    res = get(srv, path)
    assert res.status == 502 and oci_code(res) == "UNAVAILABLE", (res.status, res.body)
    assert "does not match its digest" in res.body.decode()
    assert not cached_blob(srv, blob.digest).exists() and temp_files(srv) == []
    assert get(srv, path).body == blob.read_bytes()  # the upstream is fine again
    # The empty blob itself is a legitimate blob: served (cold, then from the cache) and cached.
    empty = I.Blob(I.sha256_digest(b""), 0, blob.media_type, data=b"", diff_id=I.sha256_digest(b""))
    pushed = hub.push_image(I.make_image([empty], label=im.repo), f"{im.repo}-empty")
    for _ in range(2):
        res = get(srv, f"/v2/{pushed.repo}/blobs/{empty.digest}")
        assert res.status == 200 and res.body == b"" and res.header("Docker-Content-Digest") == empty.digest
        settled(srv)
    assert cached_blob(srv, empty.digest).read_bytes() == b""


@contextmanager
def _stalled_client(srv: Cargohold, path: str) -> Iterator[None]:
    """A client that sends its request and never reads a byte of the answer (tiny receive buffer)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(60)
        sock.connect(("127.0.0.1", srv.port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        yield


def _open_blob_files(srv: Cargohold) -> list[str]:
    """Files under the server's data_dir/blobs or data_dir/tmp that it holds open."""
    roots = tuple(str((srv.data_dir / d).resolve()) for d in ("blobs", "tmp"))
    held = []
    for fd in os.scandir(f"/proc/{srv.pid}/fd"):
        try:
            target = os.readlink(fd.path)
        except OSError:  # closed while we looked
            continue
        if target.startswith(roots):
            held.append(target)
    return held


def _joins(srv: Cargohold) -> int:
    page = http_request("GET", f"{srv.url}/metrics").body.decode()
    found = re.search(r'^cargohold_singleflight_joins_total\{kind="blob"\} (\d+)', page, re.MULTILINE)
    return int(found.group(1)) if found else 0


def test_client_that_stops_reading_is_cut_off_after_send_timeout(
    hub: Hub, cargohold: Callable[..., Cargohold], fresh_image: Callable[..., I.Image]
) -> None:
    srv = cargohold(send_timeout="2s")
    im = fresh_image(random_bytes=8 << 20)  # more than the kernel buffers both ends can hold
    blob = max(im.layers, key=lambda b: b.size)
    path = _blob_path(srv, im, blob)
    held = hub.inject(method="GET", path_regex=blob.digest, hold_after=1 << 20, times=1)
    with _stalled_client(srv, path), ThreadPoolExecutor(1) as pool:
        held.wait_waiting(1)  # the stalled client started the download; a reading client joins it
        reader = pool.submit(get, srv, path)
        wait_until(lambda: _joins(srv) == 1, timeout=30, what="the reading client to join the download")
        held.release()
        res = reader.result()
        assert res.status == 200 and hashlib.sha256(res.body).hexdigest() == blob.digest[7:]
        wait_until(lambda: STALLED in srv.log_text(), timeout=60, what="the stalled follower to be cut off")
        wait_until(lambda: not _open_blob_files(srv), timeout=60, what="the stalled follower to let go of the blob")
        assert cached_blob(srv, blob.digest).read_bytes() == res.body
        with _stalled_client(srv, path):  # a cache hit (sendfile) is cut off just the same
            wait_until(
                lambda: srv.log_text().count(STALLED) == 2, timeout=60, what="the stalled cache hit to be cut off"
            )
            wait_until(
                lambda: not _open_blob_files(srv), timeout=60, what="the stalled cache hit to let go of the blob"
            )
    assert len(hub.requests_matching("GET", blob.digest)) == 1
    assert get(srv, path).body == res.body
    assert "Traceback" not in srv.log_text()


def _on_one_connection(
    conn: http.client.HTTPConnection, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, bytes, dict[str, str]]:
    """A request on `conn`, which must still be the connection of the first request (never reopened)."""
    before = conn.sock.getsockname() if conn.sock is not None else None
    conn.request(method, path, headers=headers or {})
    res = conn.getresponse()
    body = res.read()
    assert before is None or (conn.sock is not None and conn.sock.getsockname() == before), (
        "the connection was reopened"
    )
    assert not res.will_close, res.getheaders()
    return res.status, body, {k.lower(): v for k, v in res.getheaders()}


@pytest.mark.parametrize("preset", ["off", "personal", "team", "medium"])
def test_every_blob_answer_keeps_the_connection(
    preset: str, hub: Hub, cargohold: Callable[..., Cargohold], fresh_image: Callable[..., I.Image]
) -> None:
    """Issue 14: under a preset with a connection cap (`team` is the shipped default), a cache hit was
    sent twice (by the rate limit, then by aiohttp) and the keep-alive connection was reset."""
    srv = cargohold(rate_limit={"preset": preset})  # the setting this test is about
    im = fresh_image(random_bytes=1 << 20)
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    try:
        for blob in im.blobs:
            path, data = f"/v2/{im.repo}/blobs/{blob.digest}", blob.read_bytes()
            assert _on_one_connection(conn, path)[:2] == (200, data)  # a follower of the download
            settled(srv)
            assert _on_one_connection(conn, path)[:2] == (200, data)  # a hit
            status, body, headers = _on_one_connection(conn, path, {"Range": "bytes=1-8"})
            assert (status, body) == (206, data[1:9]) and headers["etag"] == f'"{blob.digest}"'
            assert _on_one_connection(conn, path, {"If-None-Match": f'"{blob.digest}"'})[0] == 304
            status, _, headers = _on_one_connection(conn, path, method="HEAD")
            assert status == 200 and headers["content-length"] == str(len(data))
    finally:
        conn.close()
    log = srv.log_text()
    assert "Traceback" not in log and "Unhandled exception" not in log
