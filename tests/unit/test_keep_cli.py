"""`cargohold cache pin|unpin|history` on a real index, and pins protecting content from `evict`."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from cargohold.cache.evict import evict
from cargohold.cache.index import SqliteIndex, TagRow
from cargohold.cache.pins import pin_matches, resolve_pins
from cargohold.cache.store import FsBlobStore
from cargohold.cli import main
from cargohold.oci.digests import Digest

A, B, C = (f"sha256:{c * 64}" for c in "abc")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "cargohold.yaml"
    path.write_text(f"data_dir: {tmp_path / 'data'}\ncache:\n  pin: [docker.io/acme/*]\n")
    return path


def _row(name: str) -> TagRow:
    upstream, _, rest = name.partition("/")
    repository, _, tag = rest.rpartition(":")
    return TagRow(upstream, repository, tag, A, 0.0, 0)


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("docker.io/library/redis:7.*", "docker.io/library/redis:7.2", True),
        ("docker.io/library/redis:7.*", "docker.io/library/redis:8.0", False),
        ("docker.io/library/redis", "docker.io/library/redis:anything", True),
        ("docker.io/library/redis", "docker.io/library/redis-stack:7", False),
        ("ghcr.io/org/*", "ghcr.io/org/team/app:1", True),
        ("ghcr.io/org/*", "docker.io/org/app:1", False),
    ],
)
def test_pin_globs(pattern: str, name: str, expected: bool) -> None:
    assert pin_matches(pattern, _row(name)) is expected


async def test_pinned_content_is_not_evicted_but_counts_toward_the_cap(tmp_path: Path) -> None:
    store, index = FsBlobStore(tmp_path), SqliteIndex(tmp_path / "index.sqlite")
    layer, config = b"L" * 1000, b"{}"
    manifest = (
        f'{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"digest":"{Digest.of(config)}","size":2}},'
        f'"layers":[{{"digest":"{Digest.of(layer)}","size":1000}}]}}'
    ).encode()
    other = b"O" * 500
    for content in (layer, config, other):
        store.write(Digest.of(content), content)
        await index.put_blob(str(Digest.of(content)), len(content))
    store.write(Digest.of(manifest), manifest)
    await index.put_manifest(str(Digest.of(manifest)), OCI_MANIFEST, len(manifest))
    await index.put_tag("docker.io", "acme/tool", "1.0", str(Digest.of(manifest)), OCI_MANIFEST)

    pinned = await resolve_pins(index, store, ["docker.io/acme/tool"])
    assert pinned.digests == {str(Digest.of(c)) for c in (layer, config, manifest)}
    assert pinned.size == 1002 + len(manifest)
    removed = await evict(
        index,
        store,
        max_size=100,
        unused_since=time.time() + 1,
        pins=lambda: resolve_pins(index, store, ["docker.io/acme/tool"]),
    )
    assert [e.digest for e in removed] == [str(Digest.of(other))], "only the unpinned blob goes, even past the cap"
    assert (await index.usage()).size == pinned.size
    await index.add_pin("docker.io/acme/other")  # an ad-hoc pin of something else protects nothing here
    assert (await resolve_pins(index, store, [])).size == 0
    await index.add_pin("docker.io/acme/tool:1.*")  # an ad-hoc pin in the index counts like a configured one
    assert (await resolve_pins(index, store, [])) == pinned
    await index.close()


def test_pin_unpin_and_history_commands(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index = SqliteIndex(tmp_path / "data" / "index.sqlite")

    async def moves() -> None:
        await index.record_tag_move("docker.io", "library/alpine", "3.20", A, B)
        await index.record_tag_move("docker.io", "library/alpine", "latest", B, C)
        await index.record_tag_move("docker.io", "library/redis", "7", A, C)
        await index.close()

    asyncio.run(moves())
    assert main(["cache", "pin", "library/redis:7.*", "--config", str(config)]) == 0
    assert main(["cache", "pin", "redis:7.*", "--config", str(config)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "pinned docker.io/library/redis:7.*",
        "docker.io/library/redis:7.* was pinned already",
    ]
    assert main(["cache", "unpin", "docker.io/library/redis:7.*", "--config", str(config)]) == 0
    assert main(["cache", "unpin", "docker.io/acme/*", "--config", str(config)]) == 1
    assert "it is in cache.pin" in capsys.readouterr().err

    assert main(["cache", "history", "alpine", "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and "docker.io/library/alpine:latest" in lines[1] and B[:19] in lines[1]
    assert "docker.io/library/alpine:3.20" in lines[2] and f"{A[:19]} -> {B[:19]}" in lines[2]
    assert main(["cache", "history", "alpine:3.20", "--config", str(config)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(["cache", "history", "ghcr.io/org/app", "--config", str(config)]) == 0
    assert capsys.readouterr().out.strip() == "no tag of ghcr.io/org/app has moved"
