"""Process faults: kill -9 in the middle of a download or of the cache write, and a full disk.
Nothing partial is ever served, pulls succeed on retry, and a full disk only costs caching."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from io import FileIO
from pathlib import Path

import pytest

from reliability.helpers import assert_store_intact, cached_blob, get, oci_code, pull_all, temp_files
from rig import images as I
from rig.hub import Hub
from rig.server import Cargohold
from rig.util import wait_until

BIG = 4 << 20
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")


def _layer(im: I.Image) -> I.Blob:
    return max(im.layers, key=lambda b: b.size)


@pytest.mark.parametrize("cut_at", ["mid-download", "all but the last byte"])
def test_kill_during_download_then_restart(
    cut_at: str, hub: Hub, cargohold: Callable[..., Cargohold], fresh_image: Callable[..., I.Image]
) -> None:
    srv = cargohold(upstream={"failure_pause": "0s"})  # no pause after the down-time below
    im = fresh_image(random_bytes=BIG)
    blob = _layer(im)
    path = f"/v2/{im.repo}/blobs/{blob.digest}"
    assert get(srv, f"/v2/{im.repo}/manifests/{im.tag}").status == 200
    stop_at = blob.size // 2 if cut_at == "mid-download" else blob.size - 1
    held = hub.inject(method="GET", path_regex=blob.digest, times=1, hold_after=stop_at)
    with ThreadPoolExecutor(1) as pool:
        client = pool.submit(get, srv, path)
        held.wait_waiting(1)
        # Kill once the temp file holds part of the blob (a write may still be landing: the point).
        wait_until(
            lambda: any(p.stat().st_size > 0 for p in temp_files(srv)), timeout=30, what="bytes in the temp file"
        )
        srv.kill()
        with pytest.raises(Exception):  # noqa: B017 - how a cut-off read fails depends on where the cut falls
            client.result(timeout=60)  # cut off, never a complete body
    assert not cached_blob(srv, blob.digest).exists()
    held.release()

    srv.start()
    assert temp_files(srv) == []  # the crash's leftovers are gone before anything is served
    assert_store_intact(srv)
    with hub.down():
        res = get(srv, path)  # nothing partial may be served from disk: cold, and upstream is down
        assert res.status == 503 and oci_code(res) == "UNAVAILABLE"
        # What was committed before the kill survived it (SQLite WAL index, renamed files).
        res = get(srv, f"/v2/{im.repo}/manifests/{im.tag}")
        assert res.status == 200 and res.body == im.manifest
    hub.reset()
    res = get(srv, path)
    assert res.status == 200 and res.body == blob.read_bytes()
    assert cached_blob(srv, blob.digest).read_bytes() == blob.read_bytes()


@contextmanager
def small_disk(where: Path, size: str) -> Iterator[Callable[[str], None]]:
    """A tmpfs of `size` at `where`; yields a resize function (remount)."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0750", "tmpfs", str(where)], check=True)

    def resize(new: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={new}", str(where)], check=True)

    try:
        yield resize
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def temp_files_held(srv: Cargohold) -> list[str]:
    """Removed temp files the server still holds open (their space is not free yet)."""
    fds = Path(f"/proc/{srv.pid}/fd")
    held = []
    for fd in fds.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(srv.data_dir / "tmp")) and target.endswith("(deleted)"):
            held.append(target)
    return held


def fill_up(filler: Path) -> None:
    """Write `filler` until its filesystem has not a block left."""

    def write_forever(f: FileIO) -> None:
        while True:
            f.write(b"\0" * 4096)

    with open(filler, "ab", buffering=0) as f, pytest.raises(OSError) as full:
        write_forever(f)
    assert full.value.errno == errno.ENOSPC and os.statvfs(filler.parent).f_bavail == 0


@needs_root
def test_disk_full_streams_straight_through_and_caching_resumes(
    hub: Hub, cargohold: Callable[..., Cargohold], fresh_image: Callable[..., I.Image]
) -> None:
    srv = cargohold(start=False)
    im, other = fresh_image(random_bytes=BIG), fresh_image()
    blob = _layer(im)
    path = f"/v2/{im.repo}/blobs/{blob.digest}"
    with small_disk(srv.data_dir, "1m") as resize:
        try:
            srv.start()
            assert get(srv, f"/v2/{im.repo}/manifests/{im.tag}").body == im.manifest
            # A blob bigger than the disk: it fills up mid-download; every client still gets it whole.
            with ThreadPoolExecutor(3) as pool:
                bodies = list(pool.map(lambda _: get(srv, path), range(3)))
            assert all(r.status == 200 and r.body == blob.read_bytes() for r in bodies)
            assert not cached_blob(srv, blob.digest).exists()
            assert temp_files(srv) == []

            # Once the downloads above let go of their temp files, fill the disk to the last
            # block: manifests and the index cannot be written either.
            wait_until(lambda: temp_files_held(srv) == [], timeout=30, what="temp files to be closed")
            filler = srv.data_dir / "filler"
            fill_up(filler)
            res = get(srv, f"/v2/{other.repo}/manifests/{other.tag}")
            assert res.status == 200 and res.body == other.manifest
            for small in other.blobs:
                assert get(srv, f"/v2/{other.repo}/blobs/{small.digest}").body == small.read_bytes()
                assert not cached_blob(srv, small.digest).exists()
            log = srv.log_text()
            assert "disk full while caching" in log and "serving manifest" in log and "Traceback" not in log

            # Space comes back: the next requests are cached again, no restart needed.
            filler.unlink()
            resize("32m")
            for image in (im, other):
                pull_all(srv, image)
                assert all(cached_blob(srv, b.digest).read_bytes() == b.read_bytes() for b in image.blobs)
            with hub.down():
                pull_all(srv, im)  # all from cache now
                pull_all(srv, other)
        finally:
            srv.stop()
