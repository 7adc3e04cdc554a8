"""Eviction order, age limit, blobs in use, and the start-up repair, on a real index and store."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from cargohold.cache.evict import evict, repair
from cargohold.cache.index import SqliteIndex
from cargohold.cache.store import FsBlobStore
from cargohold.config import ConfigError, load_settings, parse_size
from cargohold.oci.digests import Digest


async def _filled(tmp_path: Path, ages: dict[bytes, float]) -> tuple[SqliteIndex, FsBlobStore, dict[bytes, Digest]]:
    """A cache holding each content with its last access `age` seconds ago."""
    store, index = FsBlobStore(tmp_path), SqliteIndex(tmp_path / "index.sqlite")
    digests = {}
    for content in ages:
        digests[content] = digest = Digest.of(content)
        store.write(digest, content)
        await index.put_blob(str(digest), len(content))
    with sqlite3.connect(tmp_path / "index.sqlite") as db:
        for content, age in ages.items():
            db.execute("UPDATE blobs SET last_access=? WHERE digest=?", (time.time() - age, str(digests[content])))
    return index, store, digests


async def test_least_recently_used_goes_first_until_the_cache_fits(tmp_path: Path) -> None:
    index, store, d = await _filled(tmp_path, {b"a" * 100: 300, b"b" * 100: 200, b"c" * 100: 100})
    removed = await evict(index, store, max_size=150)
    assert [e.digest for e in removed] == [str(d[b"a" * 100]), str(d[b"b" * 100])]
    assert store.local_path(d[b"a" * 100]) is None and store.local_path(d[b"c" * 100]) is not None
    assert (await index.usage()).size == 100
    assert await evict(index, store, max_size=100, incoming=50) != []  # room for a download of 50 bytes
    assert (await index.usage()).size == 0


async def test_age_limit_and_blobs_in_use(tmp_path: Path) -> None:
    index, store, d = await _filled(tmp_path, {b"old": 7200, b"older": 9000, b"new": 10})
    pin = store.pin(d[b"older"])
    removed = await evict(index, store, unused_since=time.time() - 3600, busy=store.in_use)
    assert [e.digest for e in removed] == [str(d[b"old"])], "the pinned blob stays, the fresh one too"
    pin.release()
    pin.release()  # a second release does nothing
    assert not store.in_use(d[b"older"])
    removed = await evict(index, store, unused_since=time.time() - 3600, busy=store.in_use)
    assert [e.digest for e in removed] == [str(d[b"older"])]


async def test_repair_drops_rows_without_files_and_indexes_files_without_rows(tmp_path: Path) -> None:
    index, store, d = await _filled(tmp_path, {b"kept": 1, b"file gone": 1})
    store.remove(d[b"file gone"])
    manifest = (
        b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
        b'"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:'
        + b"0"
        * 64
        + b'","size":2},'
        b'"layers":[]}'
    )
    config = b'{"architecture":"amd64","rootfs":{}}'
    deep = b"[" * 200_000 + b"]" * 200_000  # any blob an upstream served; json.loads raised RecursionError on it
    for content in (manifest, config, deep):
        store.write(Digest.of(content), content)
    assert await repair(index, store) == (1, 3)
    stored = {e.digest: e.table for e in await index.stored()}
    assert stored == {
        str(d[b"kept"]): "blobs",
        str(Digest.of(manifest)): "manifests",
        str(Digest.of(config)): "blobs",
        str(Digest.of(deep)): "blobs",
    }
    assert await repair(index, store) == (0, 0)


def test_cache_limits_in_config() -> None:
    assert parse_size("50GiB") == 50 << 30 and parse_size("2GB") == 2_000_000_000 and parse_size(4096) == 4096
    settings = load_settings(environ={"CARGOHOLD_CACHE__MAX_SIZE": "1.5MiB", "CARGOHOLD_CACHE__MAX_AGE": "30d"})
    assert settings.cache.max_size == 1536 << 10 and settings.cache.max_age == 30 * 86400
    assert settings.log_format == "text" and settings.metrics_listen is None
    with pytest.raises(ConfigError, match=r"cache.max_size: .*invalid size"):
        load_settings(environ={"CARGOHOLD_CACHE__MAX_SIZE": "lots"})
    with pytest.raises(ConfigError, match="log_format"):
        load_settings(environ={"CARGOHOLD_LOG_FORMAT": "xml"})
    with pytest.raises(ConfigError, match="metrics_listen"):
        load_settings(environ={"CARGOHOLD_METRICS_LISTEN": "nowhere"})
