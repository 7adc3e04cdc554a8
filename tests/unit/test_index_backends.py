"""The SQLite and the Redis index behave the same (Redis: the rig's real redis-server)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as redis

from cargohold.cache.index import Index, SqliteIndex
from cargohold.cache.redisindex import RedisIndex
from rig.redisd import RedisServer

UP, REPO = "docker.io", "library/alpine"
A, B, C = (f"sha256:{c * 64}" for c in "abc")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(params=["sqlite", "redis"])
async def index(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Index]:
    if request.param == "sqlite":
        built: Index = SqliteIndex(tmp_path / "index.sqlite")
    else:
        client = redis.Redis.from_url(request.getfixturevalue("redis_server").url, decode_responses=True)
        await client.flushdb()
        built = RedisIndex(client)
    yield built
    await built.close()


async def test_tags_are_put_checked_pulled_and_dropped(index: Index) -> None:
    assert await index.get_tag(UP, REPO, "3.20") is None
    await index.put_tag(UP, REPO, "3.20", A, "application/vnd.oci.image.index.v1+json")
    first = await index.get_tag(UP, REPO, "3.20")
    assert first is not None and first.digest == A and first.media_type.endswith("index.v1+json")
    await index.mark_checked(UP, REPO, "3.20")
    checked = await index.get_tag(UP, REPO, "3.20")
    assert checked is not None and checked.checked_at >= first.checked_at
    index.touch_tag(UP, REPO, "3.20")
    index.touch_tag(UP, REPO, "3.20")
    await index.flush()
    [row] = await index.tag_rows()
    assert (row.upstream, row.repository, row.tag, row.digest, row.pulls) == (UP, REPO, "3.20", A, 3)
    await index.put_tag(UP, REPO, "3.20", B, "application/vnd.oci.image.manifest.v1+json")  # moved: pulls kept
    assert [(r.digest, r.pulls) for r in await index.tag_rows()] == [(B, 3)]
    await index.drop_tag(UP, REPO, "3.20")
    index.touch_tag(UP, REPO, "3.20")
    await index.mark_checked(UP, REPO, "3.20")
    await index.flush()  # touching a dropped tag does not bring it back
    assert await index.get_tag(UP, REPO, "3.20") is None and await index.tag_rows() == []
    assert (await index.usage()).tags == 0


async def test_content_is_ordered_by_last_access_and_forgotten(index: Index) -> None:
    await index.put_manifest(A, "application/vnd.oci.image.manifest.v1+json", 100)
    await index.put_blob(B, 1000)
    await index.put_blob(C, 10)
    manifest = await index.get_manifest(A)
    assert manifest is not None and manifest.size == 100 and manifest.media_type.endswith("manifest.v1+json")
    assert await index.get_manifest(B) is None
    usage = await index.usage()
    assert (usage.size, usage.blobs, usage.manifests) == (1110, 2, 1)
    index.touch("manifests", A)
    await index.flush()
    order = await index.least_recent(10)
    assert [(e.table, e.digest) for e in order] == [("blobs", B), ("blobs", C), ("manifests", A)]
    assert [e.size for e in order] == [1000, 10, 100]
    assert [e.digest for e in await index.least_recent(1, offset=1)] == [C]
    await index.forget("blobs", B)
    await index.forget("manifests", A)
    index.touch("blobs", B)
    await index.flush()  # an access after eviction does not bring it back
    assert [e.digest for e in await index.stored()] == [C]
    assert await index.get_manifest(A) is None
    assert (await index.usage()).size == 10
    with pytest.raises(ValueError):
        await index.forget("tags", C)


async def test_links_and_counters(index: Index) -> None:
    assert not await index.has_link(UP, REPO, A)
    await index.put_link(UP, REPO, A)
    await index.put_link(UP, REPO, A)
    assert await index.has_link(UP, REPO, A) and not await index.has_link(UP, "other/repo", A)
    index.add_count("hit", 2)
    index.add_count("bytes_cache", 1.5)
    index.add_count("hit", 1)
    await index.flush()
    index.add_count("miss", 1)
    await index.flush()
    assert await index.counters() == {"hit": 3, "bytes_cache": 1.5, "miss": 1}


async def test_ad_hoc_pins_are_kept(index: Index) -> None:
    assert await index.pins() == []
    assert await index.add_pin("docker.io/library/redis:7.*")
    assert not await index.add_pin("docker.io/library/redis:7.*")  # once
    assert await index.add_pin("ghcr.io/org/app")
    assert await index.pins() == ["docker.io/library/redis:7.*", "ghcr.io/org/app"]
    assert await index.remove_pin("ghcr.io/org/app")
    assert not await index.remove_pin("ghcr.io/org/app")
    assert await index.pins() == ["docker.io/library/redis:7.*"]


async def test_tag_moves_are_recorded_newest_first_and_filtered(index: Index) -> None:
    assert await index.tag_moves() == []
    await index.record_tag_move(UP, REPO, "3.20", A, B)
    await index.record_tag_move(UP, REPO, "latest", A, C)
    await index.record_tag_move(UP, "library/redis", "7", B, C)
    await index.record_tag_move(UP, REPO, "3.20", B, C)
    moves = await index.tag_moves(UP, REPO)
    assert [(m.tag, m.old_digest, m.new_digest) for m in moves] == [("3.20", B, C), ("latest", A, C), ("3.20", A, B)]
    assert moves[0].moved_at >= moves[-1].moved_at > 0
    assert [(m.old_digest, m.new_digest) for m in await index.tag_moves(UP, REPO, "3.20")] == [(B, C), (A, B)]
    assert [m.repository for m in await index.tag_moves(limit=2)] == [REPO, "library/redis"]
    assert await index.tag_moves("ghcr.io") == []


async def test_the_tag_move_history_is_bounded(index: Index, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cargohold.cache.index.MAX_TAG_MOVES", 3)
    monkeypatch.setattr("cargohold.cache.redisindex.MAX_TAG_MOVES", 3)
    for tag in "abcde":
        await index.record_tag_move(UP, REPO, tag, A, B)
    assert [m.tag for m in await index.tag_moves()] == ["e", "d", "c"]


async def test_sizes_of_some_digests(index: Index) -> None:
    await index.put_manifest(A, "application/vnd.oci.image.manifest.v1+json", 100)
    await index.put_blob(B, 0)
    assert await index.sizes([A, B, C]) == {A: 100, B: 0}
    assert await index.sizes([]) == {}
    many = [f"sha256:{i:064x}" for i in range(1200)]  # more than one SQLite statement's parameters
    for digest in many[::300]:
        await index.put_blob(digest, 7)
    assert await index.sizes(many) == dict.fromkeys(many[::300], 7)
