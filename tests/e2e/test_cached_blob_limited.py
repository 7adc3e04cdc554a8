"""A cached blob under the shipped rate limits: the limiter sends it itself (to hold the connection slot
until the client has it), and aiohttp then asks the response to prepare once more. Before the fix that
second call reopened the file and failed an assertion, logging a traceback for every cache hit; found by
the container test (tests/deploy), because the rig's cargohold otherwise runs with limits off."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from rig.images import Image
from rig.server import Cargohold
from rig.util import http_request


def test_cache_hits_under_the_shipped_limits_log_no_traceback(
    cargohold: Callable[..., Cargohold], hub_images: dict[str, Image]
) -> None:
    srv = cargohold(rate_limit={"preset": "team"})  # the shipped default; the rig turns limits off
    image = hub_images["oci"]
    digest = image.blob_digests[0]
    for _ in range(3):  # a miss, then hits
        got = http_request("GET", f"{srv.url}/v2/{image.repo}/blobs/{digest}")
        assert got.status == 200
        assert "sha256:" + hashlib.sha256(got.body).hexdigest() == digest
    log = srv.log_text()
    assert "Traceback" not in log
    assert "cache=hit" in log  # a hit answered and logged (the second GET may still find the download)
