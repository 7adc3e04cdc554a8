"""Conditional requests and Range judged against the blob's ETag, its digest (issue 14 item 4), for
a hit from the filesystem, a follower of a download and a hit streamed from a bucket alike; and
`Range: bytes=-0`, a suffix of no bytes, is not satisfiable (issue 21)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from blobmirror import Answer, KeepAlive, Upstream, mirror, s3_fixture, server_log_fixture  # noqa: F401 - fixtures

from rig.s3 import S3Server

# (headers, status, what the body is: "all", "range" = bytes 100..199, "none")
CASES = [
    ({"If-None-Match": '"{digest}"'}, 304, "none"),
    ({"If-None-Match": 'W/"{digest}", "other"'}, 304, "none"),  # a weak comparison for If-None-Match
    ({"If-None-Match": '"sha256:other"'}, 200, "all"),
    ({"If-None-Match": "*"}, 304, "none"),
    ({"If-Match": '"{digest}"'}, 200, "all"),
    ({"If-Match": '"sha256:other", "{digest}"'}, 200, "all"),
    ({"If-Match": "*"}, 200, "all"),
    ({"If-Match": '"sha256:other"'}, 412, "none"),
    ({"If-Match": 'W/"{digest}"'}, 412, "none"),  # a strong comparison for If-Match
    ({"If-Range": '"{digest}"', "Range": "bytes=100-199"}, 206, "range"),
    ({"If-Range": '"sha256:other"', "Range": "bytes=100-199"}, 200, "all"),
    ({"If-Range": "Sat, 28 Nov 2026 10:00:00 GMT", "Range": "bytes=100-199"}, 200, "all"),
]


def _expect(answer: Answer, status: int, body: str, data: bytes, digest: str) -> None:
    assert answer.status == status, (answer.status, answer.body[:200])
    if status in (200, 206, 304):
        assert answer.headers["etag"] == f'"{digest}"'
    expected = {"all": data, "range": data[100:200]}.get(body)
    if expected is not None:
        assert answer.body == expected
    elif status == 412:
        assert b'"PRECONDITION_FAILED"' in answer.body


@pytest.mark.parametrize("way", ["filesystem hit", "follower", "s3 stream"])
async def test_conditions_are_judged_against_the_digest(
    way: str, s3: S3Server, tmp_path: Path, server_log: Callable[[], str]
) -> None:
    upstream = Upstream()
    data = os.urandom(1 << 20)
    config = {"storage": s3.storage(f"{tmp_path.name}/")} if way == "s3 stream" else {}
    async with mirror(tmp_path, upstream, **config) as srv, KeepAlive.open(srv.port) as conn:
        for headers, status, body in CASES:
            digest = upstream.add(data if way != "follower" else os.urandom(1 << 20))  # follower: a new blob each
            data_now = upstream.blobs[digest]
            path = f"/v2/library/app/blobs/{digest}"
            if way != "follower":
                assert (await conn.request(path)).body == data_now
                await srv.settled()
            answer = await conn.request(path, headers={k: v.format(digest=digest) for k, v in headers.items()})
            _expect(answer, status, body, data_now, digest)
            await srv.settled()


@pytest.mark.parametrize(
    ("header", "status", "first", "last"),
    [
        ("bytes=-0", 416, None, None),
        ("bytes=-10", 206, 990, 999),
        ("bytes=-5000", 206, 0, 999),
        ("bytes=990-", 206, 990, 999),
        ("bytes=5-2000", 206, 5, 999),
        ("bytes=1000-", 416, None, None),
        ("bytes=9-3", 416, None, None),
        ("bytes=-", 416, None, None),
        ("bytes=0-1,5-6", 416, None, None),
    ],
)
async def test_range_of_a_hit(header: str, status: int, first: int | None, last: int | None, tmp_path: Path) -> None:
    upstream = Upstream()
    data = os.urandom(1000)
    digest = upstream.add(data)
    async with mirror(tmp_path, upstream) as srv, KeepAlive.open(srv.port) as conn:
        path = f"/v2/library/app/blobs/{digest}"
        assert (await conn.request(path)).body == data
        await srv.settled()
        answer = await conn.request(path, headers={"Range": header})
        assert answer.status == status, (answer.status, answer.headers)
        if first is not None and last is not None:
            assert answer.body == data[first : last + 1]
            assert answer.headers["content-range"] == f"bytes {first}-{last}/1000"
        else:
            assert b'"RANGE_INVALID"' in answer.body
