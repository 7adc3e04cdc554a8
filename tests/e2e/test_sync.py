"""Keeping what a team depends on, against the real rig: sync lists (scheduled and `sync run`), tag moves recorded
and immutable tags held, and offline mode."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from cacheops import cli, metrics, pull, sample, settled, stored
from rig import images as I
from rig.hub import Hub
from rig.server import Cargohold
from rig.util import http_request, wait_until

Factory = Callable[..., Cargohold]


def _repo(prefix: str) -> str:
    """A repository of this test alone: the hub lives for the whole session."""
    return f"acme/{prefix}-{uuid.uuid4().hex[:8]}"


def _content(image: I.Image) -> set[str]:
    return {image.digest, *image.blob_digests}


def _answered(hub: Hub, method: str, path: str) -> int:
    return hub.count(method, path, status=200)


def _manifest(srv: Cargohold, repo: str, tag: str) -> tuple[int, bytes, dict[str, str]]:
    res = http_request("GET", f"{srv.url}/v2/{repo}/manifests/{tag}", headers={"Accept": I.ACCEPT_ALL})
    return res.status, res.body, res.headers


def _ran_at_start(srv: Cargohold, entry: str) -> None:
    """Until the sync entry's run at start-up (it never ran) has succeeded and what it fetched is stored."""
    wait_until(
        lambda: sample(metrics(srv.url), "cargohold_sync_last_success", entry=entry) == 1,
        timeout=60,
        what="the scheduled sync run at start-up",
    )
    settled(srv)


def test_sync_fetches_new_tags_and_revalidates_unchanged_ones_with_heads_only(
    cargohold: Factory, hub: Hub, tmp_path: Path
) -> None:
    repo = _repo("sync")
    v70, v71, v80, v72 = (I.simple_image(f"{repo}-{tag}", oci=True) for tag in ("7.0", "7.1", "8.0", "7.2"))
    for image, tag in ((v70, "7.0"), (v71, "7.1"), (v80, "8.0")):
        hub.push_image(image, repo, tag)
    # Changed from the defaults: a sync entry (the point of the test). It runs at start-up, as it never ran.
    srv = cargohold(sync=[{"name": "team", "images": [f"{repo}:7.*"]}])
    _ran_at_start(srv, "team")
    kept = stored(srv)
    assert _content(v70) | _content(v71) <= kept
    assert not _content(v80) & kept, "a tag the pattern does not match was synced"
    assert "team: ok" in cli(srv, "sync", "status").stdout

    hub.push_image(v72, repo, "7.2")  # a new tag upstream: the next run fetches it, and only it
    hub.reset_counts()
    run = cli(srv, "sync", "run", "team")
    assert "team: ok" in run.stdout and "7.2: new or moved" in run.stderr
    # Counted as answered (200): the command's own session is first told to fetch a token (401).
    assert hub.count("GET", r"/tags/list$", status=200) == 1
    assert _answered(hub, "HEAD", "/manifests/") == 2 and _answered(hub, "GET", "/manifests/") == 1  # 7.0, 7.1; 7.2
    assert _answered(hub, "GET", "/blobs/") == len(v72.blob_digests)
    assert _content(v72) <= stored(srv)

    hub.reset_counts()
    pull(srv, f"{repo}:7.2", tmp_path)  # what the CLI synced, the server serves from the same cache
    assert hub.blob_count("GET") == 0

    hub.reset_counts()
    again = cli(srv, "sync", "run")  # nothing changed: HEADs only (and the tag list)
    assert "team: ok" in again.stdout
    assert _answered(hub, "HEAD", "/manifests/") == 3 and _answered(hub, "GET", "/manifests/") == 0
    assert hub.blob_count() == 0

    with hub.down():  # a failing upstream fails the run, and says so; the cache keeps what it has
        failed = cli(srv, "sync", "run", "team", check=False)
    assert failed.returncode == 1 and "team: FAILED" in failed.stdout
    assert "team: FAILED" in cli(srv, "sync", "status").stdout and _content(v72) <= stored(srv)

    figures = json.loads(cli(srv, "cache", "stats", "--json").stdout)
    assert figures["pinned_size"] >= sum(image.total_size for image in (v70, v71, v72)), "synced images are pinned"
    page = http_request("GET", f"{srv.url}/").body.decode()
    assert 'id="sync"' in page and "team" in page


def test_a_moved_tag_is_recorded_and_an_immutable_tag_keeps_its_first_digest(cargohold: Factory, hub: Hub) -> None:
    repo = _repo("moves")
    first, second = I.simple_image(f"{repo}-a", oci=True), I.simple_image(f"{repo}-b", oci=True)
    for tag in ("latest", "v1"):
        hub.push_image(first, repo, tag)
    # Changed from the defaults: tags revalidated at every pull (so a move is seen at once), and `v*` immutable.
    srv = cargohold(tag_ttl="0s", upstream={"immutable_tags": ["v*"]})
    for tag in ("latest", "v1"):
        assert _manifest(srv, repo, tag)[1] == first.manifest
    for tag in ("latest", "v1"):
        hub.push_image(second, repo, tag)

    assert _manifest(srv, repo, "latest")[1] == second.manifest  # a mutable tag follows
    for _ in range(2):  # the immutable one stays, and its move is recorded once
        status, body, headers = _manifest(srv, repo, "v1")
        assert status == 200 and body == first.manifest and headers["docker-content-digest"] == first.digest
    history = cli(srv, "cache", "history", repo).stdout
    assert history.count(f"{repo}:latest") == 1 and history.count(f"{repo}:v1") == 1
    assert first.digest[:19] in history and second.digest[:19] in history
    assert sample(metrics(srv.url), "cargohold_tag_moves_total") == 2
    assert "immutable tag" in srv.log_text()
    page = http_request("GET", f"{srv.url}/").body.decode()
    assert 'id="tag-moves"' in page and f"{repo}:v1" in page

    assert cli(srv, "cache", "accept", f"{repo}:latest", check=False).returncode == 1  # it followed: nothing to accept
    assert "accepted" in cli(srv, "cache", "accept", f"{repo}:v1").stdout
    assert _manifest(srv, repo, "v1")[1] == second.manifest


def test_offline_mode_serves_warm_content_past_its_ttl_without_a_single_upstream_request(
    cargohold: Factory, hub: Hub, tmp_path: Path
) -> None:
    repo = _repo("offline")
    warm, cold = I.simple_image(f"{repo}-warm", oci=True), I.simple_image(f"{repo}-cold", oci=True)
    hub.push_image(warm, repo, "1")
    hub.push_image(cold, repo, "2")
    # Changed from the defaults: a 1 s tag TTL, so the warm tag is long past it when served offline.
    srv = cargohold(tag_ttl="1s")
    pull(srv, f"{repo}:1", tmp_path)
    settled(srv)
    srv.config["offline"] = True  # the point of the test
    srv.restart()
    time.sleep(1.5)  # past the tag TTL: online, this pull would revalidate upstream
    hub.reset_counts()

    pull(srv, f"{repo}:1", tmp_path)
    res = http_request("GET", f"{srv.url}/v2/{repo}/manifests/2", headers={"Accept": I.ACCEPT_ALL})
    error = json.loads(res.body)["errors"][0]
    assert res.status == 404 and error["code"] == "MANIFEST_UNKNOWN" and "offline" in error["detail"]["reason"]
    res = http_request("GET", f"{srv.url}/v2/{repo}/blobs/{cold.blob_digests[0]}")
    error = json.loads(res.body)["errors"][0]
    assert res.status == 404 and error["code"] == "BLOB_UNKNOWN" and "offline" in error["detail"]["reason"]
    ready = json.loads(http_request("GET", f"{srv.url}/ready").body)
    assert (
        ready["status"] == "ready"
        and ready["offline"] == ["docker.io"]
        and ready["upstreams"]["docker.io"] == "offline"
    )
    assert 'id="offline"' in http_request("GET", f"{srv.url}/").body.decode()
    assert hub.requests == [], "an offline mirror contacted the upstream"


def test_sync_takes_latest_of_an_image_without_a_tag_and_only_the_platforms_asked_for(
    cargohold: Factory, hub: Hub, hub_images: dict[str, I.Image]
) -> None:
    index = hub_images["index"]  # acme/multiarch:latest, this machine's arch and the other
    here, there = index.child(I.local_arch()), index.child(I.other_arch())
    # Changed from the defaults: a sync entry of one platform (the point of the test).
    srv = cargohold(sync=[{"name": "one", "images": ["acme/multiarch"], "platforms": [f"linux/{I.local_arch()}"]}])
    _ran_at_start(srv, "one")
    kept = stored(srv)
    assert {index.digest} | _content(here) <= kept
    assert not set(there.blob_digests) & kept, "a platform not asked for was synced"
