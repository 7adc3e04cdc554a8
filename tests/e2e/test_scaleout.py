"""Replicas sharing one bucket (moto's S3 server) and one Redis: a blob fetched by one is a hit on
every other, and an image is fetched upstream once per cluster."""

from __future__ import annotations

import hashlib
import http.client
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cacheops import cli, metrics, sample, settled
from rig import images as I
from rig.clients import Dockerd, skopeo_copy
from rig.hub import Hub
from rig.redisd import RedisServer
from rig.s3 import S3Server
from rig.server import Cargohold
from rig.util import http_request, wait_until

Factory = Callable[..., Cargohold]


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[S3Server]:
    with S3Server(tmp_path / "moto") as server:
        yield server


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    (tmp_path / "redis").mkdir()
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def replica(s3: S3Server, redis: RedisServer, cargohold: Factory) -> Factory:
    """A cargohold replica on the shared bucket and Redis (each with its own data_dir). The bucket and
    Redis are set up first so that they stop last: the replicas stop while their index is still up."""

    def start(s3_extra: dict[str, object] | None = None, **index: object) -> Cargohold:
        storage = s3.storage("cache/", **(s3_extra or {}))
        return cargohold(storage=storage, index={"url": f"{redis.url}/0", **index})

    return start


def _keys(s3: S3Server) -> set[str]:
    return {
        key.rsplit("/", 2)[0].rsplit("/", 1)[-1] + ":" + key.rsplit("/", 1)[-1] for key in s3.objects("cache/blobs/")
    }


def _pull(srv: Cargohold, im: I.Image, work: Path) -> None:
    assert skopeo_copy(f"{srv.netloc}/{im.ref}", work / uuid.uuid4().hex).digest == im.digest


def _blob_url(srv: Cargohold, im: I.Image, digest: str) -> str:
    return f"{srv.url}/v2/{im.repo}/blobs/{digest}"


def test_a_blob_fetched_by_one_replica_is_a_hit_on_the_other(
    hub: Hub, replica: Factory, s3: S3Server, tmp_path: Path
) -> None:
    a, b = replica(), replica()
    im = hub.images["multi"]
    _pull(a, im, tmp_path)
    assert hub.blob_count("GET") == len(im.blobs)
    settled(a)
    assert set(im.blob_digests) | {im.digest} <= _keys(s3)
    hub.reset_counts()
    _pull(b, im, tmp_path)
    assert hub.blob_count("GET") == 0
    assert hub.manifest_count() == 0  # the tag, within its TTL, is in the shared index
    assert not (b.data_dir / "blobs").exists() and not any((b.data_dir / "tmp").iterdir())
    # A hit is streamed from the bucket with Range passed through; HEAD answers from it too.
    layer = im.layers[0]
    whole = http_request("GET", _blob_url(b, im, layer.digest))
    assert whole.status == 200 and hashlib.sha256(whole.body).hexdigest() == layer.digest.split(":")[1]
    part = http_request("GET", _blob_url(b, im, layer.digest), headers={"Range": "bytes=10-99"})
    assert part.status == 206 and part.body == whole.body[10:100]
    assert part.header("Content-Range") == f"bytes 10-99/{len(whole.body)}"
    head = http_request("HEAD", _blob_url(b, im, layer.digest))
    assert head.status == 200 and head.header("Content-Length") == str(len(whole.body))
    bad = http_request("GET", _blob_url(b, im, layer.digest), headers={"Range": f"bytes={len(whole.body) + 5}-"})
    assert bad.status == 416 and bad.json()["errors"][0]["code"] == "RANGE_INVALID"  # type: ignore[index]
    assert hub.count(service=None) == 0


def _memory(pid: int | None, field: str) -> int:
    """VmRSS or VmHWM (peak) of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def test_a_big_blob_goes_up_in_parts_and_is_streamed_back_in_flat_memory(
    hub: Hub, replica: Factory, s3: S3Server
) -> None:
    a, b = replica(), replica()
    im = hub.images["big"]
    layer = max(im.layers, key=lambda blob: blob.size)  # 128 MiB: a multipart upload
    with urllib.request.urlopen(_blob_url(a, im, layer.digest), timeout=120) as answer:
        assert _sha256_of(answer) == layer.digest
    settled(a)
    assert s3.objects(f"cache/blobs/sha256/{layer.digest[7:9]}/") == {
        f"cache/blobs/sha256/{layer.digest[7:9]}/{layer.digest[7:]}": layer.size
    }
    hub.reset_counts()
    before = _memory(b.pid, "VmRSS")
    with urllib.request.urlopen(_blob_url(b, im, layer.digest), timeout=120) as answer:
        assert _sha256_of(answer) == layer.digest
    assert hub.count(service=None) == 0
    assert _memory(b.pid, "VmHWM") - before < 48 << 20  # chunks, never the 128 MiB body


def _sha256_of(answer: http.client.HTTPResponse) -> str:
    hasher = hashlib.sha256()
    while chunk := answer.read(1 << 20):
        hasher.update(chunk)
    return f"sha256:{hasher.hexdigest()}"


def test_concurrent_pulls_through_two_replicas_fetch_each_blob_once(hub: Hub, replica: Factory, tmp_path: Path) -> None:
    a, b = replica(lease="1s"), replica(lease="1s")
    im = hub.images["oci"]
    held = im.layers[-1].digest
    fault = hub.inject(method="GET", path_regex=rf"/blobs/{held}$", hold_after=1)
    errors: list[BaseException] = []

    def pull(srv: Cargohold) -> None:
        try:
            _pull(srv, im, tmp_path)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=pull, args=(srv,)) for srv in (a, b)]
    threads[0].start()
    fault.wait_waiting(1)  # A's download of the layer is in flight, parked after its first byte
    threads[1].start()
    wait_until(lambda: f"another replica is fetching {held}" in b.log_text(), timeout=60, what="B to wait for A")
    time.sleep(3)  # three lease lives: A renews its lock all along, so B keeps waiting
    fault.release()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    for digest in im.blob_digests:
        assert hub.blob_count("GET", digest) == 1, digest
    assert fault.hits == 1
    assert sample(metrics(b.url), "cargohold_peer_waits_total", outcome="landed") >= 1


def _get_in_thread(url: str, results: dict[str, bytes | BaseException]) -> threading.Thread:
    def get() -> None:
        try:
            results[url] = urllib.request.urlopen(url, timeout=120).read()
        except BaseException as exc:  # noqa: BLE001 - looked at by the test
            results[url] = exc

    thread = threading.Thread(target=get)
    thread.start()
    return thread


@pytest.mark.parametrize("how", ["holder killed", "holder too slow"])
def test_a_waiting_replica_takes_over(hub: Hub, replica: Factory, s3: S3Server, how: str) -> None:
    """The lock holder dies (its lease runs out) or takes longer than peer_wait: the waiter fetches it."""
    a, b = replica(lease="2s"), replica(lease="2s", peer_wait="60s" if how == "holder killed" else "1s")
    im = hub.images["multi"]
    layer = im.layers[0]
    assert http_request("HEAD", _blob_url(a, im, layer.digest)).status == 200  # A has its token: its GET is held
    fault = hub.inject(method="GET", path_regex=rf"/blobs/{layer.digest}$", hold_after=1, times=1)
    results: dict[str, bytes | BaseException] = {}
    held = _get_in_thread(_blob_url(a, im, layer.digest), results)
    fault.wait_waiting(1)
    waiting = _get_in_thread(_blob_url(b, im, layer.digest), results)
    wait_until(lambda: f"another replica is fetching {layer.digest}" in b.log_text(), timeout=30, what="B to wait")
    if how == "holder killed":
        a.kill()
    waiting.join(60)
    body = results[_blob_url(b, im, layer.digest)]
    assert isinstance(body, bytes) and hashlib.sha256(body).hexdigest() == layer.digest.split(":")[1]
    assert hub.count("GET", rf"/blobs/{layer.digest}$", status=200) == 2  # A's (held) and B's
    outcome = "took_over" if how == "holder killed" else "timed_out"
    assert sample(metrics(b.url), "cargohold_peer_waits_total", outcome=outcome) == 1
    fault.release()
    held.join(60)
    settled(b)
    assert layer.digest in _keys(s3)


def test_a_corrupt_upstream_blob_never_reaches_the_bucket(
    hub: Hub, replica: Factory, s3: S3Server, tmp_path: Path
) -> None:
    a, b = replica(), replica()
    im = hub.images["multi"]
    layer = im.layers[0]
    hub.inject(method="GET", path_regex=rf"/blobs/{layer.digest}$", corrupt=True)
    for srv in (a, b):
        try:
            body = urllib.request.urlopen(_blob_url(srv, im, layer.digest), timeout=30).read()
        except (OSError, http.client.HTTPException):  # cut off: it never gets the bad bytes whole
            body = None
        assert body is None or hashlib.sha256(body).hexdigest() == layer.digest.split(":")[1]
    settled(a)
    settled(b)
    assert layer.digest not in _keys(s3)
    assert "does not match its digest" in a.log_text() + b.log_text()
    hub.clear_faults()
    _pull(b, im, tmp_path)
    settled(b)
    assert layer.digest in _keys(s3)


@pytest.mark.parametrize("failing", ["bucket", "redis"])
def test_a_failing_bucket_or_redis_answers_503_in_oci_json(
    hub: Hub, replica: Factory, s3: S3Server, redis: RedisServer, tmp_path: Path, failing: str
) -> None:
    a = replica()
    im = hub.images["multi"]
    _pull(a, im, tmp_path)
    settled(a)
    (s3 if failing == "bucket" else redis).stop()
    for path in (f"manifests/{im.tag}", f"blobs/{im.layers[0].digest}"):
        answer = http_request("GET", f"{a.url}/v2/{im.repo}/{path}", headers={"Accept": I.ACCEPT_ALL})
        if failing == "bucket" and path.startswith("manifests/"):
            # A hot manifest's bytes are kept in memory (the index still holds it): served with the bucket down.
            assert answer.status == 200 and answer.body == im.manifest
            continue
        assert answer.status == 503, answer.body
        assert answer.json()["errors"][0]["code"] == "UNAVAILABLE"  # type: ignore[index]
    assert ("s3 head_object of" if failing == "bucket" else "index (redis) get_tag failed") in a.log_text()
    ready = http_request("GET", f"{a.url}/ready")
    assert ready.status == 503
    assert ready.json()["checks"]["store" if failing == "bucket" else "index"] != "ok"  # type: ignore[index]


def test_prune_and_rm_through_the_cli_delete_objects(hub: Hub, replica: Factory, s3: S3Server, tmp_path: Path) -> None:
    a = replica()
    multi, oci = hub.images["multi"], hub.images["oci"]
    _pull(a, multi, tmp_path)
    _pull(a, oci, tmp_path)
    settled(a)
    stats = cli(a, "cache", "stats").stdout
    assert "2 manifests" in stats and f"s3://{s3.bucket}/cache/" in stats
    assert f"docker.io/{multi.repo}:{multi.tag}" in cli(a, "cache", "ls").stdout
    cli(a, "cache", "rm", multi.ref)
    left = _keys(s3)
    assert not set(multi.blob_digests) & left and set(oci.blob_digests) <= left
    cli(a, "cache", "prune", "--max-size", "0")
    assert s3.objects("cache/") == {}
    assert "0 blobs, 0 manifests" in cli(a, "cache", "stats").stdout
    hub.reset_counts()
    _pull(a, oci, tmp_path)  # pruned content is fetched again
    assert hub.blob_count("GET") == len(oci.blobs)


def test_redirect_mode_sends_hits_to_a_presigned_url(hub: Hub, replica: Factory, tmp_path: Path) -> None:
    a = replica({"redirect": True})
    im = hub.images["multi"]
    _pull(a, im, tmp_path)  # the first pull follows the download (nothing to redirect to yet)
    settled(a)
    layer = im.layers[0]
    answer = http_request("GET", _blob_url(a, im, layer.digest))
    assert answer.status == 307 and answer.header("Docker-Content-Digest") == layer.digest
    location = answer.header("Location") or ""
    assert "Signature=" in location or "X-Amz-Signature=" in location
    body = urllib.request.urlopen(location, timeout=30).read()
    assert hashlib.sha256(body).hexdigest() == layer.digest.split(":")[1]
    hub.reset_counts()
    _pull(a, im, tmp_path)  # skopeo follows the redirects to the bucket
    assert hub.blob_count("GET") == 0


def test_one_instance_on_s3_with_the_sqlite_index(hub: Hub, cargohold: Factory, s3: S3Server, tmp_path: Path) -> None:
    srv = cargohold(storage=s3.storage("solo/"))
    im = hub.images["layers21"]  # 21 layers: many uploads at once on the worker threads
    _pull(srv, im, tmp_path)
    settled(srv)
    srv.restart()  # the index (SQLite in data_dir) and the bucket agree after a restart
    hub.reset_counts()
    _pull(srv, im, tmp_path)
    assert hub.blob_count("GET") == 0
    assert (srv.data_dir / "index.sqlite").exists() and not (srv.data_dir / "blobs").exists()
    assert "index repaired" not in srv.log_text()


def test_dockerd_pulls_through_an_s3_backed_replica(hub: Hub, replica: Factory, s3: S3Server, dockerd: Dockerd) -> None:
    by_name = {"endpoint_url": s3.url.replace("127.0.0.1", "localhost")}  # the endpoint is looked up by name
    a, b = replica(by_name), replica(by_name)
    im = hub.images["oci"]
    assert dockerd.pull(f"{a.netloc}/{im.ref}") == im.digest
    settled(a)
    hub.reset_counts()
    dockerd.remove_all_images()
    assert dockerd.pull(f"{b.netloc}/{im.ref}") == im.digest
    assert hub.blob_count("GET") == 0
