"""Operating the cache against the real rig: the size cap and LRU eviction, blobs in use, the
cache CLI next to a running server, `warm`, and the start-up repair of index and files."""

from __future__ import annotations

import hashlib
import json
import socket
import sqlite3
from collections.abc import Callable
from pathlib import Path

from cacheops import cli, metrics, pull, sample, stored
from rig.hub import Hub
from rig.images import Image
from rig.server import Cargohold
from rig.util import http_request, wait_until


def _content(image: Image) -> set[str]:
    """Everything the cache keeps for an image: its manifests and blobs."""
    digests = {image.digest} | set(image.blob_digests)
    for child in image.children:
        digests |= _content(child)
    return digests


def test_filling_past_the_cap_evicts_least_recently_used_and_pulls_still_work(
    cargohold: Callable[..., Cargohold], hub: Hub, hub_images: dict[str, Image], tmp_path: Path
) -> None:
    first, second, third = hub_images["multi"], hub_images["oci"], hub_images["layers21"]
    one, two, three = (len(img.manifest) + img.total_size for img in (first, second, third))
    cap = max(one + two, two + three) + 64
    srv = cargohold(cache={"max_size": cap})

    pull(srv, first.ref, tmp_path)
    pull(srv, second.ref, tmp_path)
    assert _content(first) | _content(second) <= stored(srv)  # both fit
    pull(srv, third.ref, tmp_path)

    kept = stored(srv)
    assert _content(second) | _content(third) <= kept, "the most recently used images stay"
    evicted = _content(first) - kept
    assert evicted, "the least recently used image gave way"
    figures = json.loads(cli(srv, "cache", "stats", "--json").stdout)
    assert figures["size"] <= cap and figures["max_size"] == cap
    assert sample(metrics(srv.url), "cargohold_cache_evictions_total") == len(evicted)

    hub.reset_counts()
    pull(srv, first.ref, tmp_path)  # evicted content comes back from upstream
    assert hub.blob_count("GET") + hub.manifest_count("GET") >= len(evicted)


def _slow_reader(srv: Cargohold, name: str, digest: str) -> tuple[socket.socket, bytes]:
    """Start a blob GET and read only the headers and a little body, leaving the rest unread."""
    sock = socket.create_connection((srv.host, srv.port), timeout=30)
    sock.sendall(f"GET /v2/{name}/blobs/{digest} HTTP/1.1\r\nHost: {srv.netloc}\r\nConnection: close\r\n\r\n".encode())
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(4096)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock, body


def test_a_blob_being_read_is_not_evicted(
    cargohold: Callable[..., Cargohold], hub: Hub, hub_images: dict[str, Image], tmp_path: Path
) -> None:
    big = hub_images["big"]
    layer = max(big.blobs, key=lambda b: b.size)
    assert layer.size > 32 << 20, "the blob must outsize the socket buffers to keep its sender busy"
    srv = cargohold(cache={"max_size": "1MiB"})
    assert http_request("GET", f"{srv.url}/v2/acme/big/blobs/{layer.digest}", timeout=120).status == 200
    assert layer.digest in stored(srv)  # bigger than the cap, but the newest entry: kept until something else comes

    sock, body = _slow_reader(srv, "acme/big", layer.digest)
    try:
        pull(srv, hub_images["oci"].ref, tmp_path)  # each download makes room: everything else goes
        assert layer.digest in stored(srv), "the blob a client is reading was evicted"
        digest = hashlib.sha256(body)
        sock.settimeout(60)
        while chunk := sock.recv(1 << 20):
            digest.update(chunk)
    finally:
        sock.close()
    assert f"sha256:{digest.hexdigest()}" == layer.digest, "the slow reader got the whole, intact blob"

    # Once nobody reads it, the next download that needs room evicts it.
    fresh = iter(hub_images["layers21"].blob_digests)

    def _evicted() -> bool:
        http_request("GET", f"{srv.url}/v2/acme/layers21/blobs/{next(fresh)}")
        return layer.digest not in stored(srv)

    wait_until(_evicted, timeout=20, interval=0.05, what="the unpinned big blob to be evicted")


def test_warm_makes_a_later_pull_need_no_upstream_request(
    cargohold: Callable[..., Cargohold], hub: Hub, hub_images: dict[str, Image], tmp_path: Path
) -> None:
    srv = cargohold()
    multi, index = hub_images["multi"], hub_images["index"]
    res = cli(srv, "warm", multi.ref, index.ref)
    assert f"{multi.ref}: warm" in res.stdout and f"{index.ref}: warm" in res.stdout
    assert "done" in res.stderr  # progress lines (stderr is not a terminal here)

    hub.reset_counts()
    pull(srv, multi.ref, tmp_path)
    pull(srv, index.ref, tmp_path, all_platforms=True)
    assert hub.count(service=None) == 0, [f"{r.method} {r.path}" for r in hub.requests]


def test_warm_one_platform_fetches_only_that_platform(
    cargohold: Callable[..., Cargohold], hub: Hub, hub_images: dict[str, Image]
) -> None:
    srv = cargohold()
    image = hub_images["manifestlist"]
    wanted, other = image.children
    platform = f"{wanted.platform['os']}/{wanted.platform['architecture']}"
    cli(srv, "warm", image.ref, "--platform", platform)
    assert _content(wanted) <= stored(srv)
    assert not set(other.blob_digests) & stored(srv)
    assert cli(srv, "warm", "acme/nothing-here:latest", check=False).returncode == 1


def test_cache_cli_next_to_a_running_server(
    cargohold: Callable[..., Cargohold], hub: Hub, hub_images: dict[str, Image], tmp_path: Path
) -> None:
    srv = cargohold()
    multi, oci = hub_images["multi"], hub_images["oci"]
    for _ in range(2):
        pull(srv, multi.ref, tmp_path)
        pull(srv, oci.ref, tmp_path)

    listing = cli(srv, "cache", "ls").stdout
    assert "docker.io/library/alpine-test:latest" in listing and "docker.io/acme/tool:1.0" in listing

    cli(srv, "cache", "rm", "acme/tool:1.0")
    assert not _content(oci) & stored(srv), "rm removes the image's manifests and blobs"
    assert _content(multi) <= stored(srv), "and nothing another image uses"
    assert "acme/tool" not in cli(srv, "cache", "ls").stdout
    hub.reset_counts()
    pull(srv, oci.ref, tmp_path)  # the server fetches what disappeared under it
    assert hub.blob_count("GET") == len(oci.blob_digests)

    assert cli(srv, "cache", "prune", "--older-than", "1h").stdout.startswith("removed 0 entries")
    out = cli(srv, "cache", "prune", "--max-size", "0").stdout
    assert "removed" in out and not stored(srv)
    pull(srv, multi.ref, tmp_path)
    assert cli(srv, "cache", "rm", "acme/never-pulled", check=False).returncode == 1

    srv.stop()  # the server writes its counters at shutdown
    figures = json.loads(cli(srv, "cache", "stats", "--json").stdout)
    assert figures["hits"] > 0 and figures["misses"] > 0 and 0 < figures["hit_ratio"] < 1
    assert figures["bytes_from_cache"] >= multi.total_size + oci.total_size
    assert figures["size"] == sum(p.stat().st_size for p in (srv.data_dir / "blobs").glob("*/*/*"))
    text = cli(srv, "cache", "stats").stdout
    assert "hit ratio:" in text and "(no cap)" in text


def test_start_up_repairs_index_and_files_both_ways(
    cargohold: Callable[..., Cargohold], hub: Hub, hub_images: dict[str, Image], tmp_path: Path
) -> None:
    srv = cargohold()
    image = hub_images["oci"]
    pull(srv, image.ref, tmp_path)
    srv.stop()
    lost, unindexed = image.blob_digests[:2]
    (srv.data_dir / "blobs" / "sha256" / lost[7:9] / lost[7:]).unlink()  # a row without its file
    with sqlite3.connect(srv.data_dir / "index.sqlite") as db:
        db.execute("DELETE FROM blobs WHERE digest=?", (unindexed,))  # a file without its row
        db.execute("DELETE FROM manifests WHERE digest=?", (image.digest,))
    srv.start()
    srv.stop()
    with sqlite3.connect(srv.data_dir / "index.sqlite") as db:
        blobs = {row[0] for row in db.execute("SELECT digest FROM blobs")}
        manifests = {row[0] for row in db.execute("SELECT digest FROM manifests")}
    assert lost not in blobs and unindexed in blobs
    assert image.digest in manifests, "a manifest file is recognised as a manifest"
    srv.start()
    pull(srv, image.ref, tmp_path)
