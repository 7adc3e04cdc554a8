"""Keeping what a team depends on, against the real rig: pinned images under a small cap, and air-gap
bundles (export, import into an empty cache, pull with the upstream down; skopeo reads and writes them)."""

from __future__ import annotations

import json
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

from cacheops import cli, metrics, pull, sample, stored
from rig.clients import need_binary, skopeo_copy
from rig.hub import Hub
from rig.images import Image
from rig.server import Cargohold


def _content(image: Image) -> set[str]:
    """Everything the cache keeps for an image: its manifests and blobs."""
    digests = {image.digest} | set(image.blob_digests)
    for child in image.children:
        digests |= _content(child)
    return digests


def _bytes(image: Image) -> int:
    return len(image.manifest) + image.total_size + sum(len(child.manifest) for child in image.children)


def test_pinned_images_survive_eviction_and_unpinned_content_goes(
    cargohold: Callable[..., Cargohold], hub: Hub, hub_images: dict[str, Image], tmp_path: Path
) -> None:
    tool, alpine, layers, multiarch = (hub_images[k] for k in ("oci", "multi", "layers21", "index"))
    cap = _bytes(tool) + _bytes(alpine) + 1024  # the two pinned images fit, nothing much besides
    # Changed from the defaults: a cap (the point of the test) and one pin from the config.
    srv = cargohold(cache={"max_size": cap, "pin": ["docker.io/acme/tool:*"]})
    pull(srv, tool.ref, tmp_path)
    pull(srv, alpine.ref, tmp_path)
    assert cli(srv, "cache", "pin", "alpine-test").stdout.strip() == "pinned docker.io/library/alpine-test"

    pull(srv, layers.ref, tmp_path)
    pull(srv, multiarch.ref, tmp_path)  # each download makes room: only unpinned content may go
    kept = stored(srv)
    assert _content(tool) | _content(alpine) <= kept, "pinned content was evicted"
    assert _content(layers) - kept, "unpinned content stays although the cap is exceeded"
    figures = json.loads(cli(srv, "cache", "stats", "--json").stdout)
    assert figures["pinned_size"] >= _bytes(tool) + _bytes(alpine) and not figures["pins_over_cap"]
    assert sample(metrics(srv.url), "cargohold_cache_pinned_bytes") == figures["pinned_size"]

    assert cli(srv, "cache", "unpin", "alpine-test").stdout.strip() == "unpinned docker.io/library/alpine-test"
    assert cli(srv, "cache", "unpin", "alpine-test", check=False).returncode == 1
    pull(srv, layers.ref, tmp_path)
    assert _content(alpine) - stored(srv), "an unpinned image is evicted again"
    assert _content(tool) <= stored(srv)
    assert "Traceback" not in srv.log_text()


def test_pins_larger_than_the_cap_are_kept_and_reported(
    cargohold: Callable[..., Cargohold], hub: Hub, hub_images: dict[str, Image], tmp_path: Path
) -> None:
    tool, alpine = hub_images["oci"], hub_images["multi"]
    srv = cargohold(cache={"max_size": 1024, "pin": ["docker.io/acme/tool"]})  # a cap smaller than the pin
    pull(srv, tool.ref, tmp_path)
    pull(srv, alpine.ref, tmp_path)
    assert _content(tool) <= stored(srv)
    figures = json.loads(cli(srv, "cache", "stats", "--json").stdout)
    assert figures["pins_over_cap"] and figures["pinned_size"] > figures["max_size"]
    assert "MORE THAN THE CAP" in cli(srv, "cache", "stats").stdout
    assert "pinned images alone take" in srv.log_text()


def test_export_then_import_into_an_empty_cache_serves_with_the_upstream_down(
    cargohold: Callable[..., Cargohold], hub: Hub, hub_images: dict[str, Image], tmp_path: Path
) -> None:
    tool, alpine, multiarch = hub_images["oci"], hub_images["multi"], hub_images["index"]
    source = cargohold()
    pull(source, tool.ref, tmp_path)  # cached: exported from the cache; the others go through the server
    bundle = tmp_path / "bundle.tar"
    out = cli(source, "export", tool.ref, alpine.ref, multiarch.ref, "-o", str(bundle)).stdout
    assert "docker.io/acme/multiarch:latest" in out and bundle.is_file()

    target = cargohold()  # a new, empty data_dir
    res = cli(target, "import", str(bundle))
    assert "imported docker.io/acme/tool:1.0" in res.stdout
    assert _content(tool) | _content(alpine) | _content(multiarch) <= stored(target)
    hub.reset_counts()
    with hub.down():
        pull(target, tool.ref, tmp_path)
        pull(target, alpine.ref, tmp_path)
        pull(target, multiarch.ref, tmp_path, all_platforms=True)
    assert hub.count(service=None) == 0
    assert "Traceback" not in target.log_text() + source.log_text()


def test_a_bundle_with_a_corrupt_blob_is_refused(
    cargohold: Callable[..., Cargohold], hub: Hub, hub_images: dict[str, Image], tmp_path: Path
) -> None:
    tool = hub_images["oci"]
    srv = cargohold()
    bundle = tmp_path / "bundle.tar"
    cli(srv, "export", tool.ref, "-o", str(bundle))
    layer = max(tool.blobs, key=lambda b: b.size)
    data = bundle.read_bytes()
    original = layer.read_bytes()
    at = data.index(original)
    bundle.write_bytes(data[:at] + bytes([original[0] ^ 1]) + data[at + 1 :])

    target = cargohold()
    res = cli(target, "import", str(bundle), check=False)
    assert res.returncode == 1 and "does not match" in res.stderr
    assert layer.digest not in stored(target), "a corrupt blob never lands in the cache"


def test_skopeo_reads_an_exported_bundle_and_writes_one_that_imports(
    cargohold: Callable[..., Cargohold], hub: Hub, hub_images: dict[str, Image], tmp_path: Path
) -> None:
    skopeo = need_binary("skopeo")
    tool = hub_images["oci"]
    srv = cargohold()
    bundle = tmp_path / "bundle.tar"
    cli(srv, "export", tool.ref, "-o", str(bundle))
    assert (
        skopeo_copy(f"oci-archive:{bundle}:docker.io/acme/tool:1.0", tmp_path / "from-bundle").manifest == tool.manifest
    )

    written = tmp_path / "skopeo.tar"
    subprocess.run(
        [
            skopeo, "--insecure-policy", "copy", "--src-tls-verify=false", "--src-no-creds",
            f"docker://{hub.netloc}/{tool.ref}", f"oci-archive:{written}:docker.io/acme/tool:1.0",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )  # fmt: skip
    target = cargohold()
    assert "imported docker.io/acme/tool:1.0" in cli(target, "import", str(written)).stdout
    with hub.down():
        copy = skopeo_copy(f"{target.netloc}/{tool.ref}", tmp_path / "pulled")
    assert copy.manifest == tool.manifest


def test_export_writes_only_the_platforms_asked_for(
    cargohold: Callable[..., Cargohold], hub: Hub, hub_images: dict[str, Image], tmp_path: Path
) -> None:
    multiarch = hub_images["index"]
    wanted, other = multiarch.children
    platform = f"{wanted.platform['os']}/{wanted.platform['architecture']}" if wanted.platform else ""
    srv = cargohold()
    bundle = tmp_path / "bundle.tar"
    cli(srv, "export", multiarch.ref, "--platform", platform, "-o", str(bundle))
    with tarfile.open(bundle) as tar:
        names = {name.rsplit("/", 1)[-1] for name in tar.getnames()}
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
    assert {d.split(":")[1] for d in _content(wanted)} <= names, "the platform asked for is whole"
    assert not {d.split(":")[1] for d in other.blob_digests} & names, "the other platform's layers stay out"
    assert index["manifests"][0]["digest"] == multiarch.digest  # the index itself, as the tag names it

    res = cli(srv, "export", multiarch.ref, "--platform", "plan9/mips", "-o", str(tmp_path / "none.tar"), check=False)
    assert res.returncode == 1 and "no plan9/mips platform" in res.stderr
    assert not (tmp_path / "none.tar").exists() and not (tmp_path / "none.tar.part").exists()
