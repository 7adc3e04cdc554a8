"""Air-gap bundles carry referrers: an image signed on the rig's hub (oras-py, the tag schema the hub needs) is
exported through cargohold, imported into an empty cache, and an offline cargohold lists the signature in its
referrers API and serves it and its blob by digest; skopeo still reads the bundle."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import requests
from test_artifacts import _signed_subject

from cacheops import cli
from rig.artifacts import OCI_INDEX, OCI_MANIFEST
from rig.clients import skopeo_copy
from rig.hub import Hub
from rig.server import Cargohold


def test_exported_referrers_are_listed_and_pulled_offline_after_import(
    hub: Hub, cargohold: Callable[..., Cargohold], tmp_path: Path
) -> None:
    subject, signature = _signed_subject(hub, tmp_path, "acme/signed")
    source = cargohold()
    bundle = tmp_path / "bundle.tar"
    out = cli(source, "export", "acme/signed:1.0", "-o", str(bundle)).stdout
    assert "1 referrer(s)" in out
    with tarfile.open(bundle) as tar:
        entries = json.loads(tar.extractfile("index.json").read())["manifests"]  # type: ignore[union-attr]
    hex_ = subject.removeprefix("sha256:")
    names = [e["annotations"]["org.opencontainers.image.ref.name"] for e in entries]
    assert names == ["docker.io/acme/signed:1.0", f"docker.io/acme/signed:sha256-{hex_}"]

    # Changed from the defaults: offline, so nothing but the imported bundle can answer.
    target = cargohold(offline=True)
    assert f"imported docker.io/acme/signed:sha256-{hex_}" in cli(target, "import", str(bundle)).stdout
    hub.reset_counts()
    resp = requests.get(f"{target.url}/v2/acme/signed/referrers/{subject}", timeout=30)
    assert resp.status_code == 200 and resp.headers["Content-Type"] == OCI_INDEX
    assert resp.json()["manifests"] == [signature]
    resp = requests.get(
        f"{target.url}/v2/acme/signed/manifests/{signature['digest']}", headers={"Accept": OCI_MANIFEST}, timeout=30
    )
    assert resp.status_code == 200 and resp.headers["Docker-Content-Digest"] == signature["digest"]
    manifest = resp.json()
    assert manifest["subject"]["digest"] == subject
    for blob in (manifest["config"], *manifest["layers"]):
        got = requests.get(f"{target.url}/v2/acme/signed/blobs/{blob['digest']}", timeout=30)
        assert got.status_code == 200 and len(got.content) == blob["size"]
    assert hub.count(service=None) == 0
    assert "Traceback" not in target.log_text() + source.log_text()

    copied = skopeo_copy(f"oci-archive:{bundle}:docker.io/acme/signed:1.0", tmp_path / "from-bundle")
    assert json.loads(copied.manifest)["config"]
