"""tags/list pages cut by cargohold when the upstream ignores `n` and `last` (distribution 2.x does)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from cargohold.handlers.tags import page
from unit.upstreamkit import mirror

BODY = json.dumps({"name": "acme/tool", "tags": ["test3", "1.0", "test1", "test0", "test2"]}).encode()


def _tags(cut: tuple[bytes, str | None] | None) -> list[str]:
    assert cut is not None
    return list(json.loads(cut[0])["tags"])


def test_nothing_asked_nothing_cut() -> None:
    assert page(BODY, None, None) is None


def test_n_cuts_in_lexical_order_and_names_the_next_page() -> None:
    cut = page(BODY, "2", None)
    assert _tags(cut) == ["1.0", "test0"] and cut is not None and cut[1] == {"n": "2", "last": "test0"}


def test_last_starts_after_it_and_the_last_page_has_no_next() -> None:
    cut = page(BODY, "2", "test1")
    assert _tags(cut) == ["test2", "test3"] and cut is not None and cut[1] is None
    assert _tags(page(BODY, None, "test2")) == ["test3"]


def test_an_already_paged_list_is_left_as_it_is() -> None:
    paged = json.dumps({"name": "acme/tool", "tags": ["test0", "test1"]}).encode()
    assert _tags(page(paged, "2", None)) == ["test0", "test1"]


def test_a_body_without_a_tag_list_is_passed_on() -> None:
    assert page(json.dumps({"name": "x", "tags": None}).encode(), "2", None) is None


def _tag_upstream(link: str | None) -> web.Application:
    """Answers every tag at once (as distribution 2.x does), with `link` as its Link when given."""

    async def tags(request: web.Request) -> web.Response:
        body = {"name": request.match_info["name"], "tags": ["c", "a", "b"]}
        return web.json_response(body, headers={"Link": link} if link else None)

    app = web.Application()
    app.router.add_get("/v2/{name:.+}/tags/list", tags)
    return app


async def test_next_page_links_name_this_mirror_and_the_clients_namespace(tmp_path: Path) -> None:
    """The upstream's Link went out as it was, host and port included: a host clients must not learn
    of. And the Link of a page cut here lost `?ns=`, sending the next page to the default upstream."""
    internal = '<https://registry.corp.internal:5443/v2/team/app/tags/list?n=1&last=a&token=s3cret>; rel="next"'
    for link, expected in (
        (internal, "</v2/team/app/tags/list?n=1&last=a"),
        (None, "</v2/team/app/tags/list?n=2&last=b"),
    ):
        upstream = TestServer(_tag_upstream(link), host="127.0.0.1")
        await upstream.start_server()
        default = {"name": "docker.io", "url": "http://127.0.0.1:9"}
        try:
            async with mirror(tmp_path, default, {"name": "reg.test", "url": str(upstream.make_url(""))}) as client:
                resp = await client.get(
                    "/v2/team/app/tags/list", params={"n": "2" if link is None else "1", "ns": "reg.test"}
                )
                assert resp.status == 200, await resp.text()
                assert resp.headers["Link"] == f'{expected}&ns=reg.test>; rel="next"'
                resp = await client.get("/v2/reg.test/team/app/tags/list", params={"n": "1"})
                assert resp.headers["Link"].startswith("</v2/reg.test/team/app/tags/list?n=1&last=a")
                assert "corp.internal" not in resp.headers["Link"] and "s3cret" not in resp.headers["Link"]
        finally:
            await upstream.close()


async def test_a_tag_list_nested_too_deep_is_the_upstreams_fault(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A tag list of 200,000 nested arrays (400 KB, well under the size bound) answered 500 with a
    RecursionError traceback: the JSON check caught ValueError only."""

    async def tags(request: web.Request) -> web.Response:
        return web.Response(body=b"[" * 200_000 + b"]" * 200_000, content_type="application/json")

    app = web.Application()
    app.router.add_get("/v2/{name:.+}/tags/list", tags)
    upstream = TestServer(app, host="127.0.0.1")
    await upstream.start_server()
    try:
        async with mirror(tmp_path, {"name": "docker.io", "url": str(upstream.make_url(""))}) as client:
            resp = await client.get("/v2/team/app/tags/list")
            assert resp.status == 502 and (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"
    finally:
        await upstream.close()
    assert "Traceback" not in caplog.text and "RecursionError" not in caplog.text
