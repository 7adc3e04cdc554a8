"""Sync lists against upstreams whose tag lists are odd or hostile (odd names, pages of a million tags, pages
repeated), entry names that would leave data_dir/sync, state files that are not what we write, and `warm` of a
platform an index lacks: the reviewer's second look (docs/security.md, "Sync lists (second look)")."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from cargohold.cli.cache import warm
from cargohold.config import ConfigError, Settings, load_settings
from cargohold.sync import run
from cargohold.sync.run import list_tags, newest, version_key
from cargohold.sync.state import load
from cargohold.upstream.repository import TagList
from rig.referrers import OCI_INDEX, OCI_MANIFEST, Artifact, ReferrersRegistry, artifact
from unit.upstreamkit import mirror


class _Listing:
    """An upstream's tag list: `pages` in turn (the last one again and again), each with a Link if `link`."""

    upstream, repository, tag_ttl = "docker.io", "acme/app", 600.0

    def __init__(self, pages: list[list[Any]], link: bool = True) -> None:
        self.pages, self.link, self.asked = pages, link, 0

    async def list_tags(self, n: str | None, last: str | None) -> TagList:
        page = self.pages[min(self.asked, len(self.pages) - 1)]
        self.asked += 1
        return TagList(
            json.dumps({"name": self.repository, "tags": page}).encode(), '<n>; rel="next"' if self.link else None
        )


async def test_odd_tag_names_are_left_out_and_version_order_never_raises() -> None:
    """Finding 3: `1²` made version_key raise ValueError (str.isdigit is true for `²`, int() refuses it), and a
    1 with 5,000 zeros "Exceeds the limit (4300 digits)": `sync run` stopped with a traceback."""
    huge = "1" + "0" * 5000
    for tag in ("1\u00b2", huge, "\u0663.1", "v1." + "9" * 200):
        version_key(tag)
    assert sorted(["1.10", "1.9", "1.09", "1.9.1", "1.0000000000000000000000000001"], key=version_key) == [
        "1.0000000000000000000000000001",
        "1.9",
        "1.09",
        "1.9.1",
        "1.10",
    ]
    listing = _Listing([["1.0", "1.1", "1\u00b2", huge, "-x", ".x", "a" * 129, "ok_1.2-rc", 7, None]], link=False)
    listed = await list_tags(listing)  # type: ignore[arg-type]
    assert listed == ["1.0", "1.1", "ok_1.2-rc"]
    assert newest(["1.0", "latest", "1.2", huge, "1.10"], 2) == ["1.10", huge]


async def test_duplicate_tags_from_an_upstream_that_ignores_last_are_listed_once() -> None:
    """Finding 5: an upstream that ignores `last` and always sends a Link: `tags: 2` synced 1.2 twice, a glob
    over 3 tags ran 300 jobs (100 pages of the same 3)."""
    listing = _Listing([["1.0", "1.1", "1.2", "1.1"]])
    assert await list_tags(listing) == ["1.0", "1.1", "1.2"]  # type: ignore[arg-type]
    assert listing.asked == 2  # the second page brought nothing new: the end


async def test_a_hostile_tag_list_is_bounded_and_read_off_the_event_loop(caplog: pytest.LogCaptureFixture) -> None:
    """Finding 4: an upstream ignoring n=1000 sent 16 MiB pages of 1.3M tags each; every page was kept (100 pages
    allowed: ~60 GB) and sorted by version_key on the event loop (the server stalled 19 s with 2 pages)."""
    pages = [[f"{p}.{i}" for i in range(60_000)] for p in range(3)]
    listing = _Listing(pages, link=True)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    beat = asyncio.create_task(ticker())
    try:
        listed = await list_tags(listing)  # type: ignore[arg-type]
        assert ticks > 0  # the loop went on while the pages were parsed
        assert len(listed) == run.MAX_TAGS and listed[:2] == ["0.0", "0.1"] and listed[-1] == "1.39999"
        assert listing.asked == 2 and "more than 100,000 tags: the rest is left out" in caplog.text
        assert newest(listed, 2) == ["1.39998", "1.39999"]
    finally:
        beat.cancel()
    caplog.clear()
    whole = _Listing([[f"t{i}" for i in range(run.MAX_TAGS)]], link=False)  # exactly as many: nothing left out
    assert len(await list_tags(whole)) == run.MAX_TAGS and "left out" not in caplog.text  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["nightly/base", "../../escaped", ".hidden", "a" * 65, ""])
def test_a_sync_entry_name_that_is_no_plain_file_name_is_a_config_error(tmp_path: Path, name: str) -> None:
    """Finding 10: `name: nightly/base` failed every run on its state file (FileNotFoundError), and
    `name: ../../escaped` put its lock file outside data_dir."""
    path = tmp_path / "c.yml"
    path.write_text(json.dumps({"sync": [{"name": name, "images": ["postgres:16"]}]}))
    with pytest.raises(ConfigError, match="sync entry name"):
        load_settings(path, environ={})
    ok = Settings.model_validate({"sync": [{"name": "team-1.2_b", "images": ["a"]}, {"images": ["b"]}]})
    assert ok.sync_names == ["team-1.2_b", "2"]


@pytest.mark.parametrize("saved", ["null", "[]", '"x"', '{"name": "db", "errors": 5}', '{"name": "db", "ok": "yes"}'])
def test_a_state_file_that_is_not_what_we_write_is_a_fresh_state(tmp_path: Path, saved: str) -> None:
    """Finding 10: a state file of `null` or `[]` raised AttributeError in `load` (`sync status` failed)."""
    (tmp_path / "sync").mkdir()
    (tmp_path / "sync" / "db.json").write_text(saved)
    state = load(tmp_path, "db")
    assert state.name == "db" and state.finished is None and state.errors == []


def _image(seed: str) -> Artifact:
    """An image manifest: a config and a layer of its own."""
    config = ("application/vnd.oci.image.config.v1+json", json.dumps({"seed": seed}).encode())
    return artifact(config[0], [("application/vnd.oci.image.layer.v1.tar", seed.encode() * 3)], config=config)


async def test_warm_of_a_platform_the_index_lacks_fails_naming_the_platforms_it_has(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Minor: `warm IMAGE --platform linux/s390x` on an index without it printed "warm (0 blobs, 0 B)", exit 0."""
    registry = ReferrersRegistry()
    amd, arm = registry.add("acme/app", _image("amd")), registry.add("acme/app", _image("arm"))
    children = [(amd, {"os": "linux", "architecture": "amd64"}), (arm, {"os": "linux", "architecture": "arm64"})]
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{**a.descriptor(), "mediaType": OCI_MANIFEST, "platform": p} for a, p in children],
    }
    registry.add("acme/app", Artifact(json.dumps(document).encode(), {}, OCI_INDEX), "1.0")
    server = TestServer(registry.app(), host="127.0.0.1")
    await server.start_server()
    try:
        upstream = {"name": "reg.test", "url": str(server.make_url("")).rstrip("/")}
        async with mirror(tmp_path, upstream) as client:
            settings = Settings.model_validate({"data_dir": str(tmp_path), "upstreams": [upstream]})
            base = str(client.make_url("")).rstrip("/")
            assert await warm(settings, ["reg.test/acme/app:1.0"], "linux/s390x", base, None) == 1
            assert "no linux/s390x platform (it has linux/amd64, linux/arm64)" in capsys.readouterr().err
            assert await warm(settings, ["reg.test/acme/app:1.0"], "linux/arm64", base, None) == 0
            assert "warm (2 blobs" in capsys.readouterr().out
    finally:
        await server.close()
