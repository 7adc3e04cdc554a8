"""Issue 21.1 end to end: a running cargohold, in its shipped defaults, in front of the rig's hub
told to redirect manifests to internal services or to answer with JSON that is no manifest."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from reliability.helpers import get, oci_code
from rig import images as I
from rig.hub import Hub
from rig.server import Cargohold

STATS = {"requests_total": 7, "uptime_seconds": 1234}


@contextmanager
def internal_json_service(host: str) -> Iterator[tuple[str, list[str]]]:
    """A JSON endpoint on a loopback address (an internal service, a metadata API); yields its URL and
    the paths it was asked for."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            body = json.dumps(STATS).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer((host, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}/stats", asked
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_a_manifest_redirected_to_an_internal_service_is_refused_and_not_cached(
    hub: Hub, cargohold: Callable[..., Cargohold], fresh_image: Callable[..., I.Image]
) -> None:
    srv = cargohold()
    im = fresh_image()
    manifest = f"/v2/{im.repo}/manifests/{im.tag}"
    # The hub's own host on another port (this machine's services), and another loopback address.
    with (
        internal_json_service("127.0.0.1") as (same_host, asked),
        internal_json_service("127.0.0.3") as (other, asked_other),
    ):
        for target in (same_host, other):
            fault = hub.inject(path_regex=f"/{im.repo}/manifests/", status=302, headers={"Location": target})
            res = get(srv, manifest)
            assert res.status == 502 and oci_code(res) == "UNAVAILABLE", res.body
            assert b"requests_total" not in res.body and fault.hits >= 1
            hub.clear_faults()
        assert asked == [] and asked_other == []
    res = get(srv, manifest)  # nothing was cached under the tag: the real manifest now
    assert res.status == 200 and res.body == im.manifest
    assert "Traceback" not in srv.log_text()


def test_json_that_is_no_manifest_is_refused_and_not_cached(
    hub: Hub, cargohold: Callable[..., Cargohold], fresh_image: Callable[..., I.Image]
) -> None:
    srv = cargohold()
    im = fresh_image()
    manifest = f"/v2/{im.repo}/manifests/{im.tag}"
    hub.inject(
        method="GET",
        path_regex=f"/{im.repo}/manifests/",
        status=200,
        body=json.dumps(STATS).encode(),
        headers={"Content-Type": I.OCI_MANIFEST},
        times=1,
    )
    res = get(srv, manifest)
    assert res.status == 502 and oci_code(res) == "UNAVAILABLE" and b"requests_total" not in res.body
    res = get(srv, manifest)
    assert res.status == 200 and res.body == im.manifest


def test_blobs_follow_a_cdn_listed_in_redirect_hosts_only(
    hub: Hub, cargohold: Callable[..., Cargohold], fresh_image: Callable[..., I.Image]
) -> None:
    hub.redirect_blobs = True
    im = fresh_image()
    blob = im.blobs[0]
    unlisted = cargohold()
    res = get(unlisted, f"/v2/{im.repo}/blobs/{blob.digest}")
    assert res.status == 502 and b"redirect_hosts" in res.body
    assert hub.cdn_requests == []
    # redirect_hosts set: the rig's CDN stands for Docker Hub's, on another loopback address and port
    listed = cargohold(upstream={"redirect_hosts": [f"{hub.cdn_host}:{hub.cdn_port}"]})
    res = get(listed, f"/v2/{im.repo}/blobs/{blob.digest}")
    assert res.status == 200 and res.body == blob.read_bytes()
    assert len(hub.cdn_requests) == 1 and not hub.cdn_requests[0].has_auth
