"""`workers: 2`: two serving processes on one port and one data_dir behave as one cargohold.

Every request below opens its own connection, so the kernel (SO_REUSEPORT) spreads them over both
workers; with a dozen connections the chance that all land on one worker is below 1 in 2,000.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from cacheops import cli, metrics, sample, settled
from rig.certs import peer_certificate
from rig.clients import ensure_hosts_entries
from rig.hub import Hub
from rig.pebble import Pebble
from rig.server import Cargohold
from rig.util import HttpResult, free_port, http_request, wait_until

Factory = Callable[..., Cargohold]
CLIENTS = 12
DOMAIN = "registry.cargohold.test"


def _two_workers(cargohold: Factory, **config: object) -> Cargohold:
    """cargohold with `workers: 2` (the setting under test), once both workers listen: /health is
    answered as soon as one does, and until the other has bound the port every connection goes to it."""
    srv = cargohold(workers=2, **config)
    wait_until(lambda: srv.log_text().count(" listening on ") == 2, timeout=60, what="both workers to listen")
    return srv


def _workers(srv: Cargohold) -> list[int]:
    """The supervisor's children: the worker processes."""
    children = Path(f"/proc/{srv.pid}/task/{srv.pid}/children").read_text().split()
    return [int(pid) for pid in children]


def _get_all(urls: list[str]) -> list[HttpResult | BaseException]:
    """GET every URL at once, each on its own connection."""
    results: list[HttpResult | BaseException] = [RuntimeError("not run")] * len(urls)

    def get(i: int) -> None:
        try:
            results[i] = http_request("GET", urls[i], timeout=120)
        except BaseException as exc:  # noqa: BLE001 - looked at by the test
            results[i] = exc

    threads = [threading.Thread(target=get, args=(i,)) for i in range(len(urls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(150)
    return results


def _holder_of(lock: Path) -> int:
    """The pid holding the flock on `lock`, from /proc/locks (device and inode)."""
    st = lock.stat()
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if fields[1] == "FLOCK" and fields[5] == where:
            return int(fields[4])
    raise AssertionError(f"nobody holds {lock}")


def test_clients_of_both_workers_share_one_upstream_get_per_blob(hub: Hub, cargohold: Factory) -> None:
    srv = _two_workers(cargohold)  # everything else as shipped
    im = hub.images["oci"]
    held = im.layers[-1].digest
    fault = hub.inject(method="GET", path_regex=rf"/blobs/{held}$", hold_after=1)
    urls = [f"{srv.url}/v2/{im.repo}/blobs/{d}" for d in im.blob_digests for _ in range(CLIENTS)]
    done: list[list[HttpResult | BaseException]] = []
    herd = threading.Thread(target=lambda: done.append(_get_all(urls)))
    herd.start()
    fault.wait_waiting(1)  # one worker's download of the layer is in flight, parked after its first byte
    wait_until(lambda: f"another replica is fetching {held}" in srv.log_text(), timeout=60, what="the other worker")
    fault.release()
    herd.join(200)
    for url, res in zip(urls, done[0], strict=True):
        assert isinstance(res, HttpResult) and res.status == 200, (url, res)
        assert "sha256:" + hashlib.sha256(res.body).hexdigest() == url.rsplit("/", 1)[1]
    for digest in im.blob_digests:  # (a worker's first request for a repository may also get a 401 first)
        assert hub.count("GET", rf"/blobs/{digest}$", status=200) == 1, digest
    settled(srv)
    assert sample(metrics(srv.url), "cargohold_http_requests_total", route="/v2/{name}/blobs/{digest}") == len(urls)
    assert "Traceback" not in srv.log_text()


def test_a_worker_killed_mid_download_does_not_hold_the_other(hub: Hub, cargohold: Factory) -> None:
    srv = _two_workers(cargohold)
    im = hub.images["oci"]
    held = im.layers[-1].digest
    fault = hub.inject(method="GET", path_regex=rf"/blobs/{held}$", hold_after=1)  # every GET, 401s too
    url = f"{srv.url}/v2/{im.repo}/blobs/{held}"
    done: list[list[HttpResult | BaseException]] = []
    herd = threading.Thread(target=lambda: done.append(_get_all([url] * CLIENTS)))
    herd.start()
    fault.wait_waiting(1)
    wait_until(lambda: f"another replica is fetching {held}" in srv.log_text(), timeout=60, what="the other worker")
    holder = _holder_of(srv.data_dir / "locks" / held.replace(":", "-"))
    assert holder in _workers(srv)
    os.kill(holder, signal.SIGKILL)
    fault.release()  # the survivor's own GET is not held up; the dead worker's is recorded when it ends
    herd.join(200)
    served = [r for r in done[0] if isinstance(r, HttpResult) and r.status == 200]
    assert served, done[0]  # the clients of the surviving worker (the killed one's lost their connections)
    assert all("sha256:" + hashlib.sha256(r.body).hexdigest() == held for r in served)

    def upstream_gets() -> int:  # a worker's first request for the repository gets a 401 first (parked, maybe)
        return sum(r.status != 401 for r in hub.requests_matching("GET", rf"/blobs/{held}$"))

    wait_until(lambda: upstream_gets() >= 1, timeout=30, what="the hub to record the survivor's GET")
    wait_until(lambda: f"(pid {holder}) exited" in srv.log_text(), timeout=30, what="the supervisor to see it die")
    wait_until(
        lambda: len(_workers(srv)) == 2 and holder not in _workers(srv), timeout=30, what="a new worker in its place"
    )
    assert http_request("GET", url).status == 200
    assert upstream_gets() <= 2  # the dead worker's (unless it died at the 401), the survivor's; then hits
    assert "fetching it here too" not in srv.log_text()  # taken over at once, not after index.peer_wait


def test_the_index_is_shared_and_the_cli_works_next_to_the_workers(
    hub: Hub, cargohold: Factory, tmp_path: Path
) -> None:
    srv = _two_workers(cargohold)
    im = hub.images["oci"]
    manifest = f"{srv.url}/v2/{im.repo}/manifests/{im.tag}"
    accept = {"Accept": im.media_type}
    assert http_request("GET", manifest, headers=accept).status == 200
    answers = [http_request("GET", manifest, headers=accept) for _ in range(CLIENTS)]
    assert [a.status for a in answers] == [200] * CLIENTS
    assert hub.count("GET", rf"^/v2/{im.repo}/manifests/", status=200) == 1  # the tag is in the one index
    listed = cli(srv, "cache", "ls").stdout
    assert im.repo in listed
    counts = metrics(srv.url)
    assert sample(counts, "cargohold_cache_requests_total", kind="manifest", result="hit") == CLIENTS
    page = http_request("GET", f"{srv.url}/").body.decode()
    assert "2 worker processes share this cache" in page
    cli(srv, "warm", f"{im.repo}:{im.tag}")  # through the workers' port: the whole image lands once
    for digest in im.blob_digests:
        assert hub.count("GET", rf"/blobs/{digest}$", status=200) == 1, digest


def test_the_rate_limit_is_shared_by_the_workers(cargohold: Factory) -> None:
    # Rate limiting is what this test is about: a small budget, in memory (the default storage).
    srv = _two_workers(cargohold, rate_limit={"preset": "off", "requests_per_second": 1, "burst": 4})
    answers = [http_request("GET", f"{srv.url}/v2/") for _ in range(10)]
    statuses = [a.status for a in answers]
    assert statuses.count(200) <= 4 and set(statuses) == {200, 429}, statuses


def test_sigterm_stops_every_worker(cargohold: Factory) -> None:
    srv = _two_workers(cargohold)
    workers = _workers(srv)
    assert len(workers) == 2
    assert srv.stop() == 0
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    log = srv.log_text()
    assert log.count("stopping") >= 2 and "Traceback" not in log


def test_one_worker_orders_the_acme_certificate_and_every_worker_serves_it(
    cargohold: Factory, pebble: Callable[..., Pebble], tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("editing /etc/hosts needs root")
    ensure_hosts_entries([DOMAIN])
    http_port = free_port()
    ca = pebble(http_port, validity=15)  # renewed at two thirds: about 10 s after issue
    acme = {"domains": [DOMAIN], "email": "ops@example.com", "directory": ca.directory, "ca_bundle": str(ca.ca_pem)}
    srv = cargohold(start=False, workers=2, http_listen=f"127.0.0.1:{http_port}", tls={"acme": acme})
    root = tmp_path / "pebble-root.pem"
    root.write_bytes(ca.root_pem())
    srv.start(wait=False)

    def serials() -> set[int]:
        """The certificates new connections get (each connection lands on either worker)."""
        found = set()
        for _ in range(CLIENTS):
            try:
                found.add(peer_certificate(srv.port, root, DOMAIN).serial_number)
            except OSError:  # the placeholder does not verify against pebble's root
                found.add(0)
        return found

    # Each worker says when it serves the certificate; a sample of connections alone can miss a worker
    # still on the placeholder (all of one sample landing on the other: a CI run saw it).
    loaded = f"TLS certificate loaded from {srv.data_dir / 'acme' / 'cert.pem'}"
    wait_until(lambda: srv.log_text().count(loaded) >= 2, timeout=60, interval=0.2, what="both workers loading it")
    wait_until(lambda: 0 not in serials(), timeout=60, interval=0.2, what="both workers on pebble's certificate")
    first = serials()
    assert len(first) == 1
    assert srv.log_text().count(f"ACME certificate for {DOMAIN} issued") == 1  # by the leader alone
    wait_until(lambda: serials().isdisjoint(first), timeout=60, interval=0.5, what="both workers on the renewal")
    assert "Traceback" not in srv.log_text()


def test_a_worker_that_cannot_start_stops_the_machine_with_one_line(cargohold: Factory) -> None:
    srv = cargohold(workers=2, start=False)
    with socket.socket() as taken:  # the port is someone else's (no SO_REUSEPORT): no worker can listen
        taken.bind((srv.host, srv.port))
        taken.listen()
        srv.start(wait=False)
        wait_until(lambda: not srv.running, timeout=60, what="the supervisor to give up")
    assert srv.stop() == 2
    log = srv.log_text()
    assert "cannot start: cannot listen on" in log and "Traceback" not in log


def test_a_second_machine_on_the_same_data_dir_does_not_start(cargohold: Factory) -> None:
    first = _two_workers(cargohold)
    # Same data_dir, another port: it would wipe the first one's metrics and download spool.
    second = cargohold(workers=2, data_dir=str(first.data_dir), start=False)
    second.start(wait=False)
    wait_until(lambda: not second.running, timeout=60, what="the second supervisor to give up")
    assert second.stop() == 2
    assert "another cargohold with workers serves" in second.log_text()
    assert http_request("GET", f"{first.url}/v2/").status == 200
