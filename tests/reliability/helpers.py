"""Helpers for the reliability suite: plain requests to cargohold and checks on its data_dir."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from rig import images as I
from rig.server import Cargohold
from rig.util import HttpResult, http_request, wait_until

#: Client-side bound for every request: generous, it only stops a hung test, it times nothing.
CLIENT_TIMEOUT = 60.0


def get(srv: Cargohold, path: str, *, method: str = "GET", headers: dict[str, str] | None = None) -> HttpResult:
    """A request to cargohold that always asks for every manifest type."""
    return http_request(
        method, srv.url + path, headers={"Accept": I.ACCEPT_ALL, **(headers or {})}, timeout=CLIENT_TIMEOUT
    )


def oci_code(res: HttpResult) -> str:
    """The first OCI error code of an answer (fails the test if the body is not OCI JSON)."""
    body = json.loads(res.body)
    errors = body["errors"]
    assert isinstance(errors, list) and {"code", "message", "detail"} <= set(errors[0]), body
    return str(errors[0]["code"])


def pull_all(srv: Cargohold, im: I.Image) -> None:
    """Manifest by tag and by digest, and every blob, each checked byte for byte."""
    res = get(srv, f"/v2/{im.repo}/manifests/{im.tag}")
    assert res.status == 200, res.body
    assert res.body == im.manifest and res.header("Docker-Content-Digest") == im.digest
    assert get(srv, f"/v2/{im.repo}/manifests/{im.digest}").body == im.manifest
    for blob in im.blobs:
        res = get(srv, f"/v2/{im.repo}/blobs/{blob.digest}")
        assert res.status == 200 and res.body == blob.read_bytes(), blob.digest


def settled(srv: Cargohold) -> None:
    """Wait (bounded) until no download is in flight: a client has its whole blob as soon as the
    digest checks out, and the fsync and rename into the store follow."""
    if not srv.running:
        return

    def _idle() -> bool:
        page = http_request("GET", f"{srv.url}/metrics").body.decode()
        return re.search(r"^cargohold_downloads_in_flight 0(\.0)?$", page, re.MULTILINE) is not None

    wait_until(_idle, timeout=60, what="downloads to be committed to the store")


def cached_blob(srv: Cargohold, digest: str) -> Path:
    settled(srv)  # clients are served before the fsync and rename: wait for those
    return srv.data_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]


def temp_files(srv: Cargohold) -> list[Path]:
    tmp = srv.data_dir / "tmp"
    return sorted(tmp.iterdir()) if tmp.is_dir() else []


def files_under(root: Path) -> list[Path]:
    return sorted(Path(d) / f for d, _, fs in os.walk(root) for f in fs)


def assert_store_intact(srv: Cargohold) -> int:
    """Every stored blob's bytes hash to its name (nothing partial or corrupt); returns the count."""
    count = 0
    for path in files_under(srv.data_dir / "blobs"):
        algorithm = path.parent.parent.name
        digest = hashlib.new(algorithm)
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        assert digest.hexdigest() == path.name, f"{path} does not match its digest"
        count += 1
    return count
