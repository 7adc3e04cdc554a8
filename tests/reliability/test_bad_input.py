"""Hostile and malformed input at every endpoint, generated with hypothesis, against the real
server and hub: each gets a 4xx answer (OCI JSON whenever the HTTP itself could be parsed),
never a 5xx, never a byte from outside data_dir, and nothing odd reaches the upstream."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reliability.helpers import files_under, settled
from reliability.rawhttp import RawAnswer, raw_request
from rig.hub import Hub
from rig.images import Image
from rig.server import Cargohold

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True
)
HEX = "0123456789abcdef"

TRAVERSAL = [
    "..",
    "../..",
    "../../etc/passwd",
    "%2e%2e",
    "%2e%2e/%2e%2e/etc/passwd",
    "..%2f..%2fetc%2fpasswd",
    "%252e%252e",
    "/etc/passwd",
    "//etc/passwd",
    "library/../../../etc",
    "a/./b",
    "a//b",
    ".hidden",
    "UPPER/case",
    "Library/Alpine",
    "a" * 300,
    "a/" * 100 + "b",
    "%00",
    "a%00b",
    "a\\..\\b",
    "~root",
    "127.0.0.1:1/x",
    "localhost/x",
    "169.254.169.254/latest",
    "evil.com/x",
    "EVIL.COM/x",
    "docker.io/../x",
]
name_chars = st.sampled_from([*"abcAZ09._-/%:\\~@", "..", "%2e", "%2f", "%00", "%20", "%c0%ae"])
names = st.one_of(st.sampled_from(TRAVERSAL), st.lists(name_chars, min_size=1, max_size=80).map("".join))

BAD_DIGESTS = [
    "sha256:",
    "sha256:" + "0" * 63,
    "sha256:" + "0" * 65,
    "sha256:" + "A" * 64,
    "SHA256:" + "0" * 64,
    "md5:" + "0" * 32,
    "sha512:" + "0" * 64,
    "sha256:../../../../etc/passwd",
    "sha256:%2e%2e%2f" + "0" * 55,
    "sha256:" + "g" * 64,
    ":" + "0" * 64,
    "sha256::" + "0" * 64,
    "sha256:" + "0" * 64 + "/x",
    "x" * 300,
]
digests = st.one_of(
    st.sampled_from(BAD_DIGESTS),
    st.builds(
        lambda a, h: f"{a}:{h}",
        st.sampled_from(["sha256", "sha384", "sha512", "blake3", "Sha256", ""]),
        st.text(alphabet=HEX + "XYZ./%", min_size=0, max_size=130),
    ),
)
references = st.one_of(digests, st.text(alphabet="aA0._-:%/", min_size=1, max_size=200))
ranges = st.one_of(
    st.sampled_from(
        [
            "bytes=abc",
            "bytes=5-2",
            "bytes=-0",
            "bytes=0-1,3-4",
            "bytes=99999999999999999999999-",
            "items=0-1",
            "bytes=",
            "bytes=-",
            "bytes=--1",
            "bytes=1-1-1",
            "bytes=0x10-",
            "bytes= 1 - 2",
        ]
    ),
    st.text(alphabet="bytes=0123456789-, ", max_size=40),
)
auth_values = st.one_of(
    st.sampled_from(
        [
            "Basic",
            "Basic !!!",
            "Basic " + "A" * 5000,
            "Bearer",
            "Bearer ..",
            "Bearer a.b.c",
            "Negotiate x",
            "Basic Og==",
            "basic dXNlcjpwYXNz",
            "Bearer " + "x" * 4000,
        ]
    ),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=200),
)


@pytest.fixture
def target(cargohold: Callable[..., Cargohold], hub_images: dict[str, Image]) -> Iterator[tuple[Cargohold, Image, str]]:
    """A server with one image cached, and a canary file next to data_dir that must never leak."""
    # The fuzzers send hundreds of requests a second from one address: under the shipped budgets
    # most would be a 429 before reaching the code they probe. The limiter stays on (connections).
    fuzzing = {
        "requests_per_second": 0,
        "burst": 0,
        "blobs_per_second": 0,
        "blob_burst": 0,
        "pulls_per_minute": 0,
        "pulls_per_hour": 0,
    }
    srv = cargohold(rate_limit=fuzzing)
    im = hub_images["multi"]
    canary = secrets.token_hex(16)
    (srv.workdir / "canary").write_text(canary)
    (srv.data_dir.parent / "passwd").write_text(canary)
    for path in [f"/v2/{im.repo}/manifests/{im.tag}"] + [f"/v2/{im.repo}/blobs/{b.digest}" for b in im.blobs]:
        assert raw_request(srv.port, path.encode(), headers=[(b"Accept", b"*/*")]).status == 200
    yield srv, im, canary
    _assert_nothing_escaped(srv, canary)


def _assert_nothing_escaped(srv: Cargohold, canary: str) -> None:
    settled(srv)  # a client has a blob before its fsync and rename: a download's temp file may still be there
    allowed = re.compile(r"^(blobs/sha(256|512)/[0-9a-f]{2}/[0-9a-f]{64,128}|index\.sqlite(-wal|-shm)?)$")
    for path in files_under(srv.data_dir):
        assert allowed.match(str(path.relative_to(srv.data_dir))), path
        mode = path.stat().st_mode
        assert not mode & 0o002, f"{path} is world-writable"
        if path.parent.parent.parent.name == "blobs":
            assert not mode & 0o007, f"{path} is readable by others"
    assert sorted(p.name for p in srv.workdir.iterdir()) == ["canary", "cargohold.log", "config.yml", "data", "passwd"]
    log = srv.log_text()
    assert "Traceback" not in log and canary not in log


def _check(res: RawAnswer, canary: str, ok: set[int] = frozenset(), head: bool = False) -> None:  # type: ignore[assignment]
    assert canary.encode() not in res.body
    assert res.status in ok or 400 <= res.status < 500, (res.status, res.body[:300])
    if head:
        assert res.body == b""
    elif res.status >= 400:
        assert res.oci_code() is not None, res.body[:300]


def _no_odd_upstream_requests(hub: Hub) -> None:
    for r in hub.requests:
        assert ".." not in r.path and "%" not in r.path and "//" not in r.path, r.path
        assert re.fullmatch(r"/v2/[a-z0-9._/-]+/(manifests|blobs|tags)/[A-Za-z0-9_.:/-]+|/token|/v2/", r.path), r.path


def test_bad_names(target: tuple[Cargohold, Image, str], hub: Hub) -> None:
    srv, im, canary = target

    @SETTINGS
    @given(
        name=names,
        kind=st.sampled_from(["manifests/latest", f"blobs/{im.blobs[0].digest}", "tags/list"]),
        method=st.sampled_from([b"GET", b"HEAD"]),
    )
    def check(name: str, kind: str, method: bytes) -> None:
        res = raw_request(srv.port, f"/v2/{name}/{kind}".encode(), method=method)
        ok = {200} if re.fullmatch(r"[a-z0-9]+(/[a-z0-9]+)*", name) else set()
        _check(res, canary, ok=ok, head=method == b"HEAD")

    check()
    _no_odd_upstream_requests(hub)


def test_bad_digests_and_references(target: tuple[Cargohold, Image, str], hub: Hub) -> None:
    srv, im, canary = target

    @SETTINGS
    @given(digest=digests, reference=references)
    def check(digest: str, reference: str) -> None:
        _check(raw_request(srv.port, f"/v2/{im.repo}/blobs/{digest}".encode()), canary)
        _check(raw_request(srv.port, f"/v2/{im.repo}/manifests/{reference}".encode()), canary)

    check()
    _no_odd_upstream_requests(hub)


def test_bad_ranges(target: tuple[Cargohold, Image, str]) -> None:
    srv, im, canary = target
    blob = max(im.layers, key=lambda b: b.size)

    @SETTINGS
    @given(value=ranges, cached=st.booleans())
    def check(value: str, cached: bool) -> None:
        digest = blob.digest if cached else im.config.digest  # type: ignore[union-attr]
        res = raw_request(srv.port, f"/v2/{im.repo}/blobs/{digest}".encode(), headers=[(b"Range", value.encode())])
        _check(res, canary, ok={200, 206})
        if res.status == 416:
            assert res.oci_code() == "RANGE_INVALID"

    check()


def test_numbers_int_refuses_are_malformed_input_not_a_traceback(target: tuple[Cargohold, Image, str]) -> None:
    """Python's int() refuses over 4,300 digits, and "²".isdigit() is true but int() refuses it: a Range or
    `n=` like these answered 500 with a traceback in the log (the fixture checks the log)."""
    srv, im, canary = target
    blob = max(im.layers, key=lambda b: b.size)
    huge = "9" * 4301
    for value in (f"bytes={huge}-", f"bytes=-{huge}", f"bytes=0-{huge}"):
        for digest in (blob.digest, im.config.digest):  # type: ignore[union-attr]
            for method in (b"GET", b"HEAD"):
                path = f"/v2/{im.repo}/blobs/{digest}".encode()
                res = raw_request(srv.port, path, method=method, headers=[(b"Range", value.encode())])
                assert res.status == 416, (value[:20], res.status)
                _check(res, canary, head=method == b"HEAD")
    for n in ("\u00b2", huge):
        res = raw_request(srv.port, f"/v2/{im.repo}/tags/list?n={quote(n)}".encode())
        _check(res, canary, ok={200})


def test_bad_authorization_is_never_passed_on(target: tuple[Cargohold, Image, str], hub: Hub) -> None:
    """Auth is off on this server: a bad Authorization header changes nothing, and no client
    credential ever travels to the upstream (cargohold uses its own tokens there)."""
    srv, im, _canary = target
    sent: list[str] = []

    @SETTINGS
    @given(value=auth_values)
    def check(value: str) -> None:
        sent.append(value)
        res = raw_request(
            srv.port, f"/v2/{im.repo}/manifests/{im.tag}".encode(), headers=[(b"Authorization", value.encode())]
        )
        assert res.status == 200, res.body[:200]

    check()
    upstream_auth = {r.headers.get("authorization", "") for r in hub.requests}
    assert not upstream_auth & {v for v in sent if v}
    assert all(a == "" or a.startswith("Bearer ey") for a in upstream_auth), upstream_auth


MALFORMED = {
    "one huge header": {"headers": [(b"X-Big", b"a" * 20_000)]},
    "300 headers": {"headers": [(b"X-%d" % i, b"v") for i in range(300)]},
    "huge request line": {"target": b"/v2/" + b"a/" * 5000 + b"manifests/latest"},
    "space in header name": {"headers": [(b"Bad Name", b"v")]},
    "NUL in header value": {"headers": [(b"X-Ctl", b"a\x00b")]},
    "binary method": {"method": b"G\x01T"},
    "non-UTF-8 path": {"target": b"/v2/\xff\xfe/manifests/latest"},
    "big body": {"method": b"PUT", "body": b"x" * 200_000, "target": b"/v2/a/manifests/latest"},
    "CONNECT": {"method": b"CONNECT", "target": b"evil.example:443"},
    "duplicate Host": {"headers": [(b"Host", b"a"), (b"Host", b"b")]},
}


def test_malformed_http_is_refused(target: tuple[Cargohold, Image, str], hub: Hub) -> None:
    """Framing errors are answered by aiohttp's parser (plain 400, logged as one line) before
    cargohold code runs; anything that parses is an OCI error. Never a 5xx, never proxied."""
    srv, _, canary = target
    hub.reset_counts()
    for name, case in MALFORMED.items():
        kw = {"target": b"/v2/", **case}
        res = raw_request(srv.port, kw.pop("target"), **kw)  # type: ignore[arg-type]
        assert 400 <= res.status < 500, (name, res.status, res.body[:200])
        assert canary.encode() not in res.body
        if res.headers.get("content-type", "").startswith("application/json"):
            assert res.oci_code() is not None, name
    assert hub.requests == []
    assert "refused malformed request" in srv.log_text()


def test_no_open_proxy(target: tuple[Cargohold, Image, str], hub: Hub) -> None:
    """Only configured upstreams are ever asked: proxy-style requests, foreign Host headers and
    registry hosts in the name do not make cargohold fetch from anywhere else."""
    srv, im, _canary = target
    hub.reset_counts()
    for name in ("evil.example/x", "127.0.0.1:9/x", "169.254.169.254/latest", "localhost/x", "[::1]:80/x"):
        res = raw_request(srv.port, f"/v2/{name}/manifests/latest".encode())
        assert (res.status, res.oci_code()) in ((404, "NAME_UNKNOWN"), (400, "NAME_INVALID")), (name, res.body)
    res = raw_request(srv.port, b"/v2/x/manifests/latest?ns=evil.example")
    assert (res.status, res.oci_code()) == (404, "NAME_UNKNOWN")
    assert hub.requests == []
    # Absolute-form targets and Host headers name nothing: the path is served as our own.
    for target_bytes, host in (
        (b"http://evil.example/v2/" + f"{im.repo}/manifests/{im.tag}".encode(), b"x"),
        (f"/v2/{im.repo}/manifests/{im.tag}".encode(), b"evil.example"),
    ):
        res = raw_request(srv.port, target_bytes, headers=[(b"Host", host), (b"Accept", b"*/*")])
        assert res.status == 200 and res.headers["docker-content-digest"] == im.digest
    assert hub.requests == []  # answered from cache; nothing went anywhere
    _no_odd_upstream_requests(hub)
