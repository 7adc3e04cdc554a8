"""OCI artifacts and their referrers through cargohold (shipped defaults) from Debian's docker-registry: oras-py
pushes a signature (with a `subject`) and a Helm chart to the hub, and pulls them back through cargohold. The
registry predates the referrers API, so the referrers answer comes from the tag schema (the API path is tested
against the rig's referrers registry in tests/unit/test_referrers.py).

Tiered caches: cargohold as the upstream of another cargohold, logged in with upstream credentials (the
downstream does the token dance at the upstream cargohold's /token); skopeo and the referrers API through both
tiers, routed by path prefix and by `?ns=`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from cacheops import cli, stored
from rig.artifacts import (
    HELM_CHART,
    HELM_CONFIG,
    OCI_INDEX,
    SIGNATURE,
    SIMPLESIGNING,
    Oras,
    descriptor_of,
    push,
    tag_schema_index,
)
from rig.clients import skopeo_copy
from rig.hub import Hub
from rig.images import simple_image
from rig.server import Cargohold

ALICE = ("alice", "alice-secret")
SIG_ANNOTATION = "dev.cosignproject.cosign/signature"


def _oras(host: str, token: str | None = None) -> Oras:
    """oras-py, with a token for pull and push when given: it asks its token service once and does not ask
    again when a push needs a wider scope than the first request (oras-py 0.2), so the hub's token is set."""
    client = Oras(host)
    if token is not None:
        client.auth.set_token_auth(token)
    return client


def _get(srv: Cargohold, path: str, **kwargs: Any) -> requests.Response:
    return requests.get(f"{srv.url}{path}", timeout=30, **kwargs)


def _no_tracebacks(*servers: Cargohold) -> None:
    for srv in servers:
        assert "Traceback" not in srv.log_text()


def _signed_subject(hub: Hub, tmp_path: Path, repo: str) -> tuple[str, dict[str, Any]]:
    """An image pushed to `repo:1.0`, signed with oras-py (cosign's shape: the `.sig` tag, an annotation),
    and the tag schema's index for it pushed as cosign and oras do on a registry without the API."""
    image = hub.push_image(simple_image(repo, oci=True), repo, "1.0")
    hex_ = image.digest.removeprefix("sha256:")
    payload = tmp_path / "payload.json"
    payload.write_text(json.dumps({"critical": {"image": {"docker-manifest-digest": image.digest}}}))
    signature = push(
        _oras(hub.netloc, hub.push_token(repo)),
        f"{hub.netloc}/{repo}:sha256-{hex_}.sig",
        [(payload, SIMPLESIGNING)],
        artifact_type=SIGNATURE,
        subject=(image.media_type or "", image.digest, image.size),
        annotations={SIG_ANNOTATION: "MEUCIQ-rig"},
    )
    manifest = requests.get(
        f"{hub.registry_url}/v2/{repo}/manifests/{signature}",
        headers={
            "Authorization": f"Bearer {hub.push_token(repo)}",
            "Accept": "application/vnd.oci.image.manifest.v1+json",
        },
        timeout=30,
    ).content
    descriptor = descriptor_of(manifest, signature)
    hub.push_tag(repo, f"sha256-{hex_}", tag_schema_index([descriptor]), OCI_INDEX)
    return image.digest, descriptor


def test_signature_by_tag_schema_and_helm_chart_pulled_with_oras(
    hub: Hub, cargohold: Callable[..., Cargohold], tmp_path: Path
) -> None:
    subject, signature = _signed_subject(hub, tmp_path, "acme/signed")
    chart_dir = tmp_path / "chart"
    chart_dir.mkdir()
    (chart_dir / "Chart.yaml").write_text("apiVersion: v2\nname: app\nversion: 0.1.0\n")
    chart_config = tmp_path / "chart-config.json"
    chart_config.write_text(json.dumps({"name": "app", "version": "0.1.0", "apiVersion": "v2"}))
    chart = push(
        _oras(hub.netloc, hub.push_token("acme/charts/app")),
        f"{hub.netloc}/acme/charts/app:0.1.0",
        [(chart_dir / "Chart.yaml", HELM_CHART)],
        config=(chart_config, HELM_CONFIG),
    )
    srv = cargohold()

    resp = _get(srv, f"/v2/acme/signed/referrers/{subject}")
    assert resp.status_code == 200 and resp.headers["Content-Type"] == OCI_INDEX
    assert "OCI-Filters-Applied" not in resp.headers
    assert resp.json()["manifests"] == [signature]
    assert signature["annotations"][SIG_ANNOTATION] == "MEUCIQ-rig"
    resp = _get(srv, f"/v2/acme/signed/referrers/{subject}", params={"artifactType": "application/spdx+json"})
    assert resp.headers["OCI-Filters-Applied"] == "artifactType" and resp.json()["manifests"] == []
    # A subject nobody signed: no tag in the schema, an empty index.
    other = hub.push_image(simple_image("acme-unsigned", oci=True), "acme/signed", "2.0")
    resp = _get(srv, f"/v2/acme/signed/referrers/{other.digest}")
    assert resp.status_code == 200 and resp.json()["manifests"] == []

    # The signature by digest and by cosign's tag, and the chart: pulled by oras-py through cargohold.
    hex_ = subject.removeprefix("sha256:")
    for reference in (signature["digest"], f"sha256-{hex_}.sig"):
        resp = _get(srv, f"/v2/acme/signed/manifests/{reference}")
        assert resp.status_code == 200 and resp.headers["Docker-Content-Digest"] == signature["digest"]
        assert resp.headers["Content-Type"] == "application/vnd.oci.image.manifest.v1+json"
    pulled = _oras(srv.netloc).pull(
        target=f"{srv.netloc}/acme/signed@{signature['digest']}", outdir=str(tmp_path / "sig")
    )
    assert [Path(p).read_bytes() for p in pulled] == [(tmp_path / "payload.json").read_bytes()]
    pulled = _oras(srv.netloc).pull(target=f"{srv.netloc}/acme/charts/app:0.1.0", outdir=str(tmp_path / "out"))
    assert [Path(p).read_bytes() for p in pulled] == [(chart_dir / "Chart.yaml").read_bytes()]
    resp = _get(srv, f"/v2/acme/charts/app/manifests/{chart}")
    assert json.loads(resp.content)["config"]["mediaType"] == HELM_CONFIG
    assert resp.headers["Content-Type"] == "application/vnd.oci.image.manifest.v1+json"

    # The cache CLI and the status page take an artifact as they take an image.
    document = json.loads(resp.content)
    config = _get(srv, f"/v2/acme/charts/app/blobs/{document['config']['digest']}")  # oras-py pulls layers only
    assert config.content == chart_config.read_bytes()
    chart_files = {chart, *(d["digest"] for d in [document["config"], *document["layers"]])}
    assert chart_files <= stored(srv)
    assert "docker.io/acme/charts/app:0.1.0" in cli(srv, "cache", "ls").stdout
    cli(srv, "cache", "rm", "acme/charts/app:0.1.0")
    assert not chart_files & stored(srv) and "acme/charts/app" not in cli(srv, "cache", "ls").stdout
    assert _get(srv, "/").status_code == 200

    log = srv.log_text()
    assert f"GET /v2/acme/signed/referrers/{subject}" in log and "kind=referrers" in log
    metrics = _get(srv, "/metrics").text
    assert 'cargohold_cache_requests_total{kind="referrers",result="miss"}' in metrics
    _no_tracebacks(srv)


def _tiers(cargohold: Callable[..., Cargohold], hub: Hub) -> tuple[Cargohold, Cargohold]:
    """An inner cargohold in front of the hub that lets only alice in, and an outer one logged in to it as alice.

    The outer's upstream is named `regional.test` (not docker.io): its clients name inner's upstreams by path
    prefix (`regional.test/docker.io/acme/tool`), so routing happens at both tiers."""
    inner = cargohold(start=False)
    inner.config["auth"] = {"htpasswd": str(inner.workdir / "htpasswd")}
    inner.write_config()
    subprocess.run(
        [sys.executable, "-m", "cargohold", "user", "add", ALICE[0], "--config", str(inner.config_path), "--password-stdin"],
        input=ALICE[1], text=True, capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    inner.start()
    outer = cargohold(
        upstream={"name": "regional.test", "url": inner.url, "username": ALICE[0], "password": ALICE[1]},
    )
    return inner, outer


def test_tiered_caches_pull_and_referrers_through_two_cargoholds(
    hub: Hub, cargohold: Callable[..., Cargohold], hub_images: dict[str, Any], tmp_path: Path
) -> None:
    subject, signature = _signed_subject(hub, tmp_path, "acme/tiered")
    inner, outer = _tiers(cargohold, hub)
    tool = hub_images["oci"]

    # Path prefix at both tiers: the outer's upstream by name, then the inner's.
    copied = skopeo_copy(f"{outer.netloc}/regional.test/docker.io/acme/tool:1.0", tmp_path / "copy")
    assert copied.digest == tool.digest
    resp = _get(outer, f"/v2/regional.test/docker.io/acme/tiered/referrers/{subject}", params={"n": "5"})
    assert resp.status_code == 200 and resp.json()["manifests"] == [signature]
    # ?ns= at the outer tier (as containerd asks), the inner's default upstream behind it.
    resp = _get(
        outer, f"/v2/acme/tiered/referrers/{subject}", params={"ns": "regional.test", "artifactType": SIGNATURE}
    )
    assert resp.status_code == 200 and resp.json()["manifests"] == [signature]
    assert resp.headers["OCI-Filters-Applied"] == "artifactType" and resp.headers["OCI-Namespace"] == "regional.test"
    resp = _get(outer, f"/v2/acme/tiered/manifests/{signature['digest']}", params={"ns": "regional.test"})
    assert resp.status_code == 200 and resp.headers["Docker-Content-Digest"] == signature["digest"]

    # The inner tier authorises referrers as a pull: no credentials, no answer.
    resp = _get(inner, f"/v2/docker.io/acme/tiered/referrers/{subject}")
    assert resp.status_code == 401 and resp.json()["errors"][0]["code"] == "UNAUTHORIZED"

    inner_log = inner.log_text()
    assert "alice GET /token" in inner_log  # the outer logged in at the inner's token service
    assert f"GET /v2/docker.io/acme/tiered/referrers/{subject}" in inner_log  # the API, answered by the inner
    _no_tracebacks(inner, outer)
