"""OCI artifacts pushed and pulled with a real client, oras-py (PyPI `oras`), for the artifact tests.

oras-py has no option for a manifest's `artifactType`; `Oras` sets it on the manifest it uploads. Like the
oras and cosign CLIs on a registry without the referrers API, `push_tag_schema` pushes the `sha256-<hex>` tag
whose index lists a subject's referrers (oras-py does not).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import oras.oci
import oras.provider
import requests

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
EMPTY = "application/vnd.oci.empty.v1+json"
SIGNATURE = "application/vnd.dev.cosign.artifact.sig.v1+json"
SIMPLESIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
HELM_CONFIG = "application/vnd.cncf.helm.config.v1+json"
HELM_CHART = "application/vnd.cncf.helm.chart.content.v1.tar+gzip"


class Oras(oras.provider.Registry):
    """oras-py over plain HTTP on loopback, with `artifact_type` set on the manifests it pushes."""

    def __init__(self, hostname: str) -> None:
        super().__init__(hostname=hostname, insecure=True)
        self.artifact_type: str | None = None

    def upload_manifest(self, manifest: dict[str, Any], container: Any) -> requests.Response:
        if self.artifact_type is not None:
            manifest = {**manifest, "artifactType": self.artifact_type}
        response: requests.Response = super().upload_manifest(manifest, container)
        return response


def push(
    client: Oras,
    target: str,
    files: list[tuple[Path, str]],
    *,
    config: tuple[Path, str] | None = None,
    artifact_type: str | None = None,
    subject: tuple[str, str, int] | None = None,
    annotations: dict[str, str] | None = None,
) -> str:
    """Push an artifact (files with their media types); `config` None is the empty config `{}`. Its digest."""
    client.artifact_type = artifact_type
    config_ref = f"{config[0]}:{config[1]}" if config else f"{files[0][0].parent / 'no-config'}:{EMPTY}"
    response = client.push(
        target,
        files=[f"{path}:{media_type}" for path, media_type in files],
        manifest_config=config_ref,
        manifest_annotations=annotations,
        subject=oras.oci.Subject(*subject) if subject else None,
        disable_path_validation=True,
        quiet=True,
    )
    return str(response.headers["Docker-Content-Digest"])


def descriptor_of(manifest: bytes, digest: str) -> dict[str, Any]:
    """A referrer's descriptor as the referrers API lists it: artifactType (else the config's type), annotations."""
    document = json.loads(manifest)
    found = {"mediaType": document.get("mediaType", OCI_MANIFEST), "digest": digest, "size": len(manifest)}
    found["artifactType"] = document.get("artifactType") or document["config"]["mediaType"]
    if document.get("annotations"):
        found["annotations"] = document["annotations"]
    return found


def tag_schema_index(descriptors: list[dict[str, Any]]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}).encode()
