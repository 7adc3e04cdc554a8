"""The pieces of sync lists, immutable tags and offline mode that need no rig: configuration, tag-list paging,
"newest" order, and who sees which tag moves on the status page."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from test_auth_app import basic, make_client  # noqa: F401 - make_client is a fixture used below

from cargohold.config import ConfigError, Settings, load_settings
from cargohold.keys import PROXY
from cargohold.sync.entries import sync_pins
from cargohold.sync.run import list_tags, platform_wanted, version_key
from cargohold.sync.schedule import Scheduler
from cargohold.sync.state import load
from cargohold.tasks import Tasks
from cargohold.upstream.repository import TagList


def _settings(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "c.yml"
    path.write_text(text)
    return load_settings(path, environ={})


def test_offline_at_the_top_makes_every_upstream_offline(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path,
        "offline: true\nupstreams:\n- {name: docker.io, url: 'http://h'}\n- {name: ghcr.io, url: 'http://g'}\n",
    )
    assert [u.offline for u in settings.upstreams] == [True, True]
    assert load_settings(None, environ={"CARGOHOLD_OFFLINE": "true"}).upstreams[0].offline
    one = _settings(
        tmp_path,
        "upstreams:\n- {name: docker.io, url: 'http://h', offline: true}\n- {name: ghcr.io, url: 'http://g'}\n",
    )
    assert [u.offline for u in one.upstreams] == [True, False]


def test_immutable_tags_match_the_tag_or_repository_and_tag(tmp_path: Path) -> None:
    upstream = _settings(
        tmp_path, "upstreams:\n- {name: docker.io, url: 'http://h', immutable_tags: ['v*', 'library/postgres:16*']}\n"
    ).upstreams[0]
    assert upstream.immutable("acme/app", "v1.2")
    assert upstream.immutable("library/postgres", "16.4") and not upstream.immutable("library/redis", "16.4")
    assert not upstream.immutable("acme/app", "latest")


def test_sync_entries_are_checked_named_and_pinned(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path,
        "sync:\n- {images: [postgres:16, 'library/redis:7.*'], every: 6h, platforms: [linux/amd64]}\n"
        "- {name: apps, images: [ghcr.io/org/app], tags: 3}\n"
        "upstreams:\n- {name: docker.io, url: 'http://h'}\n- {name: ghcr.io, url: 'http://g'}\n",
    )
    assert settings.sync_names == ["1", "apps"] and settings.sync[0].every == 6 * 3600
    assert sync_pins(settings) == ["docker.io/library/postgres:16", "docker.io/library/redis:7.*", "ghcr.io/org/app"]
    for bad, word in (
        ("sync: [{images: []}]", "images"),
        ("sync: [{images: [a], platforms: [amd64]}]", "platform"),
        ("sync: [{images: ['a@sha256:00']}]", "invalid image"),
        ("sync: [{images: [a], every: 5s}]", "every"),
        ("sync: [{images: [a], tags: newest}]", "tags"),
        ("sync: [{name: x, images: [a]}, {name: x, images: [b]}]", "unique"),
        ("sync: [{images: [quay.io/org/app]}]", "not an upstream"),
    ):
        with pytest.raises(ConfigError, match=word):
            _settings(tmp_path, bad)


def test_newest_tags_are_ordered_as_versions() -> None:
    tags = ["1.10", "1.9", "1.9.1", "latest", "2.0-rc1", "2.0"]
    assert sorted(tags, key=version_key)[-3:] == ["1.10", "2.0", "2.0-rc1"]  # `latest` is no version
    assert sorted(["1.10", "1.9", "1.9.1"], key=version_key) == ["1.9", "1.9.1", "1.10"]
    assert platform_wanted("linux/arm64/v8", ["linux/arm64"]) and not platform_wanted("linux/amd64", ["linux/arm64"])
    assert platform_wanted(None, []) and not platform_wanted(None, ["linux/amd64"])


class _PagedRemote:
    """Lists `tags` in pages of `size`, with a Link while more follow, as registries do."""

    upstream, repository, tag_ttl = "docker.io", "acme/app", 600.0

    def __init__(self, tags: list[str], size: int) -> None:
        self.tags, self.size, self.asked = tags, size, 0

    async def list_tags(self, n: str | None, last: str | None) -> TagList:
        self.asked += 1
        start = self.tags.index(last) + 1 if last else 0
        page = self.tags[start : start + self.size]
        more = start + self.size < len(self.tags)
        return TagList(
            json.dumps({"name": self.repository, "tags": page}).encode(), '<next>; rel="next"' if more else None
        )


async def test_the_tag_list_is_read_page_after_page() -> None:
    remote = _PagedRemote([f"t{i:03}" for i in range(25)], 10)
    assert await list_tags(remote) == remote.tags  # type: ignore[arg-type]
    assert remote.asked == 3


@pytest.mark.parametrize("tags", [5, "latest", {"a": 1}, None])
async def test_a_tag_list_whose_tags_are_no_list_has_no_tags(tags: object) -> None:
    """`"tags": 5` from an upstream raised TypeError in the sync run ("int is not iterable")."""

    class Odd(_PagedRemote):
        async def list_tags(self, n: str | None, last: str | None) -> TagList:
            return TagList(json.dumps({"name": self.repository, "tags": tags}).encode(), None)

    assert await list_tags(Odd([], 10)) == []  # type: ignore[arg-type]


async def test_status_page_shows_tag_moves_only_of_images_the_viewer_may_pull(make_client: Any) -> None:  # noqa: F811
    make, _ = make_client
    rules = {"rules": [{"users": ["alice"], "repositories": ["library/*"]}], "anonymous": True}
    client = await make(rules)
    index = client.server.app[PROXY].index
    for repository in ("library/alpine", "acme/secret"):
        await index.record_tag_move("docker.io", repository, "3", "sha256:" + "a" * 64, "sha256:" + "b" * 64)
    pages: Mapping[str, str] = {
        who: await (await client.get("/", headers=basic(who) if who else {})).text() for who in ("alice", "")
    }
    assert "library/alpine:3" in pages["alice"] and "acme/secret" not in pages["alice"]
    assert "acme/secret" not in pages[""] and "Log in to see the tag moves" in pages[""]


class _BlockedSyncer:
    """Stands in for the syncer: a run that lasts until released."""

    def __init__(self) -> None:
        self.started, self.release = asyncio.Event(), asyncio.Event()

    async def run(self, entry: Any, state: Any, progress: Any) -> None:
        self.started.set()
        await self.release.wait()


async def test_a_run_due_while_the_previous_one_goes_on_is_skipped_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings.model_validate({"data_dir": str(tmp_path), "sync": [{"name": "db", "images": ["postgres:16"]}]})
    syncer = _BlockedSyncer()
    scheduler = Scheduler(settings, syncer, Tasks())  # type: ignore[arg-type]
    first = asyncio.create_task(scheduler.run_now("db"))
    await syncer.started.wait()
    other_process = Scheduler(settings, _BlockedSyncer(), Tasks())  # type: ignore[arg-type]  # same data_dir: the file lock
    assert await scheduler.run_now("db") is None and await other_process.run_now("db") is None
    assert scheduler.states["db"].skipped_runs == 1 and scheduler.states["db"].running
    assert "the previous run still goes on: this run is skipped" in caplog.text
    syncer.release.set()
    done = await first
    assert done is not None and done.ok and not done.running
    assert load(tmp_path, "db").finished == done.finished  # what `cargohold sync status` reads
