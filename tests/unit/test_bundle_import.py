"""`cargohold import` against hostile bundles, built here with `tarfile` (or by hand where tarfile will not write
the attack): headers that would be read whole, members by the hundred thousand, blobs bigger than their
descriptor or `max_blob_size`, compressed bundles, an interrupted import, and tags an import must not move."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cargohold.bundle import BundleError, import_bundle
from cargohold.cache.backends import open_backends
from cargohold.cli.cache import accept
from cargohold.config import Settings, load_settings

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _settings(tmp_path: Path, extra: str = "") -> Settings:
    path = tmp_path / "c.yml"
    path.write_text(
        f"data_dir: {tmp_path / 'data'}\n{extra}\n"
        "upstreams:\n- {name: docker.io, url: 'http://127.0.0.1:9', immutable_tags: ['3.*']}\n"
    )
    return load_settings(path, environ={})


def _manifest(layer_digest: str, layer_size: int, config: bytes = b"{}") -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": _sha(config), "size": 2},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size}
            ],
        }
    ).encode()


def _index(tags: dict[str, bytes]) -> bytes:
    entries = [
        {
            "mediaType": MANIFEST,
            "digest": _sha(m),
            "size": len(m),
            "annotations": {"org.opencontainers.image.ref.name": n},
        }
        for n, m in tags.items()
    ]
    return json.dumps({"schemaVersion": 2, "manifests": entries}).encode()


def _add(tar: tarfile.TarFile, name: str, data: bytes, pax: dict[str, str] | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.pax_headers = len(data), pax or {}
    tar.addfile(info, io.BytesIO(data))


def _bundle(path: Path, layer: bytes, tags: list[str], extra: Callable[[tarfile.TarFile], None] | None = None) -> str:
    """A bundle as export writes it (PAX format, blobs first, index.json last); the manifest's digest."""
    manifest = _manifest(_sha(layer), len(layer))
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "oci-layout", LAYOUT)
        if extra is not None:
            extra(tar)
        for blob in (layer, b"{}", manifest):
            _add(tar, f"blobs/sha256/{_sha(blob)[7:]}", blob)
        _add(tar, "index.json", _index(dict.fromkeys(tags, manifest)))
    return _sha(manifest)


def _import(settings: Settings, bundle: Path) -> tuple[int, list[str]]:
    said: list[str] = []
    refused = asyncio.run(import_bundle(settings, bundle, said.append))
    return refused, said


def _peak(run: Callable[[], object]) -> int:
    """The peak of Python allocations while `run` runs (its exception, if any, re-raised after)."""
    tracemalloc.start()
    try:
        run()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def _tmp_files(settings: Settings) -> list[Path]:
    tmp = settings.data_dir / "tmp"
    return [p for p in tmp.iterdir() if p.is_file()] if tmp.exists() else []


@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE])
def test_long_name_and_big_pax_headers_are_refused_unread(tmp_path: Path, kind: bytes) -> None:
    """F1: tarfile read a GNU long name or a PAX header whole before anyone could refuse it (2 GiB: 4.28 GB)."""
    size = 32 << 20
    bundle = tmp_path / "b.tar"
    info = tarfile.TarInfo("././@LongLink" if kind == tarfile.GNUTYPE_LONGNAME else "././@PaxHeader")
    info.type, info.size = kind, size
    with bundle.open("wb") as out:
        out.write(info.tobuf(format=tarfile.GNU_FORMAT if kind == tarfile.GNUTYPE_LONGNAME else tarfile.USTAR_FORMAT))
        body = b"%d comment=" % size if kind == tarfile.XHDTYPE else b""
        out.write(body + b"a" * (size - len(body) - 1) + b"\n")
        out.write(bytes(1024 + 512 - size % 512 if size % 512 else 1024))
    settings = _settings(tmp_path)
    errors: list[str] = []

    def run() -> None:
        try:
            _import(settings, bundle)
        except (BundleError, tarfile.TarError) as exc:
            errors.append(str(exc))

    assert _peak(run) < 8 << 20, "the header was read into memory"
    assert errors and ("GNU long name" in errors[0] or "PAX header of" in errors[0]), errors


def test_members_by_the_hundred_thousand_stay_small_and_are_bounded(tmp_path: Path) -> None:
    """F1: tarfile kept every member it read (999,000 empty ones: 519 MB; 1 MiB PAX comments: 2.12 GB)."""
    bundle = tmp_path / "b.tar"

    def padding(tar: tarfile.TarFile) -> None:
        for n in range(20_000):  # files outside the layout, each with a PAX comment tarfile keeps
            _add(tar, f"pad/{n}", b"", {"comment": "c" * 4000})

    _bundle(bundle, b"layer", ["docker.io/acme/tool:1.0"], padding)
    settings = _settings(tmp_path)
    said: list[str] = []
    assert _peak(lambda: said.extend(_import(settings, bundle)[1])) < 30 << 20
    assert said[0] == "imported docker.io/acme/tool:1.0"

    many = tmp_path / "many.tar"  # 100,001 empty members: more than any bundle has
    header = tarfile.TarInfo("pad").tobuf(format=tarfile.USTAR_FORMAT)
    many.write_bytes(header * 100_001 + bytes(1024))
    with pytest.raises(BundleError, match="more than 100000 tar entries"):
        _import(settings, many)


def _zeros_digest(size: int) -> str:
    hasher, block = hashlib.sha256(), bytes(1 << 20)
    for _ in range(size >> 20):
        hasher.update(block)
    return "sha256:" + hasher.hexdigest()


def _big_blob_bundle(path: Path, size: int, declared: int, digest: str) -> None:
    """A bundle whose layer member is `size` zero bytes (a hole: sparse on disk) and whose manifest says
    `declared` bytes of `digest`; the layer is the last member, as it would be read last."""
    manifest = _manifest(digest, declared)
    members = [("oci-layout", LAYOUT), (f"blobs/sha256/{_sha(b'{}')[7:]}", b"{}")]
    members += [(f"blobs/sha256/{_sha(manifest)[7:]}", manifest)]
    members += [("index.json", _index({"docker.io/acme/tool:1.0": manifest}))]
    with path.open("wb") as out:
        for name, data in [*members, (f"blobs/sha256/{digest[7:]}", b"")]:
            info = tarfile.TarInfo(name)
            info.size = len(data) or size
            out.write(info.tobuf(format=tarfile.USTAR_FORMAT))
            out.write(data + bytes(-len(data) % 512))
        out.seek(size + -size % 512, os.SEEK_CUR)
        out.write(bytes(1024))


@pytest.fixture
def tmp_watch() -> Iterator[Callable[[Settings], list[int]]]:
    """Watches a data_dir's temp files from a thread: the largest size seen (the small blobs are written)."""
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def watch(settings: Settings) -> list[int]:
        seen = [0]

        def poll() -> None:
            while not stop.is_set():
                for path in _tmp_files(settings):
                    with contextlib.suppress(FileNotFoundError):
                        seen[0] = max(seen[0], path.stat().st_size)
                time.sleep(0.001)

        threads.append(threading.Thread(target=poll, daemon=True))
        threads[-1].start()
        return seen

    yield watch
    stop.set()
    for thread in threads:
        thread.join()


def test_a_blob_bigger_than_its_descriptor_or_max_blob_size_is_refused_before_it_is_written(
    tmp_path: Path, tmp_watch: Callable[[Settings], list[int]]
) -> None:
    """F2: a 1 GiB member whose manifest said 11 bytes was written out (and fsynced) before the refusal; a
    valid blob over max_blob_size was stored."""
    settings = _settings(tmp_path, "max_blob_size: 8MiB")
    seen = tmp_watch(settings)
    lying = tmp_path / "lying.tar"
    _big_blob_bundle(lying, 64 << 20, 11, _sha(b"layer-bytes"))
    with pytest.raises(BundleError, match="67108864 bytes in the bundle, its descriptor says 11"):
        _import(settings, lying)
    assert seen[0] < 1 << 20, "the member was written out before it was refused"

    big = tmp_path / "big.tar"
    digest = _zeros_digest(16 << 20)
    _big_blob_bundle(big, 16 << 20, 16 << 20, digest)
    with pytest.raises(BundleError, match=r"more than max_blob_size \(8.0 MiB\)"):
        _import(settings, big)
    assert seen[0] < 1 << 20 and not _tmp_files(settings)
    assert not (settings.data_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]).exists()


def test_an_interrupted_import_leaves_no_temp_file(tmp_path: Path) -> None:
    """F2: SIGTERM killed the import mid-blob and left its data/tmp file behind (until the server's next start)."""
    size = 1 << 30  # long enough to be caught mid-write; a hole in the bundle, written to data/tmp
    settings = _settings(tmp_path)
    bundle = tmp_path / "b.tar"
    _big_blob_bundle(bundle, size, size, _zeros_digest(size))
    command = [sys.executable, "-m", "cargohold", "import", str(bundle), "--config", str(tmp_path / "c.yml")]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(6000):  # up to a minute for the blob's temp file to fill up a little
            if any(p.stat().st_size > 1 << 20 for p in _tmp_files(settings)) or proc.poll() is not None:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the import ended before it could be interrupted"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "import interrupted" in err and "Traceback" not in err
    assert not _tmp_files(settings)


def test_a_compressed_bundle_is_refused_up_front(tmp_path: Path) -> None:
    """F3: a .tar.gz was decompressed again from its start for every backwards seek (10 members behind 2 GiB of
    zeros: 33 s from 2.1 MB). Export and skopeo write plain tars; members are read by offset."""
    plain = tmp_path / "b.tar"
    _bundle(plain, b"layer", ["docker.io/acme/tool:1.0"])
    packed = tmp_path / "b.tar.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    settings = _settings(tmp_path)
    with pytest.raises(BundleError, match=r"is compressed \(gzip\): decompress it first"):
        _import(settings, packed)
    refused, said = _import(settings, plain)
    assert refused == 0 and said[0] == "imported docker.io/acme/tool:1.0"


def test_import_never_moves_an_immutable_tag_and_records_every_move(tmp_path: Path) -> None:
    """F4: a second bundle moved an immutable tag (exit 0), and no move was recorded for `cache history`."""
    settings = _settings(tmp_path)
    first, second = tmp_path / "a.tar", tmp_path / "b.tar"
    tags = ["docker.io/library/alpine:3.20", "docker.io/library/alpine:latest"]
    old, new = _bundle(first, b"genuine", tags), _bundle(second, b"other", tags)

    async def rows() -> tuple[list[str | None], list[tuple[str, str, str]]]:
        async with open_backends(settings) as backends:
            index = backends.index
            kept = [await index.get_tag("docker.io", "library/alpine", t) for t in ("3.20", "latest")]
            moves = await index.tag_moves("docker.io", "library/alpine")
        return [t.digest if t else None for t in kept], [(m.tag, m.old_digest, m.new_digest) for m in moves]

    _import(settings, first)
    refused, said = _import(settings, second)
    digests, moves = asyncio.run(rows())
    assert digests == [old, new]
    assert sorted(moves) == [("3.20", old, new), ("latest", old, new)]  # the refused one as a pull records it
    assert refused == 1
    assert (
        said[0] == f"refused docker.io/library/alpine:3.20: an immutable tag, it stays at {old} (the bundle has {new})"
    )
    assert said[1] == f"imported docker.io/library/alpine:latest (moved from {old})"
    assert "1 tag(s) moved (see cargohold cache history): docker.io/library/alpine:latest" in said
    assert "1 immutable tag(s) refused, kept as they were: docker.io/library/alpine:3.20" in said

    assert _import(settings, second)[0] == 1  # refused again, recorded once
    assert len(asyncio.run(rows())[1]) == 2

    # `cache accept` lets the next import take it, as it lets the next pull
    assert asyncio.run(accept(settings, argparse.Namespace(image="alpine:3.20"))) == 0
    assert _import(settings, second)[0] == 0
    assert asyncio.run(rows())[0] == [new, new]


def test_an_index_naming_one_big_manifest_over_and_over_is_refused(tmp_path: Path) -> None:
    """F3: every entry of index.json read its manifest again (4 MiB at most, 28,000 entries fit in a 4 MiB
    index.json): days of reading from a small bundle. Reads are bounded to twice the bundle and 256 MiB."""
    layer = b"layer"
    manifest = json.loads(_manifest(_sha(layer), len(layer)))
    manifest["annotations"] = {"padding": "p" * (1 << 20)}
    body = json.dumps(manifest).encode()
    bundle = tmp_path / "b.tar"
    with tarfile.open(bundle, "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "oci-layout", LAYOUT)
        for blob in (layer, b"{}", body):
            _add(tar, f"blobs/sha256/{_sha(blob)[7:]}", blob)
        _add(tar, "index.json", _index({f"docker.io/acme/tool:{n}": body for n in range(1000)}))
    with pytest.raises(BundleError, match="more than twice the bundle's size"):
        _import(_settings(tmp_path), bundle)
