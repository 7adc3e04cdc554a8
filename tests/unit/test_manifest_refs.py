"""What a stored manifest refers to, read from an upstream's JSON: only well-formed descriptors count.

A manifest is checked for its kind when stored, not for every field: a pinned manifest whose
descriptor had `"size": "big"` made every eviction fail with a traceback (pins are walked before
each one), so the cache grew past max_size until the disk filled.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cargohold.cache.pins import closure
from cargohold.cache.store import FsBlobStore
from cargohold.oci.digests import Digest
from cargohold.oci.refs import Child, references

A, B, C = ("sha256:" + c * 64 for c in "abc")


@pytest.mark.parametrize("size", ["big", None, -1, 1.5, True, [], 1 << 63], ids=str)
def test_a_descriptor_size_that_is_no_count_of_bytes_is_unknown(size: object) -> None:
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"digest": A, "size": size},
            "layers": [{"digest": B, "size": size}],
            "manifests": [{"digest": C, "size": size}],
        }
    ).encode()
    refs = references(body)
    assert refs.blobs == [Child(A, 0), Child(B, 0)] and refs.manifests == [Child(C, 0)]


@pytest.mark.parametrize(
    "document",
    [
        {"layers": 5, "manifests": "x", "fsLayers": 7, "config": "c"},
        {"layers": [{"digest": 5}], "fsLayers": [{"blobSum": 5}], "config": {"digest": None}},
    ],
)
def test_lists_and_digests_of_the_wrong_type_are_left_out(document: dict[str, object]) -> None:
    refs = references(json.dumps(document).encode())
    assert refs.blobs == [] and refs.manifests == []


def test_deep_json_is_no_manifest() -> None:
    assert references(b"[" * 200_000 + b"]" * 200_000).blobs == []


def test_well_formed_descriptors_keep_their_sizes() -> None:
    body = json.dumps({"config": {"digest": A, "size": 7}, "layers": [{"digest": B, "size": 10**12}]}).encode()
    assert references(body).blobs == [Child(A, 7), Child(B, 10**12)]


async def test_pins_walk_past_what_a_pinned_manifest_names_badly(tmp_path: Path) -> None:
    """The walk of a pinned image's manifests (before every eviction) raised on a child digest that is no
    digest, and eviction stopped for good."""
    store = FsBlobStore(tmp_path)
    child = json.dumps({"layers": [{"digest": B, "size": "big"}]}).encode()
    child_digest = Digest.of(child)
    await store.save(child_digest, child)
    root = json.dumps(
        {"manifests": [{"digest": "sha256:not-hex", "size": 1}, {"digest": str(child_digest), "size": len(child)}]}
    ).encode()
    root_digest = Digest.of(root)
    await store.save(root_digest, root)
    reachable = await closure(store, [str(root_digest)])
    assert reachable == {str(root_digest), "sha256:not-hex", str(child_digest), B}
