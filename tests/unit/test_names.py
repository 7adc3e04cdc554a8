"""Names, tags and digests are matched whole: `re.match` with `$` also matched before a final newline,
so `3.21\n` was a tag and `library/evil\n` a repository (stored by an import, served by the mirror)."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import web

from cargohold.errors import DigestInvalid, ManifestUnknown, NameInvalid
from cargohold.oci.digests import Digest
from cargohold.oci.names import check_name, check_tag
from unit.upstreamkit import error_of, mirror, served

HEX = "a" * 64


def test_a_final_newline_is_no_part_of_a_name_tag_or_digest() -> None:
    assert check_name("library/alpine") == "library/alpine" and check_tag("3.21") == "3.21"
    with pytest.raises(NameInvalid):
        check_name("library/evil\n")
    with pytest.raises(ManifestUnknown):
        check_tag("3.21\n")
    assert str(Digest.parse(f"sha256:{HEX}")) == f"sha256:{HEX}"
    with pytest.raises(DigestInvalid):
        Digest.parse(f"sha256:{HEX}\n")


async def test_the_mirror_refuses_them_without_asking_upstream(tmp_path: Path) -> None:
    asked: list[str] = []

    async def anything(request: web.Request) -> web.Response:
        asked.append(request.path)
        return web.Response(status=500)

    async with (
        served({"/{tail:.*}": anything}) as upstream,
        mirror(tmp_path, {"name": "docker.io", "url": str(upstream.make_url(""))}) as client,
    ):
        resp = await client.get("/v2/library/alpine/manifests/3.21%0A")
        assert resp.status == 404 and (await error_of(resp))["code"] == "MANIFEST_UNKNOWN"
        resp = await client.get("/v2/library/evil%0A/manifests/1")
        assert resp.status == 400 and (await error_of(resp))["code"] == "NAME_INVALID"
        resp = await client.get(f"/v2/library/alpine/blobs/sha256:{HEX}%0A")
        assert resp.status == 400 and (await error_of(resp))["code"] == "DIGEST_INVALID"
    assert asked == []
