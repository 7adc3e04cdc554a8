"""A failure once a response's headers are out cuts the connection: an error document sent then would
be read by the client as the rest of the body (a 200 whose body is a 500's JSON). A client that went
away is let go without a traceback."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import NoReturn

import pytest
from blobmirror import KeepAlive, Upstream, mirror

from cargohold import blobsource


def _one_blob() -> tuple[Upstream, bytes, str]:
    """An upstream with one blob: it, its bytes and its path on the mirror."""
    upstream = Upstream()
    data = os.urandom(64 << 10)
    return upstream, data, f"/v2/library/app/blobs/{upstream.add(data)}"


async def test_a_failure_after_the_headers_cuts_the_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    upstream, data, path = _one_blob()
    async with mirror(tmp_path, upstream) as srv:
        async with KeepAlive.open(srv.port) as conn:
            assert (await conn.request(path)).body == data
        await srv.settled()

        async def broken(*args: object) -> NoReturn:
            raise RuntimeError("a bug while sending")

        monkeypatch.setattr(blobsource, "send_file", broken)
        with caplog.at_level(logging.ERROR, "cargohold.server"):
            async with KeepAlive.open(srv.port) as conn:
                with pytest.raises(asyncio.IncompleteReadError) as cut:
                    await conn.request(path)
        assert b'"errors"' not in cut.value.partial  # no error document where the blob was expected
        assert "a bug while sending" in caplog.text  # the bug itself is logged, once, by cargohold
        assert "Error handling request" not in caplog.text


async def test_a_client_gone_before_the_headers_leaves_no_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    upstream, data, path = _one_blob()

    async def gone(*args: object) -> NoReturn:
        raise ConnectionResetError("Cannot write to closing transport")  # what prepare raises then

    monkeypatch.setattr(blobsource.LocalFile, "_send_body", gone)
    caplog.set_level(logging.INFO)
    async with mirror(tmp_path, upstream) as srv:
        async with KeepAlive.open(srv.port) as conn:
            assert (await conn.request(path)).body == data  # fetched: a follower, not a file
        await srv.settled()
        caplog.clear()
        async with KeepAlive.open(srv.port) as conn:
            with pytest.raises(asyncio.IncompleteReadError):
                await conn.request(path)
        await asyncio.sleep(0.05)
    assert "Traceback" not in caplog.text and "Error handling request" not in caplog.text, caplog.text
    assert '" 499 ' in caplog.text  # the access log says the client went away
