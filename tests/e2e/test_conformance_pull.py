"""The OCI distribution-spec conformance suite's pull workflow (conformance/01_pull_test.go, the tag
listing of 03_discovery_test.go, the base route), check by check, against cargohold in its shipped
defaults. The suite's setup pushes; a mirror cannot, so the content is pushed to the hub behind us
and pulled through: manifests[0] under tags test0..test3, manifests[1] by digest only."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from rig import images as I
from rig.hub import Hub
from rig.server import Cargohold
from rig.util import http_request

#: The suite's names: a digest nobody pushed, a reference that is no tag, and its error codes.
DUMMY_DIGEST = "sha256:" + hashlib.sha256(b"hello world").hexdigest()
NONEXISTENT_MANIFEST = ".INVALID_MANIFEST_NAME"
ERROR_CODES = {
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
    "TOOMANYREQUESTS",
}
ACCEPT = {"Accept": I.OCI_MANIFEST}
TAGS = ("test0", "test1", "test2", "test3")


@dataclass
class Pulled:
    srv: Cargohold
    hub: Hub
    repo: str
    manifests: tuple[I.Image, I.Image]

    def call(self, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        res = http_request(method, f"{self.srv.url}/v2/{self.repo}/{path}", headers=headers)
        return res.status, res.headers, res.body


@pytest.fixture
def pulled(hub: Hub, cargohold: Callable[..., Cargohold]) -> Pulled:
    seed = uuid.uuid4().hex[:12]
    repo = f"conformance/{seed}"
    first = hub.push_image(I.simple_image(f"{seed}-0", oci=True), repo, TAGS[0])
    for tag in TAGS[1:]:
        hub.push_tag(repo, tag, first)
    second = hub.push_image(I.simple_image(f"{seed}-1", oci=True), repo, None)
    return Pulled(cargohold(), hub, repo, (first, second))


def _code(body: bytes) -> str:
    return str(json.loads(body)["errors"][0]["code"])


def test_base_route(pulled: Pulled) -> None:
    assert http_request("GET", f"{pulled.srv.url}/v2/").status == 200


def test_blob_head_and_get(pulled: Pulled) -> None:
    config = pulled.manifests[0].config
    assert config is not None
    status, headers, _ = pulled.call("HEAD", f"blobs/{config.digest}")
    assert status == 200 and headers.get("docker-content-digest", config.digest) == config.digest
    status, headers, body = pulled.call("GET", f"blobs/{config.digest}")
    assert status == 200 and body == config.read_bytes()
    assert headers.get("docker-content-digest", config.digest) == config.digest


@pytest.mark.parametrize("method", ["HEAD", "GET"])
def test_nonexistent_blob_is_404(pulled: Pulled, method: str) -> None:
    status, _, body = pulled.call(method, f"blobs/{DUMMY_DIGEST}")
    assert status == 404
    if method == "GET":
        assert _code(body) == "BLOB_UNKNOWN"


@pytest.mark.parametrize("method", ["HEAD", "GET"])
def test_invalid_manifest_name_is_404_without_asking_upstream(pulled: Pulled, method: str) -> None:
    pulled.hub.reset_counts()
    status, _, body = pulled.call(method, f"manifests/{NONEXISTENT_MANIFEST}")
    assert status == 404
    if method == "GET":
        assert _code(body) == "MANIFEST_UNKNOWN"
    assert pulled.hub.count(service=None) == 0


@pytest.mark.parametrize("method", ["HEAD", "GET"])
def test_unknown_tag_is_404_manifest_unknown(pulled: Pulled, method: str) -> None:
    status, _, body = pulled.call(method, "manifests/no-such-tag")
    assert status == 404
    if method == "GET":
        assert _code(body) == "MANIFEST_UNKNOWN"


@pytest.mark.parametrize("method", ["HEAD", "GET"])
@pytest.mark.parametrize("which", [0, 1])
def test_manifest_by_digest(pulled: Pulled, method: str, which: int) -> None:
    im = pulled.manifests[which]
    status, headers, body = pulled.call(method, f"manifests/{im.digest}", ACCEPT)
    assert status == 200 and headers.get("docker-content-digest", im.digest) == im.digest
    if method == "GET":
        assert body == im.manifest


@pytest.mark.parametrize("method", ["HEAD", "GET"])
def test_manifest_by_tag(pulled: Pulled, method: str) -> None:
    im = pulled.manifests[0]
    status, headers, body = pulled.call(method, f"manifests/{TAGS[0]}", ACCEPT)
    assert status == 200 and headers.get("docker-content-digest", im.digest) == im.digest
    if method == "GET":
        assert body == im.manifest


def test_malformed_digest_is_400_with_a_spec_code_or_404(pulled: Pulled) -> None:
    status, _, body = pulled.call("GET", "manifests/sha256:totallywrong")
    assert status in (400, 404)
    if status == 400:
        assert _code(body) in ERROR_CODES


def test_tags_list_with_n_and_last(pulled: Pulled) -> None:
    status, _, body = pulled.call("GET", "tags/list")
    tags = json.loads(body)["tags"]
    assert status == 200 and sorted(tags) == list(TAGS)
    half = len(tags) // 2
    status, _, body = pulled.call("GET", f"tags/list?n={half}")
    first = json.loads(body)["tags"]
    assert status == 200 and len(first) == half
    status, _, body = pulled.call("GET", f"tags/list?n={half}&last={first[-1]}")
    rest = json.loads(body)["tags"]
    assert status == 200 and len(rest) <= half and first[-1] not in rest
    assert sorted(first + rest) == list(TAGS)


def test_no_route_is_404_with_a_spec_code(pulled: Pulled) -> None:
    for path in ("/v2/_catalog/x/y/z", "/nothing-here", f"/v2/{pulled.repo}/referrers-nope/x"):
        res = http_request("GET", pulled.srv.url + path)
        assert res.status == 404 and _code(res.body) in ERROR_CODES, (path, res.body)
