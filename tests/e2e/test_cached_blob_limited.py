"""A cached blob under the shipped rate limits. The limiter used to send a cached blob itself (to hold the
connection slot until the client had it), and aiohttp then asked the response to prepare once more: that
second call reopened the file and failed an assertion, logging a traceback for every cache hit. Found by
the container test (tests/deploy); the blob path now sends every answer once, from the handler."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

from rig.images import Image
from rig.server import Cargohold
from rig.util import http_request


def test_cache_hits_under_the_shipped_limits_log_no_traceback(
    cargohold: Callable[..., Cargohold], hub_images: dict[str, Image]
) -> None:
    srv = cargohold()  # the shipped defaults: rate limiting on (preset team)
    image = hub_images["oci"]
    digest = image.blob_digests[0]
    for _ in range(50):  # a miss, then (once the download has landed: its commit follows the answers) hits
        got = http_request("GET", f"{srv.url}/v2/{image.repo}/blobs/{digest}")
        assert got.status == 200
        assert "sha256:" + hashlib.sha256(got.body).hexdigest() == digest
        if "cache=hit" in srv.log_text():
            break
        time.sleep(0.1)
    log = srv.log_text()
    assert "cache=hit" in log  # a hit answered and logged
    assert "Traceback" not in log
