"""The manifest, tag and link rules (`cargohold.pull`) without HTTP: a spy remote counts what goes upstream, a spy
store and a spy index (real ones, wrapped) count local calls, as distribution's proxy tests do with statsBlobStore.
Concurrent callers meet in the spy remote's short pause, so single-flight is what keeps its counts at one."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest

from cargohold.cache.index import Index, SqliteIndex
from cargohold.cache.store import BlobStore, FsBlobStore
from cargohold.errors import ManifestUnknown, UpstreamUnavailable
from cargohold.oci.digests import Digest
from cargohold.oci.mediatypes import DOCKER_MANIFEST, FULL_ACCEPT, OCI_INDEX, OCI_MANIFEST, parse_accept
from cargohold.pull import recent
from cargohold.pull.links import Links
from cargohold.pull.manifests import Manifests
from cargohold.pull.tags import Tags
from cargohold.tasks import Tasks
from cargohold.upstream.repository import Descriptor, TagList

CLIENTS = 20
EVERYTHING: frozenset[str] = frozenset()
ONLY_SCHEMA2 = frozenset({DOCKER_MANIFEST})


def _document(media_type: str, **fields: Any) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": media_type, **fields}).encode()


CHILD = _document(DOCKER_MANIFEST, config={"digest": "sha256:" + "c" * 64, "size": 2}, layers=[])
CHILD_DIGEST = Digest.of(CHILD)
IMAGE = _document(OCI_MANIFEST, config={"digest": "sha256:" + "a" * 64, "size": 2}, layers=[])
IMAGE_DIGEST = Digest.of(IMAGE)
INDEX = _document(
    OCI_INDEX, manifests=[{"mediaType": DOCKER_MANIFEST, "digest": str(CHILD_DIGEST), "size": len(CHILD)}]
)
INDEX_DIGEST = Digest.of(INDEX)


class Spy:
    """A real store or index, wrapped: every call is counted by method name and passed on."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return attr(*args, **kwargs)

        return counted


class SpyRemote:
    """An upstream repository in memory that counts calls. An index asked for with an Accept that leaves its type
    out is answered with its (one) child, as the distribution registry answers a schema2-only client."""

    def __init__(self, repository: str = "library/app", tag_ttl: float = 600.0) -> None:
        self.upstream = "docker.io"
        self.repository = repository
        self.tag_ttl = tag_ttl
        self.calls: Counter[str] = Counter()
        self.down = False
        self.content = {
            str(d): (t, b)
            for d, t, b in [
                (CHILD_DIGEST, DOCKER_MANIFEST, CHILD),
                (IMAGE_DIGEST, OCI_MANIFEST, IMAGE),
                (INDEX_DIGEST, OCI_INDEX, INDEX),
            ]
        }
        self.tags = {"multi": str(INDEX_DIGEST), "image": str(IMAGE_DIGEST)}
        self.content_mirrored = False
        self.deferred = 0  # times the rules asked for this remote's deferrable twin

    def deferrable(self) -> SpyRemote:
        self.deferred += 1
        return self

    async def _answer(self, call: str, reference: str, accept: str) -> Descriptor:
        self.calls[call] += 1
        await asyncio.sleep(0.01)  # concurrent callers arrive meanwhile
        if self.down:
            raise UpstreamUnavailable("upstream failed", {})
        digest = self.tags.get(reference, reference)
        if digest not in self.content:
            raise ManifestUnknown("manifest not found upstream")
        media_type, body = self.content[digest]
        if media_type == OCI_INDEX and accept != FULL_ACCEPT and OCI_INDEX not in accept:
            digest = str(CHILD_DIGEST)
            media_type, body = self.content[digest]
        return Descriptor(Digest.parse(digest), media_type, len(body))

    async def head_manifest(self, reference: str, accept: str) -> Descriptor | None:
        return await self._answer("head_manifest", reference, accept)

    async def get_manifest(self, reference: str, accept: str) -> tuple[Descriptor, bytes]:
        found = await self._answer("get_manifest", reference, accept)
        return found, self.content[str(found.digest)][1]

    async def head_blob(self, digest: Digest) -> Descriptor:
        raise AssertionError("no blobs here")

    async def open_blob(self, digest: Digest) -> aiohttp.ClientResponse:
        raise AssertionError("no blobs here")

    async def list_tags(self, n: str | None, last: str | None) -> TagList:
        raise AssertionError("no tag lists here")


class Pull:
    """The services over a spy store and a spy index, as PullThrough builds them."""

    def __init__(self, root: Path) -> None:
        self.store = Spy(FsBlobStore(root))
        self.index = Spy(SqliteIndex(root / "index.sqlite"))
        tasks = Tasks()
        self.links = Links(cast(Index, self.index), tasks)
        self.manifests = Manifests(cast(BlobStore, self.store), cast(Index, self.index), self.links, tasks)
        self.tags = Tags(cast(Index, self.index), self.manifests, self.links, tasks)


@pytest.fixture
def pull(tmp_path: Path) -> Pull:
    return Pull(tmp_path)


async def _together(call: Callable[[], Any]) -> list[Any]:
    return list(await asyncio.gather(*(call() for _ in range(CLIENTS))))


async def test_twenty_gets_of_a_new_tag_make_one_remote_get_then_none(pull: Pull) -> None:
    remote = SpyRemote()
    first = await _together(lambda: pull.tags.get(remote, "multi", EVERYTHING))
    assert {m.body for m in first} == {INDEX} and remote.calls == Counter(get_manifest=1)
    assert pull.store.calls["save"] == 1
    again = await _together(lambda: pull.tags.get(remote, "multi", EVERYTHING))
    assert {m.cache for m in again} == {"hit"} and remote.calls == Counter(get_manifest=1)
    assert pull.store.calls["save"] == 1 and pull.store.calls["load"] == 0  # hot manifests' bytes are in memory


async def test_hot_manifest_bytes_are_served_only_while_the_index_holds_the_manifest(pull: Pull) -> None:
    """Warm hits skip the file read (a worker-thread hop each); eviction removes the index row first and,
    in this process, forgets the manifest, so an evicted manifest is never answered from memory: it is
    fetched again."""
    remote = SpyRemote()
    await pull.manifests.get(remote, IMAGE_DIGEST)
    for _ in range(3):
        assert (await pull.manifests.get(remote, IMAGE_DIGEST)).cache == "hit"
    assert pull.store.calls["load"] == 0 and remote.calls == Counter(get_manifest=1)
    await pull.index.inner.forget("manifests", str(IMAGE_DIGEST))  # what eviction does before the file goes
    pull.manifests.forget(IMAGE_DIGEST)  # and what this process's evictor tells the manifests
    again = await pull.manifests.get(remote, IMAGE_DIGEST)
    assert again.cache == "miss" and remote.calls == Counter(get_manifest=2)


async def test_a_manifest_removed_by_another_process_is_not_served_a_second_later(
    pull: Pull, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker's eviction or the cache CLI removes the row only: the row read within the last
    second may still answer, never one read longer ago."""
    remote = SpyRemote()
    await pull.manifests.get(remote, IMAGE_DIGEST)
    assert (await pull.manifests.get(remote, IMAGE_DIGEST)).cache == "hit"  # the row is read and kept
    await pull.index.inner.forget("manifests", str(IMAGE_DIGEST))
    later = time.monotonic() + 1.0
    monkeypatch.setattr(recent, "monotonic", lambda: later)
    again = await pull.manifests.get(remote, IMAGE_DIGEST)
    assert again.cache == "miss" and remote.calls == Counter(get_manifest=2)


async def test_another_accept_is_asked_once_and_remembered_within_tag_ttl(pull: Pull) -> None:
    """Issue 21 item 8: twenty schema2-only clients of an index tag cost one upstream GET, a second round none."""
    remote = SpyRemote()
    await pull.tags.get(remote, "multi", EVERYTHING)  # the index is cached under the tag
    remote.calls.clear()
    first = await _together(lambda: pull.tags.get(remote, "multi", ONLY_SCHEMA2))
    assert {(m.body, m.descriptor.media_type) for m in first} == {(CHILD, DOCKER_MANIFEST)}
    assert remote.calls == Counter(get_manifest=1)
    again = await _together(lambda: pull.tags.get(remote, "multi", ONLY_SCHEMA2))
    assert {m.body for m in again} == {CHILD} and {m.cache for m in again} == {"hit"}
    assert remote.calls == Counter(get_manifest=1)
    # The index's own entry is untouched: a client taking everything still gets the index.
    assert (await pull.tags.get(remote, "multi", EVERYTHING)).body == INDEX


async def test_another_accept_is_asked_again_after_tag_ttl(pull: Pull) -> None:
    remote = SpyRemote(tag_ttl=0)
    await pull.tags.get(remote, "multi", ONLY_SCHEMA2)  # cold: the index for the tag, then the child
    assert remote.calls == Counter(get_manifest=2)
    await pull.tags.get(remote, "multi", ONLY_SCHEMA2)
    assert remote.calls["get_manifest"] == 3


async def test_cold_tag_with_another_accept_makes_two_remote_gets_for_twenty_clients(pull: Pull) -> None:
    remote = SpyRemote()
    got = await _together(lambda: pull.tags.get(remote, "multi", ONLY_SCHEMA2))
    assert {m.body for m in got} == {CHILD}
    assert remote.calls == Counter(get_manifest=2)  # the tag with the full Accept (indexed), then the client's


async def test_heads_with_another_accept_are_asked_once_and_remembered(pull: Pull) -> None:
    remote = SpyRemote()
    first = await _together(lambda: pull.tags.head(remote, "multi", ONLY_SCHEMA2))
    assert {(h.descriptor.digest, h.cache) for h in first} == {(CHILD_DIGEST, "miss")}
    assert remote.calls == Counter(head_manifest=1)
    again = await _together(lambda: pull.tags.head(remote, "multi", ONLY_SCHEMA2))
    assert {h.cache for h in again} == {"hit"} and remote.calls == Counter(head_manifest=1)
    # A GET with that Accept now fetches only the manifest the HEAD named, by digest.
    assert (await pull.tags.get(remote, "multi", ONLY_SCHEMA2)).body == CHILD
    assert remote.calls == Counter(head_manifest=1, get_manifest=1)


async def test_expired_tag_is_revalidated_by_one_head_for_twenty_clients(pull: Pull) -> None:
    remote = SpyRemote(tag_ttl=0)
    await pull.tags.get(remote, "image", EVERYTHING)
    remote.calls.clear()
    got = await _together(lambda: pull.tags.get(remote, "image", EVERYTHING))
    assert {m.cache for m in got} == {"hit"} and remote.calls == Counter(head_manifest=1)


async def test_moved_tag_fetches_the_new_manifest_by_digest(pull: Pull) -> None:
    remote = SpyRemote(tag_ttl=0)
    await pull.tags.get(remote, "image", EVERYTHING)
    remote.tags["image"] = str(INDEX_DIGEST)
    remote.calls.clear()
    moved = await pull.tags.get(remote, "image", EVERYTHING)
    assert (moved.body, moved.cache) == (INDEX, "miss")
    assert remote.calls == Counter(head_manifest=1, get_manifest=1)
    assert (await pull.index.inner.get_tag("docker.io", "library/app", "image")).digest == str(INDEX_DIGEST)


async def test_stale_when_the_remote_fails(pull: Pull) -> None:
    remote = SpyRemote(tag_ttl=0)
    await pull.tags.get(remote, "image", EVERYTHING)
    remote.down = True
    stale = await pull.tags.get(remote, "image", EVERYTHING)
    assert (stale.body, stale.cache) == (IMAGE, "stale")
    with pytest.raises(UpstreamUnavailable):
        await pull.tags.get(remote, "multi", EVERYTHING)


async def test_head_of_an_uncached_tag_asks_upstream_head_and_stores_nothing(pull: Pull) -> None:
    remote = SpyRemote()
    heads = await _together(lambda: pull.tags.head(remote, "image", EVERYTHING))
    assert {(h.descriptor, h.cache) for h in heads} == {(Descriptor(IMAGE_DIGEST, OCI_MANIFEST, len(IMAGE)), "miss")}
    assert remote.calls == Counter(head_manifest=1) and pull.store.calls["save"] == 0
    assert (await pull.tags.head(remote, "image", parse_accept([FULL_ACCEPT]))).cache == "hit"
    assert remote.calls == Counter(head_manifest=1)


async def test_manifest_by_digest_is_fetched_once_for_twenty_clients(pull: Pull) -> None:
    remote = SpyRemote()
    got = await _together(lambda: pull.manifests.get(remote, IMAGE_DIGEST))
    assert {m.body for m in got} == {IMAGE} and remote.calls == Counter(get_manifest=1)
    head = await pull.manifests.head(remote, IMAGE_DIGEST)
    assert (head.descriptor.size, head.cache) == (len(IMAGE), "hit") and remote.calls == Counter(get_manifest=1)


async def test_cached_manifest_reaches_another_repository_after_one_head_there(pull: Pull) -> None:
    await pull.manifests.get(SpyRemote("library/app"), IMAGE_DIGEST)
    other = SpyRemote("library/other")
    got = await _together(lambda: pull.manifests.get(other, IMAGE_DIGEST))
    assert {m.cache for m in got} == {"hit"} and other.calls == Counter(head_manifest=1)
    await pull.manifests.get(other, IMAGE_DIGEST)
    assert other.calls == Counter(head_manifest=1)
    nowhere = SpyRemote("library/nowhere")
    nowhere.content.clear()
    with pytest.raises(ManifestUnknown):
        await pull.manifests.get(nowhere, IMAGE_DIGEST)


async def test_with_content_mirrors_a_new_tag_is_resolved_by_head_and_fetched_by_digest(pull: Pull) -> None:
    """Issue 17: with content mirrors, a new tag costs a HEAD (free) and a GET by digest (a mirror's first)."""
    remote = SpyRemote()
    remote.content_mirrored = True
    got = await _together(lambda: pull.tags.get(remote, "image", EVERYTHING))
    assert {m.body for m in got} == {IMAGE}
    assert remote.calls == Counter(head_manifest=1, get_manifest=1)
    assert (await pull.index.inner.get_tag("docker.io", "library/app", "image")).digest == str(IMAGE_DIGEST)


async def test_refreshing_a_tag_nobody_asked_about_lately_is_deferrable(
    pull: Pull, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 17: a revalidation's pull for a tag no client asked about within tag_ttl may be deferred when the
    quota is at its reserve; one asked about within tag_ttl may not."""
    clock = [1_000_000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    monkeypatch.setattr(recent, "monotonic", lambda: clock[0])  # the hits of the last second lapse too
    remote = SpyRemote(tag_ttl=600)
    await pull.tags.get(remote, "image", EVERYTHING)
    clock[0] += 400
    await pull.tags.get(remote, "image", EVERYTHING)  # within tag_ttl: answered from the index
    clock[0] += 400
    await pull.tags.get(remote, "image", EVERYTHING)  # expired, but asked 400 s ago: a client cares
    assert remote.deferred == 0 and remote.calls["head_manifest"] == 1
    clock[0] += 1000
    await pull.tags.get(remote, "image", EVERYTHING)  # nobody asked within tag_ttl
    assert remote.deferred == 1 and remote.calls["head_manifest"] == 2


async def test_a_hit_is_remembered_for_a_second_for_get_and_head(pull: Pull, monkeypatch: pytest.MonkeyPatch) -> None:
    """`Tags._hits`: within the second after a hit, GETs and HEADs of the tag with the same Accept read nothing
    again (each still counted as a pull of the tag); after it the rows are read as before."""
    remote = SpyRemote()
    await pull.tags.get(remote, "multi", EVERYTHING)
    assert (await pull.tags.get(remote, "multi", EVERYTHING)).cache == "hit"  # remembered now
    pull.index.calls.clear()
    for _ in range(5):
        assert (await pull.tags.get(remote, "multi", EVERYTHING)).body == INDEX
        assert (await pull.tags.head(remote, "multi", EVERYTHING)).descriptor.digest == INDEX_DIGEST
    assert pull.index.calls == Counter(touch_tag=10)
    assert (await pull.tags.get(remote, "multi", ONLY_SCHEMA2)).body == CHILD  # another Accept: its own answer
    later = time.monotonic() + 1.0
    monkeypatch.setattr(recent, "monotonic", lambda: later)
    pull.index.calls.clear()
    assert (await pull.tags.get(remote, "multi", EVERYTHING)).cache == "hit"
    assert pull.index.calls["get_tag"] == 1


async def test_a_remembered_hit_goes_with_a_tag_move_an_eviction_and_the_tag_ttl(
    pull: Pull, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hit is not remembered past this process's move of the tag or eviction of a manifest, nor past the
    moment the tag is due for revalidation."""
    remote = SpyRemote()
    await pull.tags.get(remote, "image", EVERYTHING)
    await pull.tags.get(remote, "image", EVERYTHING)
    remote.tags["image"] = str(INDEX_DIGEST)
    await pull.tags.refresh(remote, "image")  # moved: the index points the tag at the index now
    assert (await pull.tags.get(remote, "image", EVERYTHING)).body == INDEX
    assert (await pull.tags.get(remote, "image", EVERYTHING)).cache == "hit"  # remembered again
    await pull.index.inner.forget("manifests", str(INDEX_DIGEST))
    pull.manifests.forget(INDEX_DIGEST)  # this process's eviction
    assert (await pull.tags.get(remote, "image", EVERYTHING)).cache == "miss"
    short = SpyRemote(repository="library/short", tag_ttl=0.25)
    await pull.tags.get(short, "image", EVERYTHING)
    await pull.tags.get(short, "image", EVERYTHING)
    start, wall = time.monotonic(), time.time()
    monkeypatch.setattr(recent, "monotonic", lambda: start + 0.5)  # within the second, past the hit's time
    monkeypatch.setattr(time, "time", lambda: wall + 0.5)  # past tag_ttl
    short.calls.clear()
    await pull.tags.get(short, "image", EVERYTHING)
    assert short.calls["head_manifest"] == 1  # revalidated, not answered from the remembered hit
