"""One suite, every blob store: the filesystem store and the S3 store (against moto's S3 server) keep
the same contract, the one `BlobStore` names and the proxy, downloads and eviction rely on."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from blobmirror import s3_fixture  # noqa: F401 - a fixture

from cargohold.cache.s3store import open_s3_store
from cargohold.cache.store import BlobStore, FsBlobStore, RemoteBlob
from cargohold.config import S3Config
from cargohold.oci.digests import Digest
from rig.s3 import S3Server


@pytest.fixture(params=["filesystem", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    if request.param == "filesystem":
        yield FsBlobStore(tmp_path)
        return
    s3: S3Server = request.getfixturevalue("s3")
    config = S3Config.model_validate(s3.storage(f"{tmp_path.name}/")["s3"])
    async with open_s3_store(config, tmp_path) as opened:
        yield opened


def _digest(data: bytes) -> Digest:
    return Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())


async def _size(found: Path | RemoteBlob | None) -> int | None:
    if found is None:
        return None
    return (await asyncio.to_thread(found.stat)).st_size if isinstance(found, Path) else found.size


async def _bytes(found: Path | RemoteBlob) -> bytes:
    if isinstance(found, Path):
        return await asyncio.to_thread(found.read_bytes)
    remote: RemoteBlob = found  # ruff's ASYNC240 does not narrow the union: it would take chunks() for Path's
    chunks = await remote.chunks(0, remote.size)
    assert chunks is not None
    return b"".join([chunk async for chunk in chunks])


async def _commit(store: BlobStore, data: bytes) -> Digest:
    """Land `data` as a download does: a temp file, written and synced, committed on a worker thread."""
    fd, temp = store.new_temp()
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    digest = _digest(data)
    assert await asyncio.to_thread(store.commit, temp, digest) == len(data)
    assert not temp.exists()
    return digest


async def test_what_is_not_stored_is_not_found(store: BlobStore) -> None:
    digest = _digest(b"never stored")
    assert await store.locate(digest) is None
    assert await store.load(digest) is None
    assert await store.delete(digest) == 0


async def test_saved_content_loads_back(store: BlobStore) -> None:
    body = b'{"schemaVersion": 2}'
    digest = _digest(body)
    await store.save(digest, body)
    assert await store.load(digest) == body
    assert await _size(await store.locate(digest)) == len(body)


async def test_a_committed_download_is_found_whole(store: BlobStore) -> None:
    data = os.urandom(300_000)
    digest = await _commit(store, data)
    found = await store.locate(digest)
    assert found is not None and await _size(found) == len(data)
    assert await _bytes(found) == data


async def test_an_empty_blob_is_a_blob(store: BlobStore) -> None:
    digest = await _commit(store, b"")
    found = await store.locate(digest)
    assert found is not None and await _size(found) == 0 and await _bytes(found) == b""


async def test_delete_frees_its_bytes_once(store: BlobStore) -> None:
    data = os.urandom(5000)
    digest = await _commit(store, data)
    assert await store.delete(digest) == len(data)
    assert await store.locate(digest) is None
    assert await store.delete(digest) == 0


async def test_entries_list_what_is_stored(store: BlobStore) -> None:
    stored = {await _commit(store, os.urandom(n)): n for n in (10, 2000)}
    body = b"{}"
    await store.save(_digest(body), body)
    stored[_digest(body)] = len(body)
    assert {digest: size async for digest, size in store.entries()} == stored


async def test_discarded_and_leftover_temp_files_go(store: BlobStore) -> None:
    fd, temp = store.new_temp()
    os.close(fd)
    store.discard(temp)
    assert not temp.exists()
    store.discard(temp)  # twice is fine
    for _ in range(2):
        fd, _ = store.new_temp()
        os.close(fd)
    assert store.clean_temp() == 2
    assert store.clean_temp() == 0


async def test_pins_count_readers_of_this_process(store: BlobStore) -> None:
    digest = _digest(b"pinned")
    assert not store.in_use(digest)
    first, second = store.pin(digest), store.pin(digest)
    first.release()
    first.release()  # a second release does nothing
    assert store.in_use(digest)
    second.release()
    assert not store.in_use(digest)
