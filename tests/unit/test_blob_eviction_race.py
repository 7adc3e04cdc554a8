"""A cached file removed (evicted, `cache rm`) between finding it and opening it is fetched again by the
proxy, and the client gets the whole blob as if nothing happened."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from blobmirror import KeepAlive, Upstream, mirror, server_log_fixture  # noqa: F401 - a fixture

from cargohold.keys import PROXY
from cargohold.oci.digests import Digest


async def test_a_hit_removed_before_it_is_opened_is_fetched_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server_log: Callable[[], str]
) -> None:
    upstream = Upstream()
    data = os.urandom(1 << 20)
    digest = upstream.add(data)
    path = f"/v2/library/app/blobs/{digest}"
    async with mirror(tmp_path, upstream) as srv, KeepAlive.open(srv.port) as conn:
        assert (await conn.request(path)).body == data
        await srv.settled()
        store = srv.app[PROXY].store
        locate = store.locate

        async def locate_then_remove(wanted: Digest) -> Path | None:
            found = await locate(wanted)
            if isinstance(found, Path):
                found.unlink()  # just after it was found, before it is opened
            return found

        monkeypatch.setattr(store, "locate", locate_then_remove)
        for method in ("GET", "HEAD"):
            answer = await conn.request(path, method)
            assert answer.status == 200 and answer.headers["content-length"] == str(len(data))
            assert answer.body == (data if method == "GET" else b"")
            await srv.settled()
        assert upstream.gets == 2
