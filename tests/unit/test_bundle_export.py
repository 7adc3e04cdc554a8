"""`cargohold export` of referrers and `cargohold import` next to a running instance, in process, against the rig's
referrers registry (tests/rig/referrers.py) behind cargohold in its shipped defaults: every page of referrers is
carried (bounded, and said when the bound is hit), a referrer that cannot be fetched is left out with a warning
instead of failing the export, a sha512 subject gets the spec's tag, and an offline instance lists what an import
brings while it runs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import tarfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from cargohold import bundle
from cargohold.app import build_app
from cargohold.config import Settings
from cargohold.oci.digests import Digest
from cargohold.pull.referrers import tag_schema_tag
from rig.referrers import OCI_INDEX, Artifact, ReferrersRegistry, artifact, index_of

SIGNATURE = "application/vnd.dev.cosign.artifact.sig.v1+json"
HELM_CONFIG = "application/vnd.cncf.helm.config.v1+json"
HELM_CHART = "application/vnd.cncf.helm.chart.content.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"


@dataclass
class _Sha512(Artifact):
    """An artefact its registry names by its sha512 digest."""

    @property
    def digest(self) -> str:
        return "sha512:" + hashlib.sha512(self.manifest).hexdigest()


def _chart(seed: str) -> Artifact:
    return artifact(HELM_CONFIG, [(HELM_CHART, seed.encode() * 10)], config=(HELM_CONFIG, b'{"name":"chart"}'))


def _signature(subject: Artifact, seed: str) -> Artifact:
    return artifact(SIGNATURE, [(SIGNATURE, seed.encode())], subject=subject)


@asynccontextmanager
async def _instance(
    tmp_path: Path, registry: ReferrersRegistry | None, **top: Any
) -> AsyncIterator[tuple[Settings, TestClient[Any, Any]]]:
    """cargohold (shipped defaults but `top`) in front of `registry` (None: an upstream nobody answers), and
    its settings, as `cargohold export|import --config` would read them next to it."""
    server = TestServer(registry.app(), host="127.0.0.1") if registry is not None else None
    if server is not None:
        await server.start_server()
    url = str(server.make_url("")).rstrip("/") if server is not None else "http://127.0.0.1:9"
    settings = Settings.model_validate(
        {"data_dir": str(tmp_path), "upstreams": [{"name": "reg.test", "url": url}], **top}
    )
    client: TestClient[Any, Any] = TestClient(TestServer(build_app(settings), host="127.0.0.1"))
    await client.start_server()
    try:
        yield settings, client
    finally:
        await client.close()
        if server is not None:
            await server.close()


async def _export(settings: Settings, client: TestClient[Any, Any], image: str, output: Path) -> list[str]:
    said: list[str] = []
    url = str(client.make_url("")).rstrip("/")
    await bundle.export(settings, [image], output, None, url, None, said.append)
    return said


def _entries(path: Path) -> dict[str, Any]:
    """The bundle's index.json entries by ref name, each with the document it names."""
    with tarfile.open(path) as tar:

        def read(name: str) -> Any:
            member = tar.extractfile(name)
            assert member is not None
            return json.loads(member.read())

        entries = read("index.json")["manifests"]
        return {e["annotations"][REF_NAME]: read("blobs/" + e["digest"].replace(":", "/")) for e in entries}


def _listed(entries: dict[str, Any], subject: str) -> list[str]:
    """The digests the bundle's referrers tag schema index lists for `subject`."""
    index = entries[f"reg.test/acme/app:{tag_schema_tag(Digest.parse(subject))}"]
    assert index["mediaType"] == OCI_INDEX
    return sorted(d["digest"] for d in index["manifests"])


async def test_export_carries_every_page_of_referrers(tmp_path: Path) -> None:
    registry = ReferrersRegistry(page_size=2)
    chart = registry.add("acme/app", _chart("paged"), "1.0")
    signatures = [registry.add("acme/app", _signature(chart, f"sig-{i}")) for i in range(5)]
    async with _instance(tmp_path / "data", registry) as (settings, client):
        said = await _export(settings, client, "reg.test/acme/app:1.0", tmp_path / "b.tar")
    assert "5 referrer(s)" in said[-2]
    assert _listed(_entries(tmp_path / "b.tar"), chart.digest) == sorted(s.digest for s in signatures)


async def test_export_follows_a_bounded_number_of_pages_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bundle, "REFERRER_PAGES", 2)  # two pages of two, where five referrers need three
    registry = ReferrersRegistry(page_size=2)
    chart = registry.add("acme/app", _chart("bounded"), "1.0")
    for i in range(5):
        registry.add("acme/app", _signature(chart, f"sig-{i}"))
    async with _instance(tmp_path / "data", registry) as (settings, client):
        said = await _export(settings, client, "reg.test/acme/app:1.0", tmp_path / "b.tar")
    assert any("more than 2 pages" in line for line in said), said
    assert "4 referrer(s)" in said[-2]
    assert len(_listed(_entries(tmp_path / "b.tar"), chart.digest)) == 4


async def test_a_referrer_that_cannot_be_fetched_is_left_out_with_a_warning(tmp_path: Path) -> None:
    """A signature deleted upstream (still in the tag schema's index) and a descriptor of a digest algorithm
    nobody computes: the export goes on without them, and the bundle's index lists only what it carries."""
    registry = ReferrersRegistry(api=False)
    chart = registry.add("acme/app", _chart("dangling"), "1.0")
    kept = registry.add("acme/app", _signature(chart, "kept"))
    deleted = _signature(chart, "deleted")
    odd = {**kept.descriptor(), "digest": "sha384:" + "c" * 96}
    schema = json.loads(index_of([kept, deleted]).manifest)
    schema["manifests"].append(odd)
    registry.add("acme/app", Artifact(json.dumps(schema).encode(), {}, OCI_INDEX), "sha256-" + chart.digest[7:])
    async with _instance(tmp_path / "data", registry) as (settings, client):
        said = await _export(settings, client, "reg.test/acme/app:1.0", tmp_path / "b.tar")
    assert (tmp_path / "b.tar").exists()
    assert any(deleted.digest in line and "left out" in line for line in said), said
    assert any(odd["digest"] in line and "left out" in line for line in said), said
    assert "1 referrer(s)" in said[-2]
    assert _listed(_entries(tmp_path / "b.tar"), chart.digest) == [kept.digest]


def test_the_tag_schema_tag_is_truncated_as_the_spec_says() -> None:
    sha256, sha512 = Digest.of(b"x"), Digest.of(b"x", "sha512")
    assert tag_schema_tag(sha256) == f"sha256-{sha256.hex}"
    assert tag_schema_tag(sha512) == f"sha512-{sha512.hex[:64]}"


async def test_a_sha512_subject_is_exported_imported_and_found_by_its_spec_tag(tmp_path: Path) -> None:
    registry = ReferrersRegistry()
    chart = registry.add("acme/app", _Sha512(_chart("sha512").manifest, _chart("sha512").blobs))
    signature = registry.add("acme/app", _signature(chart, "sig"))
    async with _instance(tmp_path / "a", registry) as (settings, client):
        said = await _export(settings, client, f"reg.test/acme/app@{chart.digest}", tmp_path / "b.tar")
    assert "1 referrer(s)" in said[-2]
    assert _listed(_entries(tmp_path / "b.tar"), chart.digest) == [signature.digest]
    async with _instance(tmp_path / "b", None, offline=True) as (settings, client):
        said = []
        assert await bundle.import_bundle(settings, tmp_path / "b.tar", said.append) == 0
        resp = await client.get(f"/v2/acme/app/referrers/{chart.digest}")
        assert resp.status == 200 and [d["digest"] for d in (await resp.json())["manifests"]] == [signature.digest]
    # An upstream without the API, the spec's tag pushed as a client pushes it: the fallback finds it.
    registry.api = False
    registry.add("acme/app", index_of([signature]), "sha512-" + chart.digest[7:][:64])
    async with _instance(tmp_path / "c", registry) as (settings, client):
        resp = await client.get(f"/v2/acme/app/referrers/{chart.digest}")
        assert resp.status == 200 and [d["digest"] for d in (await resp.json())["manifests"]] == [signature.digest]


async def test_an_offline_instance_lists_the_referrers_an_import_brings_while_it_runs(tmp_path: Path) -> None:
    registry = ReferrersRegistry()
    chart = registry.add("acme/app", _chart("offline"), "1.0")
    signature = registry.add("acme/app", _signature(chart, "sig"))
    async with _instance(tmp_path / "a", registry) as (settings, client):
        await _export(settings, client, "reg.test/acme/app:1.0", tmp_path / "b.tar")
    path = f"/v2/acme/app/referrers/{chart.digest}"
    async with _instance(tmp_path / "b", None, offline=True) as (settings, client):
        assert (await (await client.get(path)).json())["manifests"] == []
        assert await bundle.import_bundle(settings, tmp_path / "b.tar", [].append) == 0
        listed: list[str] = []
        for _ in range(100):  # the tag layer reads the index's rows of a hot tag at most once a second
            listed = [d["digest"] for d in (await (await client.get(path)).json())["manifests"]]
            if listed:
                break
            await asyncio.sleep(0.1)
        assert listed == [signature.digest]
