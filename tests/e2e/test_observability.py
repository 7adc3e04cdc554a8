"""Metrics under a scripted pull sequence, the separate metrics listener, /ready, and JSON logs."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from pathlib import Path

from cacheops import metrics, pull, sample, settled
from rig.hub import Hub
from rig.images import Image
from rig.server import REPO_ROOT, Cargohold
from rig.util import free_port, http_request, wait_until

BLOBS = "/v2/{name}/blobs/{digest}"


def test_metrics_move_with_a_scripted_pull_sequence(
    cargohold: Callable[..., Cargohold], hub: Hub, hub_images: dict[str, Image], tmp_path: Path
) -> None:
    hub.pull_limit = 100
    srv = cargohold(cache={"max_size": "1GiB"})
    image = hub_images["oci"]
    blobs = len(image.blob_digests)

    pull(srv, image.ref, tmp_path)
    settled(srv)  # the last blob's commit may still be running after skopeo has it
    first = metrics(srv.url)
    assert sample(first, "cargohold_cache_requests_total", kind="blob", result="miss") == blobs
    assert sample(first, "cargohold_cache_requests_total", kind="blob", result="hit") == 0
    assert sample(first, "cargohold_cache_requests_total", kind="manifest", result="miss") >= 1
    assert sample(first, "cargohold_served_bytes_total", source="upstream") >= image.total_size
    assert sample(first, "cargohold_upstream_bytes_total", upstream="docker.io") >= image.total_size
    assert (
        sample(first, "cargohold_upstream_requests_total", upstream="docker.io", method="GET", status="200")
        >= blobs + 1
    )
    assert sample(first, "cargohold_upstream_request_seconds_count", upstream="docker.io") >= blobs + 1
    assert sample(first, "cargohold_http_requests_total", route=BLOBS, method="GET", status="200") == blobs
    assert sample(first, "cargohold_cache_size_bytes") >= image.total_size
    assert sample(first, "cargohold_cache_entries", kind="blob") == blobs
    assert sample(first, "cargohold_upstream_ratelimit_remaining", upstream="docker.io") == 100 - hub.pulls()

    hub.reset_counts()
    pull(srv, image.ref, tmp_path)  # all from cache now
    second = metrics(srv.url)
    assert hub.count() == 0
    assert sample(second, "cargohold_cache_requests_total", kind="blob", result="hit") == blobs
    assert sample(second, "cargohold_cache_requests_total", kind="blob", result="miss") == blobs
    assert sample(second, "cargohold_served_bytes_total", source="cache") >= image.total_size
    assert sample(second, "cargohold_upstream_bytes_total") == sample(first, "cargohold_upstream_bytes_total")

    with hub.down():
        res = http_request("GET", f"{srv.url}/v2/acme/nothing/manifests/latest")
    assert res.status in (502, 503, 504)
    failed = metrics(srv.url)
    assert sample(failed, "cargohold_upstream_errors_total", upstream="docker.io") >= 1
    assert sample(failed, "cargohold_ratelimit_rejections_total") == 0
    assert sample(failed, "cargohold_upstream_pauses_total", upstream="docker.io") == 1
    assert sample(failed, "cargohold_downloads_uncached_total") == 0
    assert (
        sample(
            failed, "cargohold_http_requests_total", route="/v2/{name}/manifests/{reference}", status=str(res.status)
        )
        == 1
    )

    # Every metric the Grafana dashboard charts is exported.
    exported = http_request("GET", f"{srv.url}/metrics").body.decode()
    dashboard = (REPO_ROOT / "deploy" / "grafana-dashboard.json").read_text()
    charted = {re.sub(r"_(total|bucket|count|sum)$", "", m) for m in re.findall(r"cargohold_[a-z_]+", dashboard)}
    assert len(charted) >= 12
    assert {m for m in charted if f"# TYPE {m} " not in exported and f"# TYPE {m}_total " not in exported} == set()


def test_concurrent_requests_for_one_blob_count_as_single_flight_joins(
    cargohold: Callable[..., Cargohold], hub: Hub, hub_images: dict[str, Image]
) -> None:
    srv = cargohold()
    digest = hub_images["multi"].layers[0].digest
    held = hub.inject(method="GET", path_regex=digest, hold=True)
    results: list[int] = []

    def fetch() -> None:
        results.append(http_request("GET", f"{srv.url}/v2/library/alpine-test/blobs/{digest}").status)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for t in threads:
        t.start()
    held.wait_waiting(1)
    wait_until(
        lambda: sample(metrics(srv.url), "cargohold_singleflight_joins_total", kind="blob") == 2,
        timeout=10,
        what="two requests joining the held download",
    )
    assert sample(metrics(srv.url), "cargohold_downloads_in_flight") == 1
    held.release()
    for t in threads:
        t.join(30)
    assert results == [200, 200, 200]
    assert hub.count("GET", rf"/blobs/{digest}$", status=200) == 1  # one download served all three


def test_metrics_listener_ready_and_json_logs(
    cargohold: Callable[..., Cargohold], hub: Hub, hub_images: dict[str, Image]
) -> None:
    port = free_port()
    srv = cargohold(
        metrics_listen=f"127.0.0.1:{port}",
        log_format="json",
        upstream={"username": "pusher", "password": "pushpass"},
    )
    side = metrics(f"http://127.0.0.1:{port}")
    assert sample(side, "cargohold_cache_size_bytes") == 0
    assert http_request("GET", f"http://127.0.0.1:{port}/v2/").status == 404  # only /metrics there

    res = http_request(
        "GET", f"{srv.url}/v2/acme/private/manifests/latest", headers={"X-Request-Id": "trace-me-42", "Accept": "*/*"}
    )
    assert res.status == 200
    ready = http_request("GET", f"{srv.url}/ready")
    assert ready.status == 200
    assert json.loads(ready.body) == {
        "status": "ready",
        "checks": {"storage": "ok", "store": "ok", "index": "ok"},
        "upstreams": {"docker.io": "ok"},
    }
    assert http_request("GET", f"{srv.url}/health").status == 200

    def access_line() -> dict | None:
        for line in srv.log_text().splitlines():
            if line.startswith("{") and '"trace-me-42"' in line and '"cargohold.access"' in line:
                return json.loads(line)
        return None

    wait_until(lambda: access_line() is not None, timeout=10, what="the JSON access line")
    entry = access_line()
    assert entry is not None
    assert entry["request_id"] == "trace-me-42" and entry["status"] == 200 and entry["cache"] == "miss"
    assert entry["path"] == "/v2/acme/private/manifests/latest" and entry["method"] == "GET"
    lines = [line for line in srv.log_text().splitlines() if line.startswith("{")]
    assert len(lines) >= 3 and all(json.loads(line)["level"] for line in lines)
    assert "pushpass" not in srv.log_text()

    tmp = srv.data_dir / "tmp"
    tmp.rename(srv.data_dir / "tmp.moved")
    tmp.write_text("not a directory")
    try:
        broken = http_request("GET", f"{srv.url}/ready")
        assert broken.status == 503
        body = json.loads(broken.body)
        assert body["status"] == "not ready" and body["checks"]["storage"].startswith("not writable")
        assert body["checks"]["index"] == "ok"
    finally:
        tmp.unlink()
        (srv.data_dir / "tmp.moved").rename(tmp)
    assert http_request("GET", f"{srv.url}/ready").status == 200
