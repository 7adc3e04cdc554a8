"""Long runs (`make soak`): repeated kill -9 under load, a changing storm of upstream faults,
and a disk-full download far bigger than memory's window with a slow reader."""

from __future__ import annotations

import hashlib
import random
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from reliability.helpers import assert_store_intact, get, pull_all, temp_files
from reliability.test_process_faults import needs_root, small_disk
from rig import images as I
from rig.hub import Hub
from rig.server import Cargohold
from rig.util import wait_until

pytestmark = pytest.mark.soak


def _pull_quietly(srv: Cargohold, im: I.Image) -> bool:
    try:
        pull_all(srv, im)
        return True
    except Exception:  # noqa: BLE001 - the server is being killed under us; that is the point
        return False


def test_repeated_kill_under_load(
    hub: Hub, cargohold: Callable[..., Cargohold], fresh_image: Callable[..., I.Image]
) -> None:
    srv = cargohold(upstream={"failure_pause": "0s"})
    images = [fresh_image(random_bytes=2 << 20) for _ in range(6)]
    rng = random.Random(8)
    hub.inject(method="GET", path_regex=r"/blobs/", rate=4 << 20)  # downloads take a while: kills land mid-way
    for _ in range(10):
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(_pull_quietly, srv, im) for im in images]
            time.sleep(rng.uniform(0.05, 1.0))
            srv.kill()
            [f.result(timeout=120) for f in futures]
        srv.start()
        assert temp_files(srv) == []
        assert_store_intact(srv)
    hub.clear_faults()
    for im in images:
        pull_all(srv, im)
    assert assert_store_intact(srv) == sum(len(im.blobs) + 1 for im in images)  # blobs and manifests


def test_fault_storm(hub: Hub, cargohold: Callable[..., Cargohold], fresh_image: Callable[..., I.Image]) -> None:
    """A minute of changing faults while clients pull warm and cold images; afterwards every
    image pulls, the store is intact, and the upstream was never asked in a retry loop."""
    srv = cargohold(tag_ttl="0s", upstream={"timeout": "1s", "failure_pause": "1s"})
    warm = [fresh_image() for _ in range(3)]
    cold = [fresh_image(random_bytes=256 << 10) for _ in range(12)]
    for im in warm:
        pull_all(srv, im)
    faults: list[dict[str, object]] = [
        {"status": 500},
        {"status": 503},
        {"status": 429, "headers": {"Retry-After": "1"}},
        {"reset": True},
        {"method": "GET", "path_regex": "/blobs/", "corrupt": True},
        {"method": "GET", "path_regex": "/blobs/", "truncate": 1000},
        {"service": "token", "status": 500},
        {"method": "GET", "path_regex": "/blobs/", "length_delta": -3},
        {"delay": 1.5},
    ]
    rng = random.Random(88)
    stop = threading.Event()
    warm_failures: list[str] = []

    def warm_clients() -> None:
        while not stop.is_set():
            for im in warm:
                try:
                    pull_all(srv, im)
                except Exception as exc:  # noqa: BLE001 - collected and asserted below
                    warm_failures.append(f"{im.ref}: {exc}")

    def cold_clients() -> None:
        while not stop.is_set():
            _pull_quietly(srv, rng.choice(cold))

    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(warm_clients), pool.submit(cold_clients), pool.submit(cold_clients)]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            hub.clear_faults()
            hub.inject(**rng.choice(faults))
            time.sleep(rng.uniform(0.5, 3))
        stop.set()
        [f.result(timeout=120) for f in running]
    hub.clear_faults()
    assert warm_failures == []
    wait_until(lambda: get(srv, "/v2/").status == 200, timeout=10, what="server")
    for im in cold:
        wait_until(lambda im=im: _pull_quietly(srv, im), timeout=30, interval=0.5, what=f"pull {im.ref}")
    assert_store_intact(srv)
    assert temp_files(srv) == []
    assert "Traceback" not in srv.log_text()


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@needs_root
def test_disk_full_big_blob_slow_reader_memory_stays_flat(
    hub: Hub, cargohold: Callable[..., Cargohold], fresh_image: Callable[..., I.Image]
) -> None:
    srv = cargohold(start=False)
    im = fresh_image(random_bytes=96 << 20)
    blob = max(im.layers, key=lambda b: b.size)
    with small_disk(srv.data_dir, "2m"):
        try:
            srv.start()
            assert srv.pid is not None
            base = _rss_kib(srv.pid)
            peak = base
            # A reader at ~8 MiB/s, via curl's rate limit: the download may not run ahead of it.
            proc = subprocess.Popen(
                ["curl", "-sS", "--limit-rate", "8M", "-o", "-", f"{srv.url}/v2/{im.repo}/blobs/{blob.digest}"],
                stdout=subprocess.PIPE,
            )
            digest = hashlib.sha256()
            assert proc.stdout is not None
            while chunk := proc.stdout.read(1 << 20):
                digest.update(chunk)
                peak = max(peak, _rss_kib(srv.pid))
            assert proc.wait(timeout=300) == 0
            assert "sha256:" + digest.hexdigest() == blob.digest
            grown_mib = (peak - base) / 1024
            print(
                f"\nuncached 96 MiB blob to an 8 MiB/s reader: server RSS grew {grown_mib:.0f} MiB (base {base // 1024} MiB)"
            )
            assert grown_mib < 64  # bounded by the 16 MiB window (+ buffers), not by the blob
            assert "disk full while caching" in srv.log_text()
        finally:
            srv.stop()
